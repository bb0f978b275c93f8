"""The projection kernels: every route gives F.linear's result."""

import pytest
import torch
import torch.nn.functional as F

from kvgen import kernels


@pytest.mark.parametrize("rows", [1, 3, kernels.ONEDNN_MAX_ROWS])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_linear_matches_f_linear(rows, with_bias):
    """Shapes that take the oneDNN route (the others are F.linear itself)."""
    out_features, in_features = 1024, 512
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features) / in_features ** 0.5
    bias = torch.randn(out_features) if with_bias else None
    x = torch.randn(1, rows, in_features)

    with torch.inference_mode():
        got = kernels.linear(x, weight, bias)
        want = F.linear(x, weight, bias)

    assert got.shape == want.shape == (1, rows, out_features)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_onednn_route_is_taken_for_a_streamed_matrix(monkeypatch):
    if not kernels.use_onednn:
        pytest.skip("this PyTorch build has no oneDNN linear")
    calls = []
    real = kernels._onednn_linear
    monkeypatch.setattr(kernels, "_onednn_linear", lambda *a: calls.append(1) or real(*a))
    weight = torch.randn(1024, 512)

    with torch.inference_mode():
        kernels.linear(torch.randn(1, 512), weight)  # a matrix-vector product: oneDNN
        kernels.linear(torch.randn(600, 512), weight)  # a wide product: MKL
        kernels.linear(torch.randn(1, 512), weight.T.contiguous().T)  # strided: MKL
    assert len(calls) == 1


def test_training_keeps_autograd():
    weight = torch.randn(1024, 512, requires_grad=True)
    kernels.linear(torch.randn(1, 512), weight).sum().backward()
    assert weight.grad is not None


@pytest.mark.parametrize("shape", [(1, 16, 4096), (1, 512, 3072)])  # the sigmoid route
def test_gelu_tanh_matches_pytorch(shape):
    x = torch.randn(shape) * 4
    with torch.inference_mode():
        torch.testing.assert_close(kernels.gelu_tanh(x), F.gelu(x, approximate="tanh"),
                                   rtol=1e-5, atol=2e-6)
