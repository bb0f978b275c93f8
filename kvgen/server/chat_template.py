"""The model's chat template, from tokenizer_config.json ("chat_template") or chat_template.jinja
beside it, rendered by jinja2 in a sandbox.

The template comes with the model, but the messages it renders come from clients: the sandbox
keeps a template from reaching Python internals through them, and the immutable variant keeps
it from changing them.
"""

import json
import logging
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import KvgenError
from ..tokenizer import read_tokenizer_config
from .errors import ApiError

log = logging.getLogger(__name__)


class ChatTemplate:
    """Turns a list of messages into the prompt text the model was trained on."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise KvgenError(f"chat template: syntax error on line {e.lineno}: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict]) -> str:
        """Return the prompt for messages, ending where the assistant's answer begins."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as e:  # raise_exception, a sandbox refusal, or a template bug
            raise ApiError(400, f"messages: the model's chat template refused them: {e}",
                           param="messages") from None


def find_chat_template(model_path: Path) -> ChatTemplate | None:
    """Return the chat template stored with the model at model_path, or None if it has none."""
    folder = model_path if model_path.is_dir() else model_path.parent
    config = read_tokenizer_config(folder / "tokenizer_config.json")
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None and (folder / "chat_template.jinja").is_file():
        source = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if source is None:
        log.info("%s has no chat template: chat requests will be refused", folder)
        return None
    if not isinstance(source, str):
        raise KvgenError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string or "
                         f"a list of named templates with a 'default', got {type(source).__name__}")
    return ChatTemplate(source, bos_token=_token(config.get("bos_token")),
                        eos_token=_token(config.get("eos_token")))


def _token(value) -> str:
    """Return a special token's text: tokenizer configs give a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _raise(message):
    raise jinja2.TemplateError(message)


def _tojson(value, indent=None):
    # Jinja's own tojson escapes <, > and & for HTML; a prompt wants the characters as they are.
    return json.dumps(value, ensure_ascii=False, indent=indent)
