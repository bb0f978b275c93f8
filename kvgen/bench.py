"""`kvgen bench`: one workload through kvgen with and without its cache, and through Hugging Face
transformers' generate with and without its cache when transformers is installed, in one process
and one run, with the planner's predictions beside the measurements.

Every engine generates exactly new_tokens tokens (stop tokens are ignored), from the same random
prompts of prompt_len tokens, greedily. Step times are taken at each token an engine hands back:
step 0 is the prefill (time to first token), step i > 0 the decode step at position s + i - 1.
"""

import dataclasses
import logging
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import KvgenError
from .generate import GenerationStats, TextStream
from .llm import LLM, load
from .sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

SHAPES = {
    # GPT-2 124M's published shape (Radford et al. 2019; Hugging Face "gpt2" config.json).
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
    # A small GPT-2-shaped model, for quick runs and tests.
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=256),
}

UNCACHED_WARMUP_TOKENS = 8
ENGINES = ("kvgen cache", "kvgen no-cache", "kvgen cache compiled", "transformers cache",
           "transformers no-cache")


@dataclass
class Run:
    engine: str
    batch: int
    ttft_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    total_s: float
    step_s: list[float] = field(repr=False)  # step i's latency, i = 0 the prefill
    kv_cache_bytes: int | None = None  # kvgen's, measured; None for transformers
    warmup_s: float = 0.0  # the untimed first run (with --compile: the compilation)


@dataclass
class Prediction:
    batch: int
    kv_cache_bytes: int  # the planner's engine_kv_bytes
    flops_uncached_over_cached: float
    bound_uncached_over_cached: float  # the planner's time bounds' ratio on this machine
    decode_step_bytes: int  # weights plus the cache read by the last decode step
    decode_step_lower_bound_s: float  # those bytes over this machine's read bandwidth


@dataclass
class BenchReport:
    model: str
    prompt_len: int
    new_tokens: int
    repeats: int
    threads: int
    bandwidth_bytes_per_s: float
    matmul_flops_per_s: float
    runs: list[Run]
    predictions: list[Prediction]
    notes: list[str]
    machine: dict = field(default_factory=dict)  # hardware.describe_machine()

    def ratios(self) -> list[dict]:
        """Return, per batch size, the measured ratios between engines beside the predictions."""
        out = []
        for pred in self.predictions:
            by_engine = {r.engine: r for r in self.runs if r.batch == pred.batch}
            cached, uncached = by_engine.get("kvgen cache"), by_engine.get("kvgen no-cache")
            hf_cached = by_engine.get("transformers cache")
            compiled = by_engine.get("kvgen cache compiled")
            row = {"batch": pred.batch}
            if cached and uncached:
                row["kvgen uncached/cached time"] = uncached.total_s / cached.total_s
                row["planner FLOP ratio"] = pred.flops_uncached_over_cached
                row["planner time-bound ratio"] = pred.bound_uncached_over_cached
            if cached and hf_cached:
                row["decode tokens/s kvgen/transformers"] = (cached.decode_tokens_per_s
                                                             / hf_cached.decode_tokens_per_s)
                row["prefill tokens/s kvgen/transformers"] = (cached.prefill_tokens_per_s
                                                              / hf_cached.prefill_tokens_per_s)
            if compiled and hf_cached:
                row["decode tokens/s kvgen compiled/transformers"] = (
                    compiled.decode_tokens_per_s / hf_cached.decode_tokens_per_s)
            for run, label in ((cached, ""), (compiled, " (compiled)")):
                if run is None:
                    continue
                step = statistics.median(run.step_s[1:]) if len(run.step_s) > 1 else 0
                row[f"kvgen decode step / lower bound{label}"] = (
                    step / pred.decode_step_lower_bound_s if step else 0.0)
                row[f"achieved fraction of read bandwidth{label}"] = (
                    pred.decode_step_lower_bound_s / step if step else 0.0)
            out.append(row)
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"ratios": self.ratios()}


