"""Request bodies of the HTTP API (OpenAI-compatible, plus SGLang's native /generate), parsed by
pydantic: a field of the wrong type, or a value past engine.limits that the schema itself checks
(choices per request, stop strings, text that is not Unicode), becomes a 400 that names it (see
server.errors). Sampling values are range-checked once, by SamplingParams, for every API.

No field is silently ignored. A field these bodies do not declare is refused (400 naming it),
but for IGNORED_FIELDS, which tell an engine nothing (who the end user is, what OpenAI should
store). Fields of OpenAI's, vLLM's or SGLang's APIs that this server does not implement yet
(best_of, suffix, OpenAI's older function-calling names) are declared
`Unsupported`: accepted at the value that asks for nothing (what clients send by default: null,
0, false, {}, []), refused naming the field at any other.
"""

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_validator,
)

from engine import limits
from server.tools import forced_schema

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


IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "safety_identifier",
                  "prompt_cache_key")


def Unsupported(*neutral) -> Any:
    """A field this server does not implement: `neutral` values (and null) pass, others are a
    400 naming the field."""
    def check(v):
        if v is not None and not any(v == x and type(v) is type(x) for x in neutral):
            shown = ", ".join(repr(x) for x in (None, *neutral)).replace("None", "null")
            raise ValueError(f"not supported by this server (yet): send {shown} or leave it out")
        return v
    return Annotated[Any, AfterValidator(check), Field(default=None)]


def _logit_bias(v: dict[str, float] | None) -> dict[int, float]:
    """OpenAI sends token ids as JSON object keys (strings); the values are range-checked by
    SamplingParams."""
    if v is None:
        return {}
    try:
        return {int(k): b for k, b in v.items()}
    except ValueError:
        raise ValueError("keys must be token ids (integers written as strings)") from None


LogitBias = Annotated[dict[str, float] | None, AfterValidator(_logit_bias), Field(default=None)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in IGNORED_FIELDS}
        return data


class StreamOptions(_Body):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(_Body):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object) or
    json_schema (JSON that validates against its schema), as structured output
    (engine.guided)."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with, and only with, type json_schema")
        return self

    def guided(self) -> dict:
        """SamplingParams' structured-output fields for it."""
        if self.type == "json_object":
            return {"guided_json": {"type": "object"}}
        if self.type == "json_schema":
            return {"guided_json": self.json_schema.schema_}
        return {}


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: LogitBias
    min_tokens: StrictInt = 0
    response_format: ResponseFormat | None = None   # on completions too, as vLLM has it

    def guided(self) -> dict:
        return {} if self.response_format is None else self.response_format.guided()


class CompletionRequest(_Sampling):
    prompt: Text | list[NonNegInt] | list[Text] | list[list[NonNegInt]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = Field(default=None, ge=0, le=limits.MAX_LOGPROBS)
    echo: StrictBool = False
    best_of: Unsupported(1)
    suffix: Unsupported("")

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
    name: Text | None = None           # given to the chat template, which may use it
    tool_calls: list[dict] | None = None     # an assistant's earlier calls (for the template)
    tool_call_id: str | None = None          # a tool message's answer to one

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if isinstance(v, list):   # [{"type": "text", "text": ...}, ...]
            if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in v):
                raise ValueError("only text content parts are supported")
            return "".join(limits.check_text(p["text"], "the text") for p in v)
        return v or ""


class FunctionDef(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: StrictBool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=limits.MAX_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None, validate_default=True)
    parallel_tool_calls: StrictBool = True
    functions: Unsupported([])               # OpenAI's older names for tools: use tools
    function_call: Unsupported("none")

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, choice, info):
        """"auto" with tools, "none" without, when not given (OpenAI's); a forced choice needs
        tools (a named one, one of them) and cannot take a response_format."""
        tools = info.data.get("tools")
        if choice is None:
            return "auto" if tools else "none"
        if choice == "none" or (choice == "auto" and tools):
            return choice
        if not tools:
            raise ValueError(f"tool_choice {choice!r} needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
                t.function.name for t in tools}:
            raise ValueError(f"it names {choice.function.name!r}, which is not among the tools")
        fmt = info.data.get("response_format")
        if fmt is not None and fmt.type != "text":
            raise ValueError("a forced tool_choice cannot be combined with response_format")
        return choice

    def tool_dicts(self) -> list[dict] | None:
        return None if not self.tools else [t.model_dump(exclude_none=True) for t in self.tools]

    def forced_choice(self):
        """tool_choice as server.tools takes it: "required", {"type", "function": {"name"}},
        or None when nothing is forced."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return choice.model_dump()
        return choice if choice == "required" else None

    def guided(self) -> dict:
        """A forced tool_choice's schema (server.tools), else response_format's."""
        if self.forced_choice() is None:
            return super().guided()
        return {"guided_json": forced_schema(self.tool_dicts(), self.forced_choice(),
                                             self.parallel_tool_calls)}

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v, info):
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v


class GenerateSampling(_Body):
    max_new_tokens: StrictInt = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: StrictInt = -1
    seed: StrictInt | None = None
    stop: Stop
    stop_token_ids: list[StrictInt] = []
    ignore_eos: StrictBool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: LogitBias
    min_new_tokens: StrictInt = 0
    n: StrictInt = Field(default=1, ge=1, le=limits.MAX_N)
    regex: str | None = None
    json_schema: str | None = None      # the schema as JSON text, as SGLang takes it
    ebnf: str | None = None             # a grammar in GBNF (or Lark), engine.guided

    def guided(self) -> dict:
        return {"guided_json": self.json_schema, "guided_regex": self.regex,
                "guided_grammar": self.ebnf}


class GenerateRequest(_Body):
    text: Text | None = None
    input_ids: list[NonNegInt] | None = None
    sampling_params: GenerateSampling = GenerateSampling()
    stream: StrictBool = False
    return_logprob: StrictBool = False
    top_logprobs_num: StrictInt = Field(default=0, ge=0, le=limits.MAX_LOGPROBS)
    logprob_start_len: StrictInt = Field(default=-1, ge=-1)
