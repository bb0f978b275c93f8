"""The user-facing model object: `kvgen.load(...)` and `llm.generate(...)` / `llm.stream(...)`."""

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .config import ModelConfig
from .errors import KvgenError
from .generate import GenerationStats, TextStream, generate_steps
from .loader import is_llama2c_checkpoint, load_hf_dir, load_llama2c
from .model import Transformer
from .sampling import Sampler, SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).parent / "bundled" / "tiny-shakespeare"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids only, a final stop token included
    text: str  # generated text only, cut before any stop string
    finish_reason: str | None  # "stop" (stop token or string) or "length"
    logits: torch.Tensor | None = None  # [len(token_ids), vocab] with return_logits=True
    stats: GenerationStats = field(repr=False, default_factory=GenerationStats)


class LLM:
    """A loaded model with its tokenizer and the token ids that end a sequence."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, *,
                 stop_token_ids: set[int], source: Path):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = set(stop_token_ids)
        self.source = source
        self.decode_model = None  # set by compile_decode()
        self.last_stats: GenerationStats | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def generate(self, prompts, *, max_new_tokens: int = 128, use_cache: bool = True,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, stop=None,
                 return_logits: bool = False) -> list[GenerationResult]:
        """Return one GenerationResult per prompt, generated as one left-padded batch.

        prompts: a string, a list of strings, a list of token ids, or a list of such lists.
        return_logits keeps, per row, the logits each of its tokens was picked from.
        """
        prompt_ids = self.encode_prompts(prompts)
        results = [GenerationResult(p, [], "", "length") for p in prompt_ids]
        step_logits = []
        on_logits = (lambda x: step_logits.append(x.float().cpu())) if return_logits else None
        for step in self._steps(prompt_ids, max_new_tokens, use_cache,
                                SamplingParams(temperature, top_k, top_p, seed), stop, on_logits):
            for t in step:
                results[t.row].token_ids.append(t.token_id)
                results[t.row].text += t.text
                results[t.row].finish_reason = t.finish_reason
        for row, r in enumerate(results):
            r.stats = self.last_stats
            if return_logits:
                r.logits = torch.stack([x[row] for x in step_logits[:len(r.token_ids)]]) \
                    if r.token_ids else torch.empty(0, self.config.vocab_size)
        return results

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Return an iterator over the generated text of one prompt, piece by piece as decoded."""
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            raise KvgenError("stream() takes one prompt (a string or a list of token ids)")
        # Checked now, not at the first next(): a caller that writes the prompt out before
        # iterating learns of a bad argument before writing anything.
        return _texts(self._steps(self.encode_prompts(prompt), **_step_kwargs(**kwargs)))

    def _steps(self, prompt_ids, max_new_tokens, use_cache, params, stop, on_logits=None):
        stop = check_stop(stop)
        self.check_lengths(prompt_ids, max_new_tokens)
        if stop and self.tokenizer is None:
            raise KvgenError("stop strings need a tokenizer; this model was loaded without one")

        samplers = [Sampler(params, self.device) for _ in prompt_ids]
        texts = [TextStream(self.detokenizer(p), stop) for p in prompt_ids]
        self.last_stats = GenerationStats()
        return generate_steps(self.model, prompt_ids, max_new_tokens=max_new_tokens,
                              use_cache=use_cache, samplers=samplers,
                              stop_token_ids=self.stop_token_ids, texts=texts,
                              stats=self.last_stats, on_logits=on_logits,
                              decode_model=self.decode_model)

    def compile_decode(self):
        """Return self, its cached decode steps now run by torch.compile's version of the model.

        A decode step of a small model is mostly per-operation overhead (Python, dispatch,
        module calls), which compiling fuses away; the first steps after this pay the
        compilation. Shapes are marked dynamic so that a growing cache does not recompile.
        Compiled kernels may round differently from eager ones, within float32 noise.
        """
        import shutil

        if self.device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
            raise KvgenError("compiling for the CPU needs a C++ compiler (g++ or c++) on PATH, "
                             "and none was found; run without --compile")
        self.decode_model = torch.compile(self.model, dynamic=True)
        return self

    def detokenizer(self, prompt_ids):
        """Return a streaming detokenizer for a sequence that starts with prompt_ids."""
        if self.tokenizer is None:
            return _NoText()
        return IncrementalDetokenizer(self.tokenizer, prompt_ids)

    def encode_prompts(self, prompts) -> list[list[int]]:
        """Return the prompts as lists of token ids, encoding strings (with BOS)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise KvgenError("prompts must be a string, a list of strings, a list of token ids "
                             "or a list of such lists, and not empty")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise KvgenError("text prompts need a tokenizer; this model was loaded "
                                     "without one (pass tokenizer= or token ids)")
                p = self.tokenizer.encode(p)
            if not isinstance(p, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                  for t in p):
                raise KvgenError(f"prompt {i} must be a string or a list of int token ids")
            if not p:
                raise KvgenError(f"prompt {i} has no tokens; at least one is needed")
            bad = [t for t in p if not 0 <= t < self.config.vocab_size]
            if bad:
                raise KvgenError(f"prompt {i}: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
            out.append(list(p))
        return out

    def check_lengths(self, prompt_ids, max_new_tokens):
        """Raise KvgenError unless every prompt plus max_new_tokens fits the context."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
                or max_new_tokens < 0:
            raise KvgenError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        # The last new token is never fed back, so prompt + max_new_tokens - 1 positions would
        # do (run.c generates that one extra token); we keep the rule users know from
        # transformers' max_length: prompt plus new tokens fit the context.
        context = self.config.max_seq_len
        for i, p in enumerate(prompt_ids):
            if len(p) + max_new_tokens > context:
                raise KvgenError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens {max_new_tokens} "
                    f"that is {len(p) + max_new_tokens}, over the model's context of "
                    f"{context} tokens")


