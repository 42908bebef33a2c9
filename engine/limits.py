"""Every limit a request is held to, in one table (the README's "Request limits" lists it).

A value past its limit raises InvalidRequest naming the field; the server answers it with a 400
in OpenAI's shape, `LLM.generate` raises it (a ValueError). Where they are checked:
`SamplingParams` (the numbers below), `engine.front.Front.make_request` (what depends on the
model and the pool: token ids below the vocabulary, top_k at most the vocabulary, prompt +
max_tokens within the context and the pool) and the HTTP schemas (server.protocol: types,
choices per request, stop strings, text that is not Unicode). The numbers keep every value
inside what the step represents (int32 token ids and counts, uint32 seeds, float32 sampling
values) and bound what one request can cost the host.
"""

INT32_MAX = 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38
SEED_END = 2**32                # seeds are in [0, 2**32)
MAX_N = 8                       # choices (n) per request, and prompts per completions request
MAX_STOP_TOKEN_IDS = 32         # stop_token_ids per request (the model's EOS ids come on top)
MAX_STOP_STRINGS = 16           # stop strings per request
MAX_STOP_STRING_CHARS = 256     # characters per stop string
MAX_LOGIT_BIAS = 300            # logit_bias entries per request (OpenAI's cap), each in [-100, 100]
MAX_LOGPROBS = 20               # most likely tokens returned per sampled token (OpenAI's cap)
MAX_REPETITION_PENALTY = 100.0  # repetition_penalty is in (0, this]
MAX_GRAMMAR_CHARS = 1 << 16     # characters of a structured-output JSON schema or regex
MAX_REQUEST_BYTES = 32 << 20    # default of --max-request-bytes: a larger body gets a 413


class InvalidRequest(ValueError):
    """A request the engine cannot serve; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def check_text(text: str, param: str) -> str:
    """text, if it is Unicode text; InvalidRequest if it holds a lone UTF-16 surrogate (JSON
    allows "\\ud800", UTF-8 and every tokenizer refuse it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"{param} holds a lone UTF-16 surrogate ({text[e.start]!r} at "
                             f"character {e.start}), which is not Unicode text", param) from None
    return text
