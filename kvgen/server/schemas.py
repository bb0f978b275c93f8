"""The bodies of /v1/completions and /v1/chat/completions, read into dataclasses.

Checked by hand rather than by pydantic models so that every bad value gets OpenAI's answer, a
400 naming the parameter, instead of FastAPI's 422 and its validation dump.
"""

from dataclasses import dataclass

from . import fields
from .fields import bad, show

MAX_CHOICES = 128  # n times the number of prompts, per request
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's limit for chat; 5 for completions)
MAX_STOP = 16
_MAX_SEED = 2**63
ROLES = ("system", "developer", "user", "assistant", "tool")

# Fields of OpenAI's API this server does not implement, with the values that mean "not used".
_UNSUPPORTED = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},)}
_UNSUPPORTED_COMPLETION = _UNSUPPORTED | {"suffix": ("",), "best_of": (1,)}
_UNSUPPORTED_CHAT = _UNSUPPORTED | {
    "tools": ([],), "functions": ([],), "tool_choice": ("none",), "function_call": ("none",),
    "response_format": ({"type": "text"},), "audio": (), "prediction": (),
    "modalities": (["text"],)}


@dataclass
class Sampling:
    """What one request asks of generation, shared by both endpoints."""

    max_tokens: int | None  # None: the endpoint's default
    temperature: float
    top_p: float
    top_k: int  # 0: off
    n: int
    seed: int | None  # choice j of a prompt uses seed + j
    stop: list[str]
    stream: bool
    include_usage: bool  # stream_options.include_usage
    logprobs: int | None  # alternatives per token; None: no log-probabilities

    def engine_options(self, max_tokens: int, choice: int) -> dict:
        """Return Engine.add_request's keywords for choice j of a prompt."""
        return dict(max_new_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, seed=None if self.seed is None else self.seed + choice,
                    stop=self.stop or None, return_logits=self.logprobs is not None)


@dataclass
class CompletionRequest:
    model: str | None
    prompts: list  # strings or lists of token ids
    echo: bool
    sampling: Sampling


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]  # {"role", "content"} with text content, plus "name" when given
    sampling: Sampling


def parse_completion(body: dict) -> CompletionRequest:
    """Return the checked completion request; raise a 400 ApiError for a bad field."""
    fields.unsupported(body, _UNSUPPORTED_COMPLETION)
    prompts = _prompts(body.get("prompt"))
    logprobs = fields.integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    sampling = _sampling(body, fields.integer(body, "max_tokens", None, 1), logprobs)
    echo = fields.boolean(body, "echo", False)
    if echo and logprobs is not None:
        raise bad("echo", "with logprobs would need the prompt's log-probabilities, which this "
                  "server does not compute; ask for one or the other")
    _check_choices(len(prompts), sampling.n)
    return CompletionRequest(fields.string(body, "model"), prompts, echo, sampling)


def parse_chat(body: dict) -> ChatRequest:
    """Return the checked chat request; raise a 400 ApiError for a bad field."""
    fields.unsupported(body, _UNSUPPORTED_CHAT)
    messages = _messages(body.get("messages"))
    # max_completion_tokens is the newer name; either works, the newer wins.
    max_tokens = fields.integer(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = fields.integer(body, "max_tokens", None, 1)
    logprobs = None
    top = fields.integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if fields.boolean(body, "logprobs", False):
        logprobs = top or 0
    elif top is not None:
        raise bad("top_logprobs", "needs logprobs set to true")
    sampling = _sampling(body, max_tokens, logprobs)
    _check_choices(1, sampling.n)
    return ChatRequest(fields.string(body, "model"), messages, sampling)


def _sampling(body: dict, max_tokens: int | None, logprobs: int | None) -> Sampling:
    top_k = fields.integer(body, "top_k", 0, -1)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", f"must be an object, got {show(options)}")
    return Sampling(
        max_tokens=max_tokens,
        temperature=fields.number(body, "temperature", 1.0, 0),
        top_p=fields.number(body, "top_p", 1.0, 0, 1, lo_open=True),
        top_k=max(top_k, 0),  # -1 also means off, as some clients send it
        n=fields.integer(body, "n", 1, 1, MAX_CHOICES),
        seed=fields.integer(body, "seed", None, -_MAX_SEED, _MAX_SEED - 1),
        stop=fields.stop_strings(body, MAX_STOP),
        stream=fields.boolean(body, "stream", False),
        include_usage=fields.boolean(options or {}, "include_usage", False),
        logprobs=logprobs)


def _check_choices(prompts: int, n: int):
    if prompts * n > MAX_CHOICES:
        raise bad("n", f"times the {prompts} prompts asks for {prompts * n} completions; at most "
                  f"{MAX_CHOICES} per request")


def _prompts(value) -> list:
    """Return the prompt field as a list of prompts: strings or lists of token ids."""
    if isinstance(value, str):
        return [fields.text("prompt", value)]
    if isinstance(value, list) and value:
        if all(_is_id(t) for t in value):
            return [value]
        if all(isinstance(p, str) for p in value):
            return [fields.text("prompt", p) for p in value]
        if all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in value):
            return value
    raise bad("prompt", f"must be a string, a list of strings, a non-empty list of token ids, or "
              f"a list of such lists; got {show(value)}")


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise bad("messages", f"must be a non-empty list of messages, got {show(value)}")
    return [_message(i, m) for i, m in enumerate(value)]


def _message(i: int, message) -> dict:
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad(param, f"must be an object with role and content, got {show(message)}")
    role = message.get("role")
    if role not in ROLES:
        raise bad(f"{param}.role", f"must be one of {', '.join(ROLES)}, got {show(role)}")
    if message.get("tool_calls"):
        raise bad(f"{param}.tool_calls", "tool calls are not supported by this server")
    content = message.get("content")
    if content is None and role == "assistant":  # an assistant turn may be empty
        content = ""
    out = {"role": role, "content": _content(f"{param}.content", content)}
    name = fields.string(message, "name")
    if name is not None:
        out["name"] = name
    return out


def _content(param: str, content) -> str:
    """Return a message's text: a string, or the text parts of a list joined."""
    if isinstance(content, str):
        return fields.text(param, content)
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad(param, f"parts must be {{'type': 'text', 'text': ...}} (this server "
                          f"reads text only), got {show(part)}")
            texts.append(fields.text(param, part["text"]))
        return "".join(texts)
    raise bad(param, f"must be a string or a list of text parts, got {show(content)}")
