"""Sampling parameters (vLLM-style) and the on-device sampler."""

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from engine import limits
from engine.limits import InvalidRequest


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature=0 is greedy; top_k of -1 or 0 and top_p=1 switch those filters off;
    seed=None draws a fresh seed per request. Stop tokens (and EOS unless ignore_eos) end a
    request and are kept in its token_ids, not in its text. Values outside engine.limits raise
    InvalidRequest (a ValueError) naming the field."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

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
        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            _bad("stop_token_ids", "a list of token ids", ids)
        if len(ids) > limits.MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(f"stop_token_ids has {len(ids)} entries; at most "
                                 f"{limits.MAX_STOP_TOKEN_IDS} are allowed", "stop_token_ids")
        if not all(_is_int(t) and 0 <= t <= limits.INT32_MAX for t in ids):
            _bad("stop_token_ids", "token ids (integers >= 0)", list(ids))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _bad(param: str, want: str, got) -> None:
    raise InvalidRequest(f"{param} must be {want}, got {got!r}"[:300], param)


def filters(params: SamplingParams) -> bool:
    """Whether a request's draws go through the top-k / top-p filter (a sort of the vocabulary)."""
    return params.temperature > 0 and (params.top_k > 0 or params.top_p < 1)


def sample(logits, temperature, top_k, top_p, seed, position, *, filtering: bool = True):
    """logits [B,V] float32; temperature, top_p [B] float32; top_k [B] int32 (<= 0: off);
    seed [B] uint32; position [B] int32 (index of the token being drawn, so a request draws
    the same tokens whatever batch it runs in) -> tokens [B] int32.

    filtering (static): whether any row may filter by top-k or top-p. Only then is the
    vocabulary sorted, for the rows that filter. The caller decides on the host: a `lax.cond`
    on the device would decide it too, but on a GPU XLA reads a cond's predicate back to the
    host, which blocks the dispatching thread until the step is done (measured on the H100: a
    4-step decode launch returned after 14.6 ms with the cond, after 2.3 ms without), so the
    next launch could not be queued behind it."""
    vocab = logits.shape[-1]
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
    if filtering:
        rows = (temperature > 0) & ((top_k > 0) | (top_p < 1))
        masked = jnp.where(rows[:, None], filtered(scaled), scaled)
    drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
