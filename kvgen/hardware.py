"""Hardware profiles (peak FLOP/s and memory bandwidth), measured or from vendor datasheets,
and the sizes people write for memory ("80GB", "24GiB").

A profile's FLOP/s is the dense (no structured sparsity) 16-bit matrix peak: datasheets quote
the sparse figure, twice as large, with a footnote. fp8 peaks are higher still, so a bound
computed for fp8 compute from these figures is not a lower bound.
"""

import logging
import re
import time
from dataclasses import dataclass

from .errors import KvgenError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # FLOP/s
    bandwidth: float  # bytes/s read from device memory
    source: str


HARDWARE = {h.name: h for h in [
    # NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16/FP16
    # Tensor Core 312 TFLOPS (624 with sparsity); 1,555 GB/s (40GB SXM), 2,039 GB/s (80GB SXM).
    Hardware("a100-40gb-sxm", 312e12, 1555e9, "NVIDIA A100 datasheet"),
    Hardware("a100-80gb-sxm", 312e12, 2039e9, "NVIDIA A100 datasheet"),
    # NVIDIA H100 datasheet: BF16/FP16 Tensor Core 1,979 TFLOPS (SXM) and 1,513 (PCIe), both
    # "with sparsity", so half dense; 3.35 TB/s (SXM), 2 TB/s (PCIe).
    Hardware("h100-sxm", 989.5e12, 3350e9, "NVIDIA H100 datasheet (1,979 TFLOPS sparse / 2)"),
    Hardware("h100-pcie", 756.5e12, 2000e9, "NVIDIA H100 datasheet (1,513 TFLOPS sparse / 2)"),
    # NVIDIA H200 datasheet: the H100's compute (1,979 TFLOPS with sparsity), 4.8 TB/s.
    Hardware("h200-sxm", 989.5e12, 4800e9, "NVIDIA H200 datasheet (1,979 TFLOPS sparse / 2)"),
    # NVIDIA Ada GPU architecture whitepaper, GeForce RTX 4090: FP16/BF16 tensor with FP32
    # accumulate 165.2 TFLOPS dense (FP16 accumulate: 330.3); 1,008 GB/s GDDR6X.
    Hardware("rtx-4090", 165.2e12, 1008e9,
             "NVIDIA Ada architecture whitepaper (FP32 accumulate; FP16 accumulate is 330.3)"),
]}


def get_hardware(name: str) -> Hardware:
    """Return the named hardware profile, or raise KvgenError listing the known names."""
    if name not in HARDWARE:
        raise KvgenError(f"unknown hardware {name!r}; known profiles: {', '.join(HARDWARE)}")
    return HARDWARE[name]


def measure(matmul_size: int = 2048, read_mb: int = 256, repeats: int = 3) -> Hardware:
    """Return this machine's profile: float32 matrix-multiply FLOP/s and memory read bytes/s,
    each the best of a few timed runs of torch on the CPU (a second or two)."""
    import torch

    a = torch.randn(matmul_size, matmul_size)
    b = torch.randn(matmul_size, matmul_size)
    flops = 2 * matmul_size ** 3 / _best_time(lambda: torch.mm(a, b), repeats)
    # A sum reads every byte once and writes nothing worth counting.
    big = torch.ones(read_mb * 2 ** 20 // 4)
    bandwidth = big.nbytes / _best_time(lambda: big.sum(), repeats)
    log.info("measured %.1f GFLOP/s (float32 %d^3 matmul), %.1f GB/s (sum over %d MiB)",
             flops / 1e9, matmul_size, bandwidth / 1e9, read_mb)
    return Hardware("this machine (measured)", flops, bandwidth,
                    f"torch: float32 {matmul_size}x{matmul_size} matmul and a {read_mb} MiB "
                    f"sum, best of {repeats}")


def describe_machine() -> dict:
    """Return what a benchmark ran on: CPU model, cores, memory, OS, Python and torch."""
    import os
    import platform

    import torch

    def first_field(path, key):
        try:
            with open(path) as f:
                return next((line.split(":", 1)[1].strip() for line in f
                             if line.startswith(key)), None)
        except OSError:
            return None

    memory_kb = first_field("/proc/meminfo", "MemTotal")
    return dict(cpu=first_field("/proc/cpuinfo", "model name") or platform.processor(),
                logical_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                memory_bytes=int(memory_kb.split()[0]) * 1024 if memory_kb else None,
                os=platform.platform(), python=platform.python_version(),
                torch=torch.__version__)


def _best_time(run, repeats: int) -> float:
    run()  # the first call pays for allocation and thread start-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text, name: str = "memory") -> int:
    """Return a size in bytes from "80GB" (80e9), "80GiB" (80 * 2**30), "1.5TB" or "123456";
    name is the setting the errors speak of."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise KvgenError(f"{name} {text!r} is not a size; expected a number of bytes or "
                             f"one with a unit, like 80GB (80e9) or 80GiB (80 * 2**30)")
        size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise KvgenError(f"{name} must be positive, got {text!r}")
    return size