def bench(model=None, *, shape: str | None = None, batches=(1,), prompt_len: int = 32,
          new_tokens: int = 64, repeats: int = 3, engines=None, compile: bool = False,
          progress=None) -> BenchReport:
    """Return a BenchReport for a model directory or llama2.c checkpoint (or a random model of
    a named shape). compile adds kvgen's cached engine with torch.compile'd decode steps."""
    from . import hardware, planner

    if (model is None) == (shape is None):
        raise KvgenError("bench needs exactly one of a model path or --shape")
    unknown = set(engines or []) - set(ENGINES)
    if unknown:  # before loading anything
        raise KvgenError(f"unknown engine(s) {sorted(unknown)}; known: {', '.join(ENGINES)}")
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens),
                        ("repeats", repeats), *(("batch", b) for b in batches)):
        if not isinstance(value, int) or value < 1:
            raise KvgenError(f"{name} must be a positive integer, got {value!r}")

    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            folder = _random_model(shape, Path(tmp))
            llm = load(folder)
        else:
            llm = load(model)  # checks the model as `kvgen generate` does
            folder = Path(model)
            if folder.is_file():  # a llama2.c checkpoint: transformers reads the HF layout
                from .convert import convert_llama2c
                folder = convert_llama2c(model, Path(tmp) / "hf")
        llm.stop_token_ids = set()  # every engine generates exactly new_tokens tokens
        if prompt_len + new_tokens > llm.config.max_seq_len:
            raise KvgenError(f"prompt_len {prompt_len} + new_tokens {new_tokens} is over the "
                             f"model's context of {llm.config.max_seq_len}")
        hf, notes = _transformers_model(folder)
        machine = hardware.measure()

        # Each runner takes (prompts, new tokens).
        runners = {"kvgen cache": lambda p, n: _run_kvgen(llm, p, n, True),
                   "kvgen no-cache": lambda p, n: _run_kvgen(llm, p, n, False)}
        if compile or "kvgen cache compiled" in (engines or []):
            compiled = LLM(llm.model, None, stop_token_ids=set(), source=llm.source)
            compiled.compile_decode()
            runners["kvgen cache compiled"] = lambda p, n: _run_kvgen(compiled, p, n, True)
        if hf is not None:
            runners["transformers cache"] = lambda p, n: _run_hf(hf, p, n, True)
            runners["transformers no-cache"] = lambda p, n: _run_hf(hf, p, n, False)
        if engines:
            unknown = set(engines) - set(runners)
            if unknown:
                raise KvgenError(f"unavailable engine(s) {sorted(unknown)} (is transformers "
                                 f"installed?); available: {', '.join(runners)}")
            runners = {k: v for k, v in runners.items() if k in engines}

        runs, predictions = [], []
        for batch in batches:
            prompts = torch.randint(0, llm.config.vocab_size, (batch, prompt_len),
                                    generator=torch.Generator().manual_seed(batch))
            warmup_s = {}
            for name, runner in runners.items():
                if progress:
                    progress(f"{name}, batch {batch}: warm-up")
                # First-call allocations (and compilation) are reported apart. A cached engine
                # warms up over every decode position (a compiled step may specialise on the
                # first few); an uncached one has nothing to compile and each of its steps is
                # a new shape anyway, so a few steps do (a full one took 10 minutes at batch 16).
                warmup_start = time.perf_counter()
                warmup_tokens = new_tokens if "no-cache" not in name else min(
                    new_tokens, UNCACHED_WARMUP_TOKENS)
                runner(prompts[:, :2], warmup_tokens)
                warmup_s[name] = time.perf_counter() - warmup_start
            # Repeats go round the engines in turn, so that a slow spell of a shared machine
            # falls on all of them rather than on whichever ran then.
            measured = {name: [] for name in runners}
            for repeat in range(repeats):
                for name, runner in runners.items():
                    if progress:
                        progress(f"{name}, batch {batch}: run {repeat + 1} of {repeats}")
                    measured[name].append(runner(prompts, new_tokens))
            for name, batch_runs in measured.items():
                runs.append(_median_run(name, batch, batch_runs))
                runs[-1].warmup_s = warmup_s[name]
            p = planner.plan(llm.config, batch=batch, prompt_len=prompt_len,
                             new_tokens=new_tokens, dtype="float32", hardware=machine)
            step_bytes = p.traffic.decode_last_bytes
            predictions.append(Prediction(
                batch, p.memory.engine_kv_bytes, p.flops.uncached_over_cached,
                p.bounds.uncached_over_cached_s, step_bytes,
                step_bytes / machine.bandwidth))

    notes.append(f"process peak resident memory {_peak_rss()} bytes (all engines together: "
                 "per-engine peaks on the CPU are not separable in one process)")
    return BenchReport(str(model or f"random {shape}"), prompt_len, new_tokens, repeats,
                       torch.get_num_threads(), machine.bandwidth, machine.peak_flops, runs,
                       predictions, notes, hardware.describe_machine())


