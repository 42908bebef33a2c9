"""Tokenizer from `tokenizer.json` (HF `tokenizers`) and chat template from
`tokenizer_config.json` (or `chat_template.jinja`), rendered with jinja2 as HF renders it."""

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
import tokenizers


class TokenizerError(ValueError):
    """Tokenizer files are missing or malformed, or a template cannot be rendered."""


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def _raise(message):
    raise TokenizerError(f"chat template: {message}")


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, *, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.eos_token_id = tok.token_to_id(eos_token) if eos_token else None
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"{file}: no such file (the tokenizer must be a "
                                 "HF tokenizer.json)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{file}: cannot be read ({e})") from None
        config_file = directory / "tokenizer_config.json"
        config = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{config_file}: not valid JSON ({e})") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        jinja_file = directory / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        return cls(tok, chat_template=template, bos_token=_token_text(config.get("bos_token")),
                   eos_token=_token_text(config.get("eos_token")))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The conversation as the template writes it (HF's arguments: `tools`, in OpenAI's
        shape, for templates that render them; others leave them out)."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat_template in tokenizer_config.json "
                                 "or chat_template.jinja")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                                  indent=indent)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None
