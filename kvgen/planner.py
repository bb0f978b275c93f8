"""The planner: parameters, memory, FLOPs and time bounds of a model and a workload, from the
model's configuration alone (`kvgen.plan`, `kvgen plan`).

Conventions (see transformer_params for how FLOPs are counted):
- Generating n tokens with the cache: a prefill over the s prompt tokens yields the first token,
  then n - 1 decode steps run at positions s .. s+n-2 (the last token is never fed back).
  Without the cache, step t = 0 .. n-1 runs a forward over all s + t tokens.
- The workload's cache holds s + n tokens per sequence (the usual 2 x layers x batch x kv_heads x
  head_dim x (s + n) x bytes), at most `window` of them for a sliding-window model (a rolling
  buffer), rounded up to whole blocks for a paged cache. kvgen's own engine allocates s + n - 1
  slots per sequence (a ring of `window` slots when that is fewer): that is `engine_kv_bytes`.
- Memory budgets cover weights and the KV cache only: activations, workspace and fragmentation
  come on top. Under tensor parallelism, budgets and bounds are per device.
- Bytes moved by a step: every weight read once (a lookup table only for the rows looked up),
  every cached key and value attended to read once, the new ones written once.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KvgenError
from .hardware import Hardware, get_hardware, measure as measure_hardware, parse_bytes
from .presets import get_preset
from .transformer_params import (Arch, ParamCounts, Shard, arch_from_config, arch_from_hf,
                                 count_params, forward_flops, generation_flops, shard,
                                 tp_degrees)

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
               "float8": 1, "fp8": 1, "int8": 1}


@dataclass
class Workload:
    batch: int
    prompt_len: int
    new_tokens: int
    dtype: str  # of the weights
    kv_dtype: str
    block_size: int | None  # paged cache block, in tokens
    tp: int  # devices the model is split over


@dataclass
class Memory:
    weight_bytes: int
    kv_bytes_per_token: int  # one token of one sequence: all layers, K and V
    cache_tokens: int  # per sequence: s + n, capped at the window, rounded up to blocks
    kv_bytes_per_sequence: int
    kv_bytes: int  # the whole batch
    cache_to_weights: float
    engine_cache_tokens: int  # s + n - 1 (at most the window): what kvgen's generate allocates
    engine_kv_bytes: int


@dataclass
class Flops:
    prefill: int  # the whole batch, attention included
    prefill_attention: int
    decode_first: int  # the decode step at position s, whole batch
    decode_last: int  # the decode step at position s + n - 2
    cached_total: int  # prefill + n - 1 decode steps
    uncached_total: int  # n full forwards over s, s+1, ..., s+n-1 tokens
    uncached_over_cached: float


@dataclass
class Traffic:
    prefill_bytes: int  # per device
    prefill_intensity: float  # FLOPs per byte
    decode_last_bytes: int  # per device, the last (largest) decode step
    decode_last_intensity: float


@dataclass
class Bounds:
    hardware: str
    source: str
    peak_flops: float
    bandwidth: float
    ridge_intensity: float  # FLOPs per byte where compute time equals memory time
    prefill_s: float
    decode_last_step_s: float
    decode_s: float  # all n - 1 decode steps
    total_s: float
    decode_bound_by: str  # "memory" or "compute" for the last step; "none" without one
    uncached_s: float  # n full forwards over s, s+1, ..., s+n-1 tokens, each bounded alike

    @property
    def uncached_over_cached_s(self) -> float:
        """Return the time ratio the bounds predict (not the FLOP ratio)."""
        return self.uncached_s / self.total_s


@dataclass
class TensorParallel:
    devices: int
    kv_heads_per_device: int  # a KV head is replicated when there are fewer than devices
    weight_bytes_per_device: int
    kv_bytes_per_device: int
    smallest_fitting_devices: int | None  # under the memory budget; None without one or if none


@dataclass
class Fit:
    memory_bytes: int  # per device
    fits: bool
    max_batch: int  # sequences of cache_tokens that fit beside the weights
    max_context: int | None  # tokens per sequence at this batch; None: the window caps the cache


@dataclass
class Plan:
    model: str
    arch: Arch
    workload: Workload
    params: ParamCounts
    memory: Memory
    flops: Flops
    traffic: Traffic
    tensor_parallel: TensorParallel
    fit: Fit | None = None
    bounds: Bounds | None = None
    source: str = ""  # where a preset's figures come from
    published_params: float | None = None  # a preset's size as its publisher names it
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        """Return the plan as JSON."""
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=2)


def dtype_bytes(name: str) -> int:
    """Return the bytes per element of a dtype name."""
    if name not in DTYPE_BYTES:
        raise KvgenError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def cache_tokens(arch: Arch, tokens: int, block_size: int | None = None) -> int:
    """Return the token slots a sequence of `tokens` needs: at most the window, whole blocks."""
    if arch.sliding_window is not None:
        tokens = min(tokens, arch.sliding_window)
    return -(-tokens // block_size) * block_size if block_size else tokens


def kv_bytes(arch: Arch, *, batch: int, tokens: int, dtype: str = "float16",
             block_size: int | None = None, tp: int = 1) -> int:
    """Return the KV cache bytes (per device under tensor parallelism) for `batch` sequences of
    `tokens` tokens: 2 x layers x batch x kv heads x head_dim x slots x bytes."""
    kv_heads = shard(arch, tp).kv_heads
    slots = cache_tokens(arch, tokens, block_size)
    return 2 * arch.n_layers * batch * kv_heads * arch.head_dim * slots * dtype_bytes(dtype)


def resolve_model(model=None, preset: str | None = None) -> Arch:
    """Return the Arch of a path (config.json, a folder holding one, a llama2.c checkpoint or
    a folder holding one), a ModelConfig, a config.json dict, an Arch, or a preset name."""
    if (model is None) == (preset is None):
        raise KvgenError("give a model or a preset, not both and not neither")
    if preset is not None:
        return get_preset(preset).arch
    if isinstance(model, Arch):
        return model
    if isinstance(model, dict):
        return arch_from_hf(model, "config")
    if hasattr(model, "n_kv_heads"):  # a kvgen ModelConfig
        return arch_from_config(model, "config")
    return _arch_from_path(Path(model))


def _arch_from_path(path: Path) -> Arch:
    from .config import LLAMA2C_HEADER, config_from_llama2c_header
    from .llama2c import is_llama2c_checkpoint

    if path.is_dir():
        if (path / "config.json").exists():
            path = path / "config.json"
        else:
            found = [p for p in sorted(path.glob("*.bin")) if is_llama2c_checkpoint(p)]
            if len(found) != 1:
                raise KvgenError(f"{path}: expected a config.json or exactly one llama2.c "
                                 f"checkpoint (.bin), found {len(found)} checkpoints")
            path = found[0]
    if not path.is_file():
        raise KvgenError(f"model path {path} does not exist")
    if is_llama2c_checkpoint(path):
        with open(path, "rb") as f:
            cfg = config_from_llama2c_header(f.read(LLAMA2C_HEADER.size), path)
        return arch_from_config(cfg, str(path))
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KvgenError(f"{path} is neither a config.json nor a llama2.c checkpoint "
                         f"({e})") from None
    return arch_from_hf(raw, str(path))


def plan(model=None, *, preset: str | None = None, batch: int = 1, prompt_len: int = 512,
         new_tokens: int = 128, dtype: str = "float16", kv_dtype: str | None = None,
         memory=None, hardware: str | Hardware | None = None, measure: bool = False,
         tp: int = 1, block_size: int | None = None) -> Plan:
    """Return the Plan of a model (see resolve_model) running a workload.

    memory is a per-device budget ("80GB", "80GiB" or bytes); hardware a profile name from
    kvgen.hardware.HARDWARE or a Hardware, or measure=True to time this machine instead.
    """
    arch = resolve_model(model, preset)
    kv_dtype = kv_dtype or dtype
    for name, value in (("batch", batch), ("prompt_len", prompt_len),
                        ("new_tokens", new_tokens), ("tp", tp)):
        _check_positive(name, value)
    if block_size is not None:
        _check_positive("block_size", block_size)
    dtype_bytes(kv_dtype)  # refuse an unknown name before any work
    if hardware is not None and measure:
        raise KvgenError("give hardware or measure, not both")
    work = Workload(batch, prompt_len, new_tokens, dtype, kv_dtype, block_size, tp)
    budget = parse_bytes(memory) if memory is not None else None

    params = count_params(arch)
    memory_ = _memory(arch, params, work)
    parallel = _tensor_parallel(arch, work, memory_.cache_tokens, budget)
    profile = get_hardware(hardware) if isinstance(hardware, str) else hardware
    if measure:
        profile = measure_hardware()
    traffic, bounds = _traffic_and_bounds(arch, work, profile)
    result = Plan(arch.name, arch, work, params, memory_, _flops(arch, work), traffic, parallel,
                  bounds=bounds)

    if preset is not None:
        chosen = get_preset(preset)
        result.source, result.published_params = chosen.source, chosen.published
    if budget is not None:
        per_token = kv_bytes(arch, batch=1, tokens=1, dtype=kv_dtype, tp=tp)
        result.fit = _fit(arch, work, budget, parallel.weight_bytes_per_device, per_token,
                          memory_.cache_tokens)
    if prompt_len + new_tokens > arch.max_context:
        result.notes.append(f"prompt + new tokens ({prompt_len + new_tokens}) exceed the "
                            f"model's context of {arch.max_context} tokens")
    return result


def _check_positive(name: str, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise KvgenError(f"{name} must be a positive integer, got {value!r}")


def _memory(arch: Arch, params: ParamCounts, w: Workload) -> Memory:
    weights = params.total * dtype_bytes(w.dtype)
    per_token = kv_bytes(arch, batch=1, tokens=1, dtype=w.kv_dtype)
    tokens = cache_tokens(arch, w.prompt_len + w.new_tokens, w.block_size)
    engine_tokens = cache_tokens(arch, w.prompt_len + w.new_tokens - 1)
    return Memory(weights, per_token, tokens, per_token * tokens, w.batch * per_token * tokens,
                  w.batch * per_token * tokens / weights, engine_tokens,
                  w.batch * per_token * engine_tokens)


def _flops(arch: Arch, w: Workload) -> Flops:
    b, s, n = w.batch, w.prompt_len, w.new_tokens
    matmul, attention = forward_flops(arch, start=0, tokens=s)
    cached = generation_flops(arch, s, n, cached=True)
    uncached = generation_flops(arch, s, n, cached=False)
    decode = [b * sum(forward_flops(arch, start=p, tokens=1)) for p in (s, s + n - 2)]
    return Flops(
        prefill=b * (matmul + attention), prefill_attention=b * attention,
        decode_first=decode[0] if n > 1 else 0, decode_last=decode[1] if n > 1 else 0,
        cached_total=b * cached, uncached_total=b * uncached,
        uncached_over_cached=uncached / cached)


def _tensor_parallel(arch: Arch, w: Workload, tokens: int, budget: int | None):
    device = shard(arch, w.tp)
    per_token = kv_bytes(arch, batch=1, tokens=1, dtype=w.kv_dtype, tp=w.tp)
    smallest = None if budget is None else _smallest_tp(
        arch, budget, dtype_bytes(w.dtype), w.batch * tokens, w.kv_dtype)
    return TensorParallel(w.tp, device.kv_heads, device.params * dtype_bytes(w.dtype),
                          w.batch * per_token * tokens, smallest)


def _step_bytes(device: Shard, b: int, wbytes: int, per_token: int, read: int,
                written: int) -> int:
    """Return one device's bytes moved by a forward that reads `read` and writes `written`
    cached tokens per sequence: weights once (lookup tables: b rows each), then the cache."""
    weights = (device.params - device.table_params + b * device.table_rows) * wbytes
    return weights + b * per_token * (read + written)


def _traffic_and_bounds(arch: Arch, w: Workload, profile: Hardware | None):
    s, n, b, window = w.prompt_len, w.new_tokens, w.batch, arch.sliding_window
    device, wbytes = shard(arch, w.tp), dtype_bytes(w.dtype)
    per_token = kv_bytes(arch, batch=1, tokens=1, dtype=w.kv_dtype, tp=w.tp)
    prefill_flops = b * sum(forward_flops(arch, start=0, tokens=s, tp=w.tp))
    prefill_bytes = _step_bytes(device, b, wbytes, per_token, 0, min(s, window or s))
    # A one-token step costs a fixed part plus a part per key it attends to.
    fixed, per_key = forward_flops(arch, start=0, tokens=1, tp=w.tp)
    steps = []  # (flops, bytes) of each decode step, positions s .. s+n-2, on one device
    for p in range(s, s + n - 1):
        keys = min(p + 1, window or p + 1)
        steps.append((b * (fixed + per_key * keys),
                      _step_bytes(device, b, wbytes, per_token, keys, 1)))
    last_flops, last_bytes = steps[-1] if steps else (0, 0)
    traffic = Traffic(prefill_bytes, prefill_flops / prefill_bytes, last_bytes,
                      last_flops / last_bytes if last_bytes else 0.0)
    if profile is None:
        return traffic, None

    def seconds(flops, moved):
        return max(flops / profile.peak_flops, moved / profile.bandwidth)

    prefill_s = seconds(prefill_flops, prefill_bytes)
    decode_s = sum(seconds(f, m) for f, m in steps)
    # Without a cache each step reads the weights once and computes every position: at batch 1
    # the cached steps are bound by memory and these by arithmetic, which is why the time ratio
    # is far below the FLOP ratio there.
    weights_only = _step_bytes(device, b, wbytes, per_token, 0, 0)
    uncached_s = sum(seconds(b * sum(forward_flops(arch, start=0, tokens=length, tp=w.tp)),
                             weights_only) for length in range(s, s + n))
    memory_bound = last_bytes / profile.bandwidth >= last_flops / profile.peak_flops
    bound_by = ("memory" if memory_bound else "compute") if steps else "none"
    return traffic, Bounds(
        profile.name, profile.source, profile.peak_flops, profile.bandwidth,
        profile.peak_flops / profile.bandwidth, prefill_s, seconds(last_flops, last_bytes),
        decode_s, prefill_s + decode_s, bound_by, uncached_s)


def _fit(arch: Arch, w: Workload, budget: int, weight_bytes: int, per_token: int,
         tokens: int) -> Fit:
    free = budget - weight_bytes
    if free < 0:
        return Fit(budget, False, 0, 0)
    max_context = free // (w.batch * per_token)
    if w.block_size:
        max_context = max_context // w.block_size * w.block_size
    window = arch.sliding_window
    if window is not None and cache_tokens(arch, window, w.block_size) <= max_context:
        max_context = None  # the cache stops growing at the window, and that much fits
    return Fit(budget, w.batch * per_token * tokens <= free, free // (per_token * tokens),
               max_context)


def _smallest_tp(arch, budget, wbytes, slots, kv_dtype) -> int | None:
    """Return the fewest devices whose per-device weights and cache (`slots` token slots over
    the batch) fit the budget, or None."""
    for n in tp_degrees(arch):
        per_device = shard(arch, n).params * wbytes
        per_device += kv_bytes(arch, batch=1, tokens=1, dtype=kv_dtype, tp=n) * slots
        if per_device <= budget:
            return n
    return None


def plot_plan(p: Plan, path) -> Path:
    """Return the path of a PNG written there: weight and KV cache memory against context
    length (at the plan's batch) and against batch size (at its cache tokens), with the point
    where the cache outgrows the weights marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise KvgenError("plotting needs matplotlib (pip install matplotlib)") from None
    a, m, w, gb = p.arch, p.memory, p.workload, 1e9
    per_context = w.batch * m.kv_bytes_per_token  # cache bytes per token of context
    cross_context = -(-m.weight_bytes // per_context)
    if cache_tokens(a, cross_context, w.block_size) < cross_context:
        cross_context = None  # the window stops the cache before it reaches the weights
    top = max(a.max_context, w.prompt_len + w.new_tokens, int(1.25 * (cross_context or 0)))
    contexts = range(1, top + 1, max(1, top // 300))
    cross_batch = -(-m.weight_bytes // m.kv_bytes_per_sequence)
    batches = range(1, max(2 * cross_batch, 2 * w.batch) + 1, max(1, cross_batch // 150))

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(contexts, [per_context * cache_tokens(a, t, w.block_size) / gb for t in contexts],
              label=f"KV cache, batch {w.batch}")
    left.axvline(a.max_context, color="gray", linestyle=":", label="model's context")
    if cross_context:
        left.axvline(cross_context, color="red", linestyle="--",
                     label=f"cache = weights at {cross_context:,} tokens")
    left.plot([w.prompt_len + w.new_tokens], [m.kv_bytes / gb], "o", label="this workload")
    left.set_xlabel("context length (tokens per sequence)")
    right.plot(batches, [b * m.kv_bytes_per_sequence / gb for b in batches],
               label=f"KV cache, {m.cache_tokens:,} tokens each")
    right.axvline(cross_batch, color="red", linestyle="--",
                  label=f"cache = weights at batch {cross_batch:,}")
    right.plot([w.batch], [m.kv_bytes / gb], "o", label="this workload")
    right.set_xlabel("batch size (sequences)")
    for ax in (left, right):
        ax.axhline(m.weight_bytes / gb, color="black", label=f"weights ({w.dtype})")
        if p.fit is not None and w.tp == 1:  # a per-device budget is not comparable at tp > 1
            ax.axhline(p.fit.memory_bytes / gb, color="green", linestyle="-.",
                       label="memory budget")
        ax.set_ylabel("GB (1e9 bytes)")
        ax.legend(fontsize="small")
    fig.suptitle(f"{a.name}: KV cache ({w.kv_dtype}) and weights")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
