"""Matrix multiplications for the model's projections, by the fastest route PyTorch offers.

A decode step multiplies a few rows of activations by every weight matrix: a matrix-vector
product, bound by how fast the weights stream from memory, not by arithmetic. On x86 CPUs
F.linear sends it to MKL's gemv, which runs on one core (about 16 GB/s on this project's 2-core
machine); oneDNN's linear, the kernel torch.compile's CPU backend emits, spreads it over every
thread (22-29 GB/s there), and kvgen's own C loop (kvgen/csrc/matvec.c) does better again for
one to a few rows. For many rows, a prefill of hundreds of tokens, the product is bound by
arithmetic and MKL's gemm is the faster one. benchmarks/matvec_routes.py measures the routes.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import native

# oneDNN wins only where the weights stream from memory: for a small matrix, one that stays
# in cache, its higher per-call cost dominates (stories260K, dim 64, decodes 40% slower with it).
# And it wins only up to some rows: on GPT-2's layer shapes here it is 1.2-2x faster up to 96
# rows, even at 128 and slower at 512 (its classifier gains up to 256 rows and more). Wrong
# values cost speed, never correctness.
ONEDNN_MAX_ROWS = 96
ONEDNN_MIN_WEIGHT_ELEMENTS = 1 << 18  # 1 MiB of float32


def _find_onednn_linear():
    """Return oneDNN's linear op, or None where this PyTorch build has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_onednn_linear = _find_onednn_linear()
use_onednn = _onednn_linear is not None  # a switch for comparing routes


@torch.library.custom_op("kvgen::onednn_linear", mutates_args=())
def _onednn_linear_opaque(x: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear as an op torch.compile calls as it is: its own CPU backend would
    otherwise try to lower it and expects weights it packed itself."""
    return _onednn_linear(x.contiguous(), weight, bias, "none", [], "")


@_onednn_linear_opaque.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# Up to this many rows the C loop beats oneDNN on GPT-2's shapes here (each further row
# re-reads the weights from cache, not memory, but costs arithmetic oneDNN does better).
MATVEC_MAX_ROWS = 4


@functools.cache  # called on every projection of a decode step
def _matvec_kernel():
    """Return the C loop's ctypes function, or None where it cannot be built."""
    P, I64 = native.POINTER, native.INT64
    return native.function("matvec", "kvgen_matvec", (P, native.INT, I64, P, P, P, I64))


use_matvec = True  # a switch for comparing routes


@torch.compiler.assume_constant_result
def _matvec_available() -> bool:
    """Return whether the C loop is built (torch.compile asks once and keeps the answer)."""
    return _matvec_kernel() is not None


def _matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Return x @ weight.T + bias by the C loop (all fp32 and contiguous)."""
    n_out, n_in = weight.shape
    y = x.new_empty((*x.shape[:-1], n_out))
    _matvec_kernel()(x.data_ptr(), x.numel() // n_in, n_in, weight.data_ptr(),
                     None if bias is None else bias.data_ptr(), y.data_ptr(), n_out)
    return y


@torch.library.custom_op("kvgen::matvec", mutates_args=())
def _matvec_opaque(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """The C loop as an op torch.compile calls as it is (eager code calls _matvec directly:
    a custom op's dispatch costs more than the loop on a small matrix)."""
    return _matvec(x.contiguous(), weight, bias)


@_matvec_opaque.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Return x @ weight.T + bias, as F.linear does, by the faster route for x's shape."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.is_contiguous() and weight.numel() >= ONEDNN_MIN_WEIGHT_ELEMENTS
            and not torch.is_grad_enabled()):  # neither route below has a backward
        rows = x.numel() // x.shape[-1]
        if (use_matvec and rows <= MATVEC_MAX_ROWS and _matvec_available()
                and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))):
            if torch.compiler.is_compiling():
                return _matvec_opaque(x, weight, bias)
            return _matvec(x.contiguous(), weight, bias)
        if use_onednn and rows <= ONEDNN_MAX_ROWS:
            if torch.compiler.is_compiling():
                return _onednn_linear_opaque(x, weight, bias)
            return _onednn_linear(x.contiguous(), weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# GPT-2's tanh-approximated GELU, 0.5 x (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3),
# equals x sigmoid(2z), and PyTorch's CPU sigmoid is much cheaper than its tanh: on a prefill's
# [512, 3072] activations this form takes 2.1 ms against F.gelu's 4.3 (within 5e-7 of it).
# For a few rows the one fused F.gelu call is cheaper than the three calls here.
_GELU_SCALE = 2 * math.sqrt(2 / math.pi)
FAST_GELU_MIN_ELEMENTS = 1 << 16


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Return F.gelu(x, approximate="tanh"), by the cheaper route for x's size."""
    if x.numel() < FAST_GELU_MIN_ELEMENTS or torch.is_grad_enabled():
        return F.gelu(x, approximate="tanh")
    inner = torch.addcmul(x, x, x * x, value=0.044715)  # x + 0.044715 x^3
    return x * torch.sigmoid_(inner.mul_(_GELU_SCALE))


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose product goes through `linear`."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)
