"""The projection kernels: every route gives F.linear's result."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from kvgen import kernels


@pytest.mark.parametrize("rows", [1, 3, kernels.MATVEC_MAX_ROWS, kernels.MATVEC_MAX_ROWS + 1,
                                  kernels.ONEDNN_MAX_ROWS])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("out_features", [1024, 1027])  # 1027: the C loop's last outputs
# 2048 wide, more than one row: the C loop walks four weight rows side by side, else one.
@pytest.mark.parametrize("in_features", [512, 2048])
def test_few_row_routes_match_f_linear(rows, with_bias, out_features, in_features):
    """Shapes that take the C loop or oneDNN (the others are F.linear itself)."""
    torch.manual_seed(rows)
    weight = torch.randn(out_features, in_features) / in_features ** 0.5
    bias = torch.randn(out_features) if with_bias else None
    x = torch.randn(1, rows, in_features)

    with torch.inference_mode():
        got = kernels.linear(x, weight, bias)
        want = F.linear(x, weight, bias)

    assert got.shape == want.shape == (1, rows, out_features)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_each_route_is_taken_where_it_should_be(monkeypatch):
    calls = []
    for name in ("_matvec", "_onednn_linear"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, real=real, name=name: calls.append(name) or real(*a))
    weight = torch.randn(1024, 512)

    with torch.inference_mode():
        kernels.linear(torch.randn(1, 512), weight)  # a matrix-vector product
        kernels.linear(torch.randn(1, 20, 512), weight)  # a few rows
        kernels.linear(torch.randn(600, 512), weight)  # a wide product: MKL
        kernels.linear(torch.randn(1, 512), weight.T.contiguous().T)  # strided: MKL
        kernels.linear(torch.randn(1, 512), torch.randn(64, 512))  # a small matrix: MKL
    has_c = kernels._matvec_kernel() is not None
    expected = (["_matvec"] if has_c else ["_onednn_linear"] if kernels.use_onednn else [])
    expected += ["_onednn_linear"] if kernels.use_onednn else []
    assert calls == expected


def test_the_c_loop_builds_where_a_compiler_is():
    if shutil.which("cc") or shutil.which("gcc"):
        assert kernels._matvec_kernel() is not None


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


def test_the_few_row_routes_under_torch_compile():
    """Under torch.compile both routes are opaque ops; the result is still F.linear's."""
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    weight, bias = torch.randn(1024, 512) / 512 ** 0.5, torch.randn(1024)
    compiled = torch.compile(kernels.linear, fullgraph=True)
    with torch.inference_mode():
        for rows in (1, kernels.MATVEC_MAX_ROWS + 1):
            x = torch.randn(rows, 512)
            torch.testing.assert_close(compiled(x, weight, bias), F.linear(x, weight, bias),
                                       rtol=1e-5, atol=1e-5)
