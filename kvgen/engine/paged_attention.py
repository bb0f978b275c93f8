"""Attention that reads keys and values in place from the block pool (the C kernel in
paged_attention.c), built on first use with the system's C compiler and called through ctypes.

Without a compiler, or for tensors the kernel does not take (not fp32, not on the CPU), the
engine falls back to gathering each row's keys into a contiguous copy (PagedBatchView).
"""

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_attention.c")
# -march=native: built on the machine that runs it. The math flags let gcc vectorize the dot
# products' sums (reordering them); -ffast-math is avoided because a shared library built with
# it switches the whole process's floats to flush-to-zero when loaded.
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
          "-fno-trapping-math", "-shared", "-fPIC", "-pthread"]
_MAX_HEAD_DIM, _MAX_BLOCK = 512, 1024  # the C file's fixed buffers

_library = None  # the loaded kernel, False once building it failed


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "kvgen"


def _build(compiler: str) -> Path:
    """Return the path of the compiled library, building it unless a build of this source
    with these flags for this machine is already in the cache."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler] + _FLAGS).encode()
                         + platform.processor().encode() + _cpu_model().encode()).hexdigest()
    try:
        directory = _cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.gettempdir())
    target = directory / f"paged_attention-{key[:16]}.so"
    if target.exists():
        return target

    # Built under a temporary name and renamed, so that a concurrent process never loads a
    # half-written file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, "-o", partial, str(_SOURCE), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return ""


def load():
    """Return the kernel's ctypes function, or None where it cannot be built here."""
    global _library
    if _library is None:
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            log.warning("no C compiler found: the engine's attention gathers keys into a copy "
                        "(slower); install gcc for in-place paged attention")
            _library = False
        else:
            try:
                _library = ctypes.CDLL(str(_build(compiler)))
            except (OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", "") or e
                log.warning("building the paged-attention kernel failed (%s); the engine's "
                            "attention gathers keys into a copy instead", detail)
                _library = False
    if not _library:
        return None
    fn = _library.kvgen_paged_attention
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i32, ptr, ptr, ptr, i64, i32, i32, i32,
                   i32, ctypes.c_float, i32]
    fn.restype = i32
    return fn


def supports(dtype: torch.dtype, device, head_dim: int, block_size: int) -> bool:
    """Return whether the kernel takes this pool (and can be built here)."""
    return (dtype == torch.float32 and torch.device(device).type == "cpu"
            and head_dim <= _MAX_HEAD_DIM and block_size <= _MAX_BLOCK and load() is not None)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    tables: torch.Tensor, token_table: torch.Tensor, n_keys: torch.Tensor,
                    block_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Return attention outputs [n_tokens, n_heads, head_dim] for queries q [n_tokens, n_heads,
    head_dim] (any strides but the last), each token attending to keys 0..n_keys-1 of its
    sequence, whose blocks are tables[token_table[token]].

    k_pool, v_pool: one layer's pool [n_kv_heads, n_slots, head_dim], contiguous. tables,
    token_table and n_keys are int32 and contiguous. The scale is 1/sqrt(head_dim), as
    scaled_dot_product_attention's. out, if given, is written instead of a new tensor
    (contiguous, of the result's shape).
    """
    fn = load()
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads, n_slots, _ = k_pool.shape
    assert q.stride(2) == 1 and k_pool.is_contiguous() and v_pool.is_contiguous()
    assert tables.dtype == token_table.dtype == n_keys.dtype == torch.int32
    if out is None:
        out = torch.empty(n_tokens, n_heads, head_dim, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.is_contiguous()
    assert tables.is_contiguous() and token_table.is_contiguous() and n_keys.is_contiguous()
    status = fn(q.data_ptr(), q.stride(0), q.stride(1), k_pool.data_ptr(), v_pool.data_ptr(),
                n_slots, tables.data_ptr(), tables.shape[1], token_table.data_ptr(),
                n_keys.data_ptr(), out.data_ptr(), n_tokens, n_heads, n_kv_heads, head_dim,
                block_size, head_dim ** -0.5, torch.get_num_threads())
    if status != 0:
        raise ValueError(f"paged attention kernel refused head_dim {head_dim} or block_size "
                         f"{block_size} (at most {_MAX_HEAD_DIM} and {_MAX_BLOCK})")
    return out
