"""kvgen's C kernels (kvgen/csrc), built on first use with the system's C compiler and loaded
through ctypes.

Why C at all: two hot loops have no fast route in PyTorch on the CPU. Attention that reads keys
through a block table (PyTorch's kernels take contiguous keys, so the pool would be copied
first), and a product of a few activation rows with a weight matrix that streams the weights at
the machine's read bandwidth (see kernels.py). Each file includes no PyTorch header, so a build
takes a second or two, and is kept in ~/.cache/kvgen for the next process.

Threads: the files use OpenMP, and are linked against libgomp by its usual name, which the
dynamic linker resolves to the copy PyTorch has already loaded: the kernels share PyTorch's
thread pool and its thread count (torch.set_num_threads), rather than starting threads of their
own for every call.

Without a compiler (or where a build fails) load() returns None, logged once, and callers take
their PyTorch route.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("csrc")
# -march=native: built on the machine that runs it. The math flags let gcc vectorize sums
# (reordering them, as any parallel kernel does); -ffast-math itself is avoided because a
# shared library built with it switches the whole process's floats to flush-to-zero.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC"]

_loaded: dict[str, object] = {}  # name -> CDLL, or False once building it failed


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "kvgen"


def _cpu() -> str:
    """Return what identifies this CPU's instruction set (-march=native builds for it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(name: str, compiler: str) -> Path:
    """Return the path of csrc/{name}.c compiled, building it unless a build of this source,
    with these flags, for this CPU is already in the cache."""
    source = SOURCES / f"{name}.c"
    key = hashlib.sha256(source.read_bytes() + " ".join([compiler, *FLAGS, _cpu()]).encode())
    try:
        directory = _cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.gettempdir())
    target = directory / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target

    # Built under a temporary name and renamed, so that a concurrent process never loads a
    # half-written file.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        log.info("building %s with %s", source.name, compiler)
        subprocess.run([compiler, *FLAGS, "-o", partial, str(source), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load(name: str):
    """Return csrc/{name}.c as a loaded ctypes library, or None where it cannot be built."""
    if name not in _loaded:
        import torch  # noqa: F401  (loaded first, so that its libgomp is the one we bind to)

        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        # One warning per process: the second kernel fails for the reason the first did.
        warn = log.warning if all(_loaded.values()) else log.info
        if compiler is None:
            warn("no C compiler found: kvgen's C kernels (%s) are off, and slower PyTorch "
                 "routes take their place; install gcc to have them", name)
            _loaded[name] = False
        else:
            try:
                _loaded[name] = ctypes.CDLL(str(_build(name, compiler)))
            except (OSError, subprocess.SubprocessError) as e:
                warn("building kvgen's C kernel %s failed, a slower PyTorch route takes its "
                     "place: %s", name, getattr(e, "stderr", "") or e)
                _loaded[name] = False
    return _loaded[name] or None


# Argument types for function(): pointers are passed as tensor.data_ptr() integers.
POINTER, INT, INT64, FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float


@functools.cache
def function(name: str, symbol: str, argtypes: tuple, restype=None):
    """Return csrc/{name}.c's function `symbol` with its C signature declared, or None where
    the file cannot be built."""
    library = load(name)
    if library is None:
        return None
    fn = getattr(library, symbol)
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn
