"""Request bodies of the HTTP API (OpenAI-compatible, plus SGLang's native /generate), parsed by
pydantic: a field of the wrong type, or a value past engine.limits that the schema itself checks
(choices per request, stop strings, text that is not Unicode), becomes a 400 that names it (see
server.errors). Sampling values are range-checked once, by SamplingParams, for every API.
"""

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
)

from engine import limits

NonNegInt = Annotated[StrictInt, Field(ge=0)]

# Text a client sends: JSON may carry lone UTF-16 surrogates ("\ud800"), which no tokenizer
# takes.
Text = Annotated[str, AfterValidator(lambda v: limits.check_text(v, "the text"))]


def _stop_list(v) -> list[str]:
    v = [v] if isinstance(v, str) else (v or [])
    if len(v) > limits.MAX_STOP_STRINGS:
        raise ValueError(f"at most {limits.MAX_STOP_STRINGS} stop strings, got {len(v)}")
    for s in v:
        if not s or len(s) > limits.MAX_STOP_STRING_CHARS:
            raise ValueError(f"a stop string must have 1 to {limits.MAX_STOP_STRING_CHARS} "
                             f"characters, got {len(s)}")
    return v


# A stop string or a list of them; always a list after validation.
Stop = Annotated[Text | list[Text] | None, AfterValidator(_stop_list),
                 Field(default=None, validate_default=True)]


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI clients send many optional ones.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """Sampling fields shared by /v1/completions and /v1/chat/completions."""
    model: str
    max_tokens: StrictInt | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: StrictInt = -1
    n: StrictInt = Field(default=1, ge=1, le=limits.MAX_N)
    seed: StrictInt | None = None
    stop: Stop
    stop_token_ids: list[StrictInt] = []
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    prompt: Text | list[NonNegInt] | list[Text] | list[list[NonNegInt]]
    max_tokens: StrictInt | None = 16

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v):
        return 16 if v is None else v      # OpenAI's default; null means unset

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and isinstance(v[0], (str, list)):
            if len(v) > limits.MAX_N:
                raise ValueError(f"at most {limits.MAX_N} prompts per request")
            return v
        return [v]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, list):   # [{"type": "text", "text": ...}, ...]
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in v):
                raise ValueError("only text content parts are supported")
            return "".join(limits.check_text(p["text"], "the text") for p in v)
        return v or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


class GenerateSampling(_Body):
    max_new_tokens: StrictInt = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: StrictInt = -1
    seed: StrictInt | None = None
    stop: Stop
    stop_token_ids: list[StrictInt] = []
    ignore_eos: StrictBool = False


class GenerateRequest(_Body):
    text: Text | None = None
    input_ids: list[NonNegInt] | None = None
    sampling_params: GenerateSampling = GenerateSampling()
    stream: StrictBool = False
