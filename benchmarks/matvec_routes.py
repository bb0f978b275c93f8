"""Bytes/s of every matrix-vector route PyTorch offers, and kvgen's own, at batch 1.

    python benchmarks/matvec_routes.py [--threads N] [--json FILE]

A decode step at batch 1 multiplies one activation row by every weight matrix, so its speed is
the rate at which a route streams weights from memory. The matrices are GPT-2-124M's: the four
projections of all 12 layers (340 MB in float32, more than any CPU cache holds, so they stream
from memory as in a real decode step) and the 50257 x 768 classifier. Routes:

  F.linear(x, W)      W stored [out, in], PyTorch's default (MKL gemv on x86 CPUs)
  torch.mv(W, x)      the same layout through the matrix-vector entry point
  x @ Wt              W stored transposed, [in, out]
  oneDNN linear       torch.ops.mkldnn._linear_pointwise on [out, in]
  kvgen C matvec      kvgen/csrc/matvec.c on [out, in], float32 only (kvgen's decode route)
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from kvgen import kernels
from kvgen.hardware import describe_machine, measure as measure_machine

LAYER_SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12  # out, in
CLASSIFIER = [(50257, 768)]


def _onednn(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _c_matvec(x, w):
    if w.dtype != torch.float32 or kernels._matvec_kernel() is None:
        raise RuntimeError("the C loop takes float32 only, and needs a C compiler")
    return kernels._matvec(x, w, None)


ROUTES = {  # name: (weight layout, product of x [1, in] and the stored weight)
    "F.linear": ("[out, in]", lambda x, w: F.linear(x, w)),
    "torch.mv": ("[out, in]", lambda x, w: torch.mv(w, x[0])),
    "x @ Wt": ("[in, out]", lambda x, wt: x @ wt),
    "oneDNN linear": ("[out, in]", _onednn),
    "kvgen C matvec": ("[out, in]", _c_matvec),
}


def measure(shapes, dtype, route, repeats: int = 5) -> float:
    """Return bytes/s: the weights' bytes over the median time of one pass over all of them."""
    layout, product = ROUTES[route]
    torch.manual_seed(0)
    weights = [torch.randn(out_f, in_f).to(dtype) for out_f, in_f in shapes]
    if layout == "[in, out]":
        weights = [w.T.contiguous() for w in weights]
    inputs = {in_f: torch.randn(1, in_f).to(dtype) for _, in_f in shapes}
    in_of = (lambda w: w.shape[0]) if layout == "[in, out]" else (lambda w: w.shape[1])

    def one_pass():
        for w in weights:
            product(inputs[in_of(w)], w)

    one_pass()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return sum(w.nbytes for w in weights) / sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for route, (layout, _) in ROUTES.items():
            for matrices, shapes in (("12 layers", LAYER_SHAPES), ("classifier", CLASSIFIER)):
                try:
                    rate = measure(shapes, dtype, route)
                except RuntimeError as e:  # a route this build lacks for this dtype
                    rate, note = None, str(e).splitlines()[0]
                else:
                    note = ""
                results.append(dict(dtype=str(dtype).removeprefix("torch."), route=route,
                                    layout=layout, matrices=matrices, bytes_per_s=rate,
                                    note=note))
                shown = "failed: " + note if rate is None else f"{rate / 1e9:6.1f} GB/s"
                print(f"{results[-1]['dtype']:>9}  {route:<14} {layout:<10} {matrices:<11} "
                      f"{shown}", flush=True)

    bandwidth = measure_machine().bandwidth
    print(f"read bandwidth (kvgen.hardware.measure): {bandwidth / 1e9:.1f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=describe_machine(), read_bandwidth_bytes_per_s=bandwidth,
                           routes=results), f, indent=2)


if __name__ == "__main__":
    main()