def _texts(steps) -> Iterator[str]:
    for step in steps:
        for t in step:
            if t.text:
                yield t.text


def _step_kwargs(*, max_new_tokens: int = 128, use_cache: bool = True, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=None):
    return dict(max_new_tokens=max_new_tokens, use_cache=use_cache,
                params=SamplingParams(temperature, top_k, top_p, seed), stop=stop)


def check_stop(stop) -> list[str]:
    """Return stop strings as a list, or raise KvgenError naming a bad one."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise KvgenError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return list(stop)


class _NoText:
    """Detokenizer stand-in for a model loaded without a tokenizer: ids only, no text."""

    def add(self, token_id):
        return ""

    def flush(self):
        return ""


def load(model=None, *, dtype=None, device=None, tokenizer=None, download: bool = False) -> LLM:
    """Return an LLM for a Hugging Face directory, a llama2.c checkpoint, or a folder holding one.

    model None means the small model bundled with kvgen; a name like "org/model" that is not a
    local path is looked up in the Hugging Face cache (downloaded only with download=True).
    dtype is a torch dtype or a name ("float32", "bfloat16", "float16"); device is "cpu"
    (default) or e.g. "cuda".
    """
    path = Path(model) if model is not None else DEFAULT_MODEL
    if not path.exists():
        path = resolve_hub_name(str(model), download=download)
    dtype = _dtype(dtype)
    device = _device(device)

    if path.is_dir() and (path / "config.json").exists():
        net = load_hf_dir(path, dtype=dtype, device=device)
        tok = load_tokenizer(tokenizer) if tokenizer else _optional_tokenizer(path)
        stop_ids = _hf_stop_ids(path, tok)
    else:
        checkpoint = _find_llama2c(path)
        net = load_llama2c(checkpoint, dtype=dtype, device=device)
        tok_path = tokenizer or _find_llama2c_tokenizer(checkpoint)
        tok = load_tokenizer(tok_path, vocab_size=net.cfg.vocab_size) if tok_path else None
        # llama2.c's stories models end a story by emitting BOS, and run.c stops there.
        stop_ids = {1, 2} if tok is None else {tok.bos_id, tok.eos_id} - {None}

    if tok is not None and tok.vocab_size > net.cfg.vocab_size:
        raise KvgenError(f"tokenizer has {tok.vocab_size} tokens but the model's embedding has "
                         f"only {net.cfg.vocab_size} rows")
    log.info("loaded %s: %d layers, dim %d, %d heads (%d KV heads), vocab %d, context %d",
             path, net.cfg.n_layers, net.cfg.dim, net.cfg.n_heads, net.cfg.n_kv_heads,
             net.cfg.vocab_size, net.cfg.max_seq_len)
    return LLM(net, tok, stop_token_ids=stop_ids, source=path)


_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_hub_name(name: str, *, download: bool = False) -> Path:
    """Return the local snapshot folder of Hugging Face repo `name`, from the cache unless
    download is asked for."""
    if not _REPO_ID.match(name) or name.startswith((".", "/")):
        raise KvgenError(f"model path {name} does not exist")
    import huggingface_hub
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        folder = huggingface_hub.snapshot_download(name, local_files_only=not download)
    except huggingface_hub.errors.LocalEntryNotFoundError:
        raise KvgenError(f"model {name} is neither a local path nor in the Hugging Face cache "
                         f"({HF_HUB_CACHE}); pass --download to fetch it") from None
    except Exception as e:  # network, authentication, unknown repo
        raise KvgenError(f"model {name}: cannot get it from the Hugging Face Hub ({e})") from None
    return Path(folder)


def _dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise KvgenError(f"unknown dtype {dtype!r}; expected one of float32, bfloat16, float16")
    return _DTYPES[dtype]


def _device(device) -> torch.device:
    try:
        device = torch.device(device or "cpu")
    except RuntimeError as e:
        raise KvgenError(f"unknown device {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KvgenError("device 'cuda' was asked for, but this PyTorch sees no CUDA device")
    return device


def _optional_tokenizer(folder: Path) -> Tokenizer | None:
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists():
        return load_tokenizer(folder)
    log.warning("%s has no tokenizer.json or tokenizer.model: token-id prompts only", folder)
    return None


def _hf_stop_ids(folder: Path, tok: Tokenizer | None) -> set[int]:
    """Return the ids that end generation: generation_config.json's eos_token_id, else EOS."""
    gen_config = folder / "generation_config.json"
    if gen_config.exists():
        try:
            eos = json.loads(gen_config.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError) as e:
            raise KvgenError(f"{gen_config}: not a JSON object ({e})") from None
        if eos is not None:
            return set(eos) if isinstance(eos, list) else {eos}
    return {tok.eos_id} if tok is not None and tok.eos_id is not None else set()


def _find_llama2c(path: Path) -> Path:
    if path.is_file():
        if not is_llama2c_checkpoint(path):
            raise KvgenError(f"{path} is neither a Hugging Face directory nor a llama2.c "
                             f"checkpoint (its size does not match a llama2.c header)")
        return path
    found = [p for p in sorted(path.glob("*.bin")) if is_llama2c_checkpoint(p)]
    if len(found) != 1:
        raise KvgenError(f"{path}: expected a config.json or exactly one llama2.c checkpoint "
                         f"(.bin), found {len(found)} checkpoints")
    return found[0]


def _find_llama2c_tokenizer(checkpoint: Path) -> Path | None:
    """Return the single tokenizer .bin beside a llama2.c checkpoint, or None."""
    others = [p for p in sorted(checkpoint.parent.glob("*.bin"))
              if p != checkpoint and not is_llama2c_checkpoint(p)]
    if len(others) == 1:
        return others[0]
    log.warning("%s: found %d candidate tokenizer .bin files beside it; pass tokenizer=",
                checkpoint, len(others))
    return None
