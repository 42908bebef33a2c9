"""Request bodies of the HTTP API (OpenAI-compatible, plus SGLang's native /generate), validated
by pydantic: a bad field becomes a 400 that names it (see engine.server)."""

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

MAX_N = 8   # choices per request

NonNegInt = Annotated[StrictInt, Field(ge=0)]


def _stop_list(v) -> list[str]:
    v = [v] if isinstance(v, str) else (v or [])
    if any(not s for s in v):
        raise ValueError("stop strings must be non-empty")
    return v


# A stop string or a list of them; always a list after validation.
Stop = Annotated[str | list[str] | None, AfterValidator(_stop_list),
                 Field(default=None, validate_default=True)]


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI clients send many optional ones.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """Sampling fields shared by /v1/completions and /v1/chat/completions."""
    model: str
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: StrictInt = -1
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**32)
    stop: Stop
    stop_token_ids: list[NonNegInt] = []
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(_Sampling):
    max_tokens: StrictInt | None = Field(default=16, ge=1)
    prompt: str | list[NonNegInt] | list[str] | list[list[NonNegInt]]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and isinstance(v[0], (str, list)):
            if len(v) > MAX_N:
                raise ValueError(f"at most {MAX_N} prompts per request")
            return v
        return [v]


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, list):   # [{"type": "text", "text": ...}, ...]
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in v):
                raise ValueError("only text content parts are supported")
            return "".join(p["text"] for p in v)
        return v or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)


class GenerateSampling(_Body):
    max_new_tokens: StrictInt = Field(default=128, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: StrictInt = -1
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**32)
    stop: Stop
    stop_token_ids: list[NonNegInt] = []
    ignore_eos: StrictBool = False


class GenerateRequest(_Body):
    text: str | None = None
    input_ids: list[NonNegInt] | None = None
    sampling_params: GenerateSampling = GenerateSampling()
    stream: StrictBool = False
