"""Sampling parameters (vLLM-style) and the on-device sampler."""

import dataclasses
import json
import math
import numbers
import typing

import jax
import jax.numpy as jnp

from engine import limits
from engine.limits import InvalidRequest


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature=0 is greedy; top_k of -1 or 0 and top_p=1 switch those filters off;
    seed=None draws a fresh seed per request. Stop tokens (and EOS unless ignore_eos) end a
    request and are kept in its token_ids, not in its text. logprobs=N (0-20): each sampled
    token comes with its log probability and the N most likely tokens' (vLLM's meaning), of
    the model's own distribution (log_softmax of the logits, before temperature, top-k and
    top-p, as vLLM returns by default). prompt_logprobs=N (0-20): the same for each prompt
    token after the first (vLLM's meaning; such a request takes no prefix-cache hit, its
    prompt is computed whole). logit_bias {token id: bias in [-100, 100]} (at most
    300) is added to the logits before every draw, greedy ones included (OpenAI's meaning;
    the log probabilities stay the model's). min_tokens: no stop token (EOS included) is drawn
    before that many tokens (vLLM's meaning). presence_penalty and frequency_penalty (in
    [-2, 2]) are subtracted from a token's logit once if it was generated before / once per
    time it was (OpenAI's and vLLM's meaning: generated tokens only); repetition_penalty
    (> 0) divides the positive logits and multiplies the negative ones of every token of the
    prompt or generated before (HF's and vLLM's meaning). The bias comes first, then the
    penalties (vLLM's order). guided_json (a JSON schema, as a dict or its JSON text),
    guided_regex (a regular expression) or guided_grammar (a context-free grammar in GBNF,
    llama.cpp's EBNF, or in Lark) constrains the output to match it (structured output,
    engine.guided; vLLM's names), one of them at most, not together with min_tokens. Values
    outside engine.limits raise InvalidRequest (a ValueError) naming the field."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()    # or a dict; kept as sorted pairs
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    guided_json: str | None = None     # or a dict; kept as its JSON text
    guided_regex: str | None = None
    guided_grammar: str | None = None

    def __post_init__(self):
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= limits.INT32_MAX:
            _bad("max_tokens", f"an integer in [1, {limits.INT32_MAX}]", self.max_tokens)
        if not _is_real(self.temperature) or not 0 <= self.temperature <= limits.FLOAT32_MAX:
            _bad("temperature", "a finite number >= 0", self.temperature)
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            _bad("top_p", "a number in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or not -1 <= self.top_k <= limits.INT32_MAX:
            _bad("top_k", "an integer >= 1, or -1 (or 0) for no limit", self.top_k)
        if self.seed is not None and (not _is_int(self.seed)
                                      or not 0 <= self.seed < limits.SEED_END):
            _bad("seed", "an integer in [0, 2**32)", self.seed)
        if not isinstance(self.ignore_eos, bool):
            _bad("ignore_eos", "true or false", self.ignore_eos)
        for name in ("logprobs", "prompt_logprobs"):
            x = getattr(self, name)
            if x is not None and (not _is_int(x) or not 0 <= x <= limits.MAX_LOGPROBS):
                _bad(name, f"an integer in [0, {limits.MAX_LOGPROBS}]", x)
        bias = self.logit_bias
        bias = bias.items() if isinstance(bias, dict) else bias
        try:
            bias = tuple(sorted((t, b) for t, b in bias))
        except (TypeError, ValueError):
            _bad("logit_bias", "a map of token ids to biases", self.logit_bias)
        if len(bias) > limits.MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias has {len(bias)} entries; at most "
                                 f"{limits.MAX_LOGIT_BIAS} are allowed", "logit_bias")
        if not all(_is_int(t) and 0 <= t <= limits.INT32_MAX and _is_real(b)
                   and -100 <= b <= 100 for t, b in bias):
            _bad("logit_bias", "token ids (integers >= 0) mapped to biases in [-100, 100]",
                 dict(bias))
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            _bad("min_tokens", f"an integer in [0, max_tokens = {self.max_tokens}]",
                 self.min_tokens)
        for name in ("presence_penalty", "frequency_penalty"):
            x = getattr(self, name)
            if not _is_real(x) or not -2 <= x <= 2:
                _bad(name, "a number in [-2, 2]", x)
        x = self.repetition_penalty
        if not _is_real(x) or not 0 < x <= limits.MAX_REPETITION_PENALTY:
            _bad("repetition_penalty", f"a number in (0, {limits.MAX_REPETITION_PENALTY}]", x)
        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            _bad("stop_token_ids", "a list of token ids", ids)
        if len(ids) > limits.MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(f"stop_token_ids has {len(ids)} entries; at most "
                                 f"{limits.MAX_STOP_TOKEN_IDS} are allowed", "stop_token_ids")
        if not all(_is_int(t) and 0 <= t <= limits.INT32_MAX for t in ids):
            _bad("stop_token_ids", "token ids (integers >= 0)", list(ids))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        self._check_guided()

    def _check_guided(self) -> None:
        schema = self.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                _bad("guided_json", f"a JSON schema ({e})", self.guided_json)
        if schema is not None:
            if not isinstance(schema, dict):
                _bad("guided_json", "a JSON schema (an object)", self.guided_json)
            text = json.dumps(schema)
            if len(text) > limits.MAX_GRAMMAR_CHARS:
                raise InvalidRequest(f"guided_json has {len(text)} characters; at most "
                                     f"{limits.MAX_GRAMMAR_CHARS} are allowed", "guided_json")
            object.__setattr__(self, "guided_json", text)
        for field, what in (("guided_regex", "a regular expression"),
                            ("guided_grammar", "a grammar")):
            text = getattr(self, field)
            if text is not None and (not isinstance(text, str) or not text
                                     or len(text) > limits.MAX_GRAMMAR_CHARS):
                _bad(field, f"{what} of 1 to {limits.MAX_GRAMMAR_CHARS} characters", text)
        given = [f for f in GUIDED_FIELDS if getattr(self, f) is not None]
        if len(given) > 1:
            raise InvalidRequest(f"give at most one of {', '.join(GUIDED_FIELDS)} (got "
                                 f"{' and '.join(given)})", given[-1])
        if self.guided and self.min_tokens:
            raise InvalidRequest("min_tokens cannot be combined with structured output (the "
                                 "grammar decides where the output ends)", "min_tokens")

    @property
    def guided(self) -> bool:
        """Whether the output is constrained by a grammar (structured output)."""
        return any(getattr(self, f) is not None for f in GUIDED_FIELDS)


GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_grammar")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _bad(param: str, want: str, got) -> None:
    raise InvalidRequest(f"{param} must be {want}, got {got!r}"[:300], param)


# The sampler's levels, each a compiled variant of a program (static): PLAIN draws greedy or
# by temperature; ADJUSTED also adds each row's bias table to the logits (logit_bias,
# min_tokens), applies the penalties, counts each row's generated tokens and returns log
# probabilities; GUIDED also bars the tokens each row's grammar does not allow (a bitmask per
# row, engine.guided); FILTERED also filters by top-k / top-p, which sorts the vocabulary of
# every row; PROMPT also returns the log probabilities of every position of the prompt chunks
# (a mixed step with a chunk of a request that wants prompt_logprobs). A launch runs at the
# highest level any of its rows needs.
PLAIN, ADJUSTED, GUIDED, FILTERED, PROMPT = 0, 1, 2, 3, 4
# KVCache.counts: a row's generated tokens counted per id, with this bit set on its prompt's
# ids (and on those of a prompt recomputed after a preemption: engine.runner sets the row).
PROMPT_SEEN = 1 << 30


def penalizes(params: SamplingParams) -> bool:
    return (params.presence_penalty != 0 or params.frequency_penalty != 0
            or params.repetition_penalty != 1)


def level(params: SamplingParams) -> int:
    """The sampler level a request's draws need (its prompt chunks may need PROMPT)."""
    if params.temperature > 0 and (params.top_k > 0 or params.top_p < 1):
        return FILTERED
    if params.guided:
        return GUIDED
    if (params.logprobs is not None or params.logit_bias or params.min_tokens > 0
            or penalizes(params)):
        return ADJUSTED
    return PLAIN


def penalize(logits, counts, presence, frequency, repetition):
    """logits [B,V] float32 with the penalties of SamplingParams applied; counts [B,V] int32
    (KVCache.counts of the rows), presence, frequency, repetition [B] float32."""
    generated = (counts & (PROMPT_SEEN - 1)).astype(jnp.float32)
    rep = repetition[:, None]
    logits = jnp.where(counts != 0, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * generated - presence[:, None] * (generated > 0)


def chunked_top_k(x, k: int, chunk: int = 128):
    """lax.top_k(x, k) over the last axis of x [B,V], exactly (ties to the lower index, as
    lax.top_k). The k largest lie in the k chunks of the vocabulary with the largest maxima
    (ties to the lower chunk): an element outside them has k chunk maxima before it in the
    order, each an element before it too. So: one max over each chunk, a top-k of the V /
    chunk maxima, and a top-k of the k chunks' elements gathered in index order. On a GPU a
    top_k over a whole vocabulary lowers to a sort of it (bench/sampler.py measures both)."""
    b, v = x.shape
    n = -(-v // chunk)
    if n <= k:
        return jax.lax.top_k(x, k)
    chunks = jnp.pad(x, ((0, 0), (0, n * chunk - v)), constant_values=-jnp.inf).reshape(
        b, n, chunk)
    best = jnp.sort(jax.lax.top_k(chunks.max(axis=-1), k)[1], axis=-1)      # [B,k] in order
    held = jnp.take_along_axis(chunks, best[:, :, None], axis=1).reshape(b, k * chunk)
    vals, pos = jax.lax.top_k(held, k)
    return vals, jnp.take_along_axis(best, pos // chunk, axis=1) * chunk + pos % chunk


class Sampled(typing.NamedTuple):
    tokens: jax.Array        # [B] int32
    logprob: jax.Array       # [B] float32 the token's log probability (0 at level PLAIN)
    top_ids: jax.Array       # [B,K] int32 the K most likely tokens, most likely first
    top_logprobs: jax.Array  # [B,K] float32 theirs; K is MAX_LOGPROBS above PLAIN, else 0
                             # (-1 and -inf past a vocabulary smaller than K)


def allow(logits, allowed):
    """logits [B,V] with -inf where allowed [B, ceil(V/32)] int32 has a 0 bit (token t is bit
    t % 32 of word t // 32, llguidance's layout)."""
    b, v = logits.shape
    bits = (allowed[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return jnp.where(bits.reshape(b, -1)[:, :v] != 0, logits, -jnp.inf)


def sample(logits, temperature, top_k, top_p, seed, position, bias_ids=None, bias=None, *,
           penalties=None, allowed=None, level: int = FILTERED) -> Sampled:
    """logits [B,V] float32; temperature, top_p [B] float32; top_k [B] int32 (<= 0: off);
    seed [B] uint32; position [B] int32 (index of the token being drawn, so a request draws
    the same tokens whatever batch it runs in); bias_ids [B,N] int32 (-1: none), bias [B,N]
    float32: added to those logits first; penalties: None, or (counts [B,V] int32, presence,
    frequency, repetition [B] float32) for `penalize`, applied next; allowed: None, or the
    tokens each row may draw as a bitmask (`allow`), from GUIDED up -> the tokens drawn and,
    above PLAIN, their log probabilities and the most likely tokens' (of log_softmax(logits):
    the model's own distribution, before the bias, penalties, temperature and filters).

    level (static, PLAIN / ADJUSTED / GUIDED / FILTERED / PROMPT above): only from FILTERED up
    is the vocabulary sorted (every row's: the rows that do not filter keep their logits),
    only above PLAIN the bias and penalties applied and the log probabilities computed, only
    from GUIDED up the grammar's mask applied. The caller
    decides on the host: a `lax.cond` on the device would decide it too, but on a GPU XLA
    reads a cond's predicate back to the host, which blocks the dispatching thread until the
    step is done (measured on the H100: a 4-step decode launch returned after 14.6 ms with
    the cond, after 2.3 ms without), so the next launch could not be queued behind it."""
    vocab = logits.shape[-1]
    raw = logits
    if level > PLAIN and bias_ids is not None and bias_ids.shape[1]:
        rows = jnp.arange(logits.shape[0])[:, None]
        logits = logits.at[rows, jnp.where(bias_ids < 0, vocab, bias_ids)].add(bias, mode="drop")
    if level > PLAIN and penalties is not None:
        logits = penalize(logits, *penalties)
    if level >= GUIDED and allowed is not None:
        logits = allow(logits, allowed)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seed, position)

    def filtered(scaled):
        ranked = -jnp.sort(-scaled, axis=-1)                               # [B,V] descending
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)       # [B,1]
        ranked = jnp.where(ranked >= kth, ranked, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                        # mass ranked above
        kept = jnp.sum((before < top_p[:, None]) & (ranked > -jnp.inf), axis=-1)
        floor = jnp.take_along_axis(ranked, jnp.maximum(kept - 1, 0)[:, None], axis=-1)
        return jnp.where(scaled >= jnp.maximum(kth, floor), scaled, -jnp.inf)

    masked = scaled
    if level >= FILTERED:
        rows = (temperature > 0) & ((top_k > 0) | (top_p < 1))
        masked = jnp.where(rows[:, None], filtered(scaled), scaled)
    drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    tokens = jnp.where(temperature > 0, drawn, greedy)
    b = logits.shape[0]
    if level == PLAIN:
        return Sampled(tokens, jnp.zeros(b, jnp.float32), jnp.zeros((b, 0), jnp.int32),
                       jnp.zeros((b, 0), jnp.float32))
    return Sampled(tokens, *log_probs(raw, tokens))


def log_probs(logits, ids):
    """logits [N,V] float32, ids [N] int32 -> (log_softmax(logits) at ids [N], the
    MAX_LOGPROBS most likely tokens [N,K] int32 and theirs [N,K] float32, padded with -1 and
    -inf past a vocabulary smaller than K). The top tokens of the logits are those of
    log_softmax, so it is never written out: one logsumexp pass and the top-k read them."""
    n, vocab = logits.shape
    lse = jax.nn.logsumexp(logits, axis=-1)
    top, top_ids = chunked_top_k(logits, min(limits.MAX_LOGPROBS, vocab))
    pad = ((0, 0), (0, limits.MAX_LOGPROBS - top_ids.shape[1]))    # a vocabulary under 20
    chosen = jnp.take_along_axis(logits, jnp.maximum(ids, 0)[:, None], axis=-1)[:, 0] - lse
    return (chosen, jnp.pad(top_ids.astype(jnp.int32), pad, constant_values=-1),
            jnp.pad(top - lse[:, None], pad, constant_values=-jnp.inf))