def _random_model(shape: str, folder: Path) -> Path:
    """Write a randomly initialised GPT-2-shaped Hugging Face model into folder."""
    if shape not in SHAPES:
        raise KvgenError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    try:
        import transformers
    except ImportError:
        raise KvgenError("--shape needs transformers to build the random model "
                         "(pip install transformers)") from None
    torch.manual_seed(0)
    config = transformers.GPT2Config(**SHAPES[shape])
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def _transformers_model(folder: Path):
    try:
        import transformers
    except ImportError:
        return None, ["transformers is not installed: its engines were skipped"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), []


def _run_kvgen(llm: LLM, prompts: torch.Tensor, new_tokens: int, use_cache: bool) -> Run:
    batch = prompts.shape[0]
    params = SamplingParams(temperature=0)
    stats = GenerationStats()
    from .generate import generate_steps

    steps = generate_steps(llm.model, prompts.tolist(), max_new_tokens=new_tokens,
                           use_cache=use_cache, samplers=[Sampler(params)] * batch,
                           stop_token_ids=set(), stats=stats,
                           texts=[TextStream(_Silent(), []) for _ in range(batch)],
                           decode_model=llm.decode_model)
    start = time.perf_counter()
    marks = [time.perf_counter() for _ in steps]
    name = "kvgen cache" if use_cache else "kvgen no-cache"
    if llm.decode_model is not None:
        name += " compiled"
    return _run_from_marks(name, batch, prompts.shape[1], start, marks, stats.kv_cache_bytes)


class _Silent:
    """Detokenizer stand-in: the benchmark measures tokens, not text."""

    def add(self, token_id):
        return ""

    def flush(self):
        return ""


def _run_hf(model, prompts: torch.Tensor, new_tokens: int, use_cache: bool) -> Run:
    import transformers

    marks = []

    class Clock(transformers.LogitsProcessor):
        """Notes the time each step's logits arrive: one call per generated token."""

        def __call__(self, input_ids, scores):
            marks.append(time.perf_counter())
            return scores

    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                       pad_token_id=0, use_cache=use_cache,
                       logits_processor=transformers.LogitsProcessorList([Clock()]))
    name = "transformers cache" if use_cache else "transformers no-cache"
    return _run_from_marks(name, prompts.shape[0], prompts.shape[1], start, marks, None)


def _run_from_marks(name, batch, prompt_len, start, marks, kv_bytes) -> Run:
    steps = [marks[0] - start] + [b - a for a, b in zip(marks, marks[1:])]
    decode_s = marks[-1] - marks[0]
    decode_rate = batch * (len(marks) - 1) / decode_s if decode_s > 0 else 0.0
    return Run(name, batch, steps[0], batch * prompt_len / steps[0], decode_rate,
               marks[-1] - start, steps, kv_bytes)


def _median_run(name: str, batch: int, runs: list[Run]) -> Run:
    """Return the median of each figure over repeated runs; steps from the median-time run."""
    middle = sorted(runs, key=lambda r: r.total_s)[len(runs) // 2]
    return Run(name, batch, statistics.median(r.ttft_s for r in runs),
               statistics.median(r.prefill_tokens_per_s for r in runs),
               statistics.median(r.decode_tokens_per_s for r in runs),
               middle.total_s, middle.step_s, middle.kv_cache_bytes)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def plot_report(report: BenchReport, path) -> None:
    """Write a PNG: per-step latency against position per engine (first batch size), and
    decode tokens/s per engine and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    first = report.predictions[0].batch
    for run in (r for r in report.runs if r.batch == first):
        positions = range(report.prompt_len, report.prompt_len + len(run.step_s) - 1)
        left.plot(list(positions), [s * 1e3 for s in run.step_s[1:]], label=run.engine)
    left.set(xlabel="position of the token fed", ylabel="decode step (ms)",
             title=f"Per-step latency, batch {first}")
    left.legend()

    engines = list(dict.fromkeys(r.engine for r in report.runs))
    batches = [p.batch for p in report.predictions]
    width = 0.8 / len(batches)
    for i, batch in enumerate(batches):
        rates = {r.engine: r.decode_tokens_per_s for r in report.runs if r.batch == batch}
        right.bar([e + i * width for e in range(len(engines))],
                  [rates.get(e, 0) for e in engines], width, label=f"batch {batch}")
    right.set_xticks([e + width * (len(batches) - 1) / 2 for e in range(len(engines))],
                     engines, rotation=15)
    right.set(ylabel="decode tokens/s", title="Decode throughput")
    right.legend()
    fig.suptitle(f"{report.model}: prompt {report.prompt_len}, {report.new_tokens} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
