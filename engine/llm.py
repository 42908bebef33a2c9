"""Offline engine in the style of vLLM's `LLM`: load a model, size the pool, generate."""

import collections
import dataclasses
import math
import secrets

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import kernels
import kvcache
from engine import envs
from engine.sampling import SamplingParams
from engine.step import DecodeState, PrefillBatch, SamplingArrays, decode_loop, prefill
from models import load_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str        # "stop" (stop token / EOS) or "length" (max_tokens)
    layout: str               # "static" or "paged"


@dataclasses.dataclass(slots=True)
class _Request:
    prompt: list[int]
    params: SamplingParams
    seed: int
    layout: str
    reserve: int              # pages taken at admission
    worst_pages: int          # pages the request can ever hold
    stop_ids: tuple[int, ...]
    output: list[int] = dataclasses.field(default_factory=list)
    row: int = -1
    finish_reason: str | None = None


def bucket(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= max(n, lo), capped at hi: shapes compile once per bucket."""
    return min(max(lo, 1 << max(n - 1, 0).bit_length()), hi)


def resolve_dtype(dtype: str):
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {['auto', *DTYPES]}")
    return DTYPES[dtype]


class LLM:
    """Generates text or token ids with a hybrid static / paged KV cache.

    model: a preset name ('tiny-random') or a HF checkpoint directory. layout: 'static',
    'paged' or 'hybrid' (static when prompt + max_tokens <= static_max_tokens). The pool holds
    max_total_tokens tokens, or what mem_fraction_static of the device leaves after the weights,
    never more than max_num_seqs full contexts. attention_impl: see kernels.IMPLEMENTATIONS;
    None takes the HYBRIDKV_ATTENTION environment variable ('auto' when unset).
    """

    def __init__(self, model: str = "tiny-random", *, layout: str = "hybrid",
                 static_max_tokens: int = 2048, dtype: str = "auto", page_size: int = 16,
                 max_model_len: int | None = None, max_num_seqs: int = 32,
                 max_total_tokens: int | None = None, mem_fraction_static: float = 0.9,
                 attention_impl: str | None = None, steps_per_loop: int = 16):
        self.policy = kvcache.LayoutPolicy(layout, static_max_tokens)
        self.attn_impl = kernels.resolve_impl(attention_impl or envs.ATTENTION)
        if max_num_seqs < 1 or steps_per_loop < 1:
            raise ValueError("max_num_seqs and steps_per_loop must be >= 1")
        module, self.tokenizer = load_model(model, resolve_dtype(dtype))
        self.config = cfg = module.cfg
        self.graphdef, self.params = nnx.split(module)
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        self.max_num_seqs, self.steps_per_loop = max_num_seqs, steps_per_loop
        self.pages_per_row = math.ceil(self.max_model_len / page_size)
        self.spec = kvcache.size_pool(
            num_layers=cfg.num_layers, page_size=page_size, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, dtype=jnp.dtype(resolve_dtype(dtype)).name,
            weight_bytes=kvcache.nbytes(self.params), device=jax.devices()[0],
            mem_fraction_static=mem_fraction_static, max_total_tokens=max_total_tokens,
            default_tokens=max_num_seqs * self.max_model_len)
        self.cache = kvcache.init_cache(self.spec, max_num_seqs, self.pages_per_row)
        self._prefill = jax.jit(prefill, static_argnums=0, donate_argnames="cache",
                                static_argnames=("max_pages", "attn_impl", "all_logits"))
        self._loop = jax.jit(decode_loop, static_argnums=0, donate_argnames="cache",
                             static_argnames=("num_steps", "attn_impl"))
        self._release = jax.jit(kvcache.release_rows, donate_argnums=0)

    # -- requests -------------------------------------------------------------------------
    def _make_request(self, i: int, prompt, params: SamplingParams) -> _Request:
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {self.config.vocab_size}): "
                             f"{bad[:5]}")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens and asks for max_tokens="
                             f"{params.max_tokens}: {total} exceeds the context length "
                             f"{self.max_model_len}")
        kind, reserve = self.policy.pages_at_admission(len(ids), params.max_tokens,
                                                       self.spec.page_size)
        worst = math.ceil((total - 1) / self.spec.page_size)
        if worst > self.spec.num_pages - 1:
            raise ValueError(f"prompt {i} may need {worst} pages of {self.spec.page_size} "
                             f"tokens but the pool has {self.spec.num_pages - 1}; raise "
                             "max_total_tokens or lower max_tokens")
        eos = () if params.ignore_eos else self.config.eos_token_ids
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        return _Request(ids, params, seed, kind, reserve, worst, params.stop_token_ids + eos)

    def _sampling(self, reqs: list[_Request], width: int) -> SamplingArrays:
        pad = width - len(reqs)
        p = [r.params for r in reqs]
        return SamplingArrays(
            temperature=jnp.asarray([x.temperature for x in p] + [0.0] * pad, jnp.float32),
            top_k=jnp.asarray([x.top_k for x in p] + [0] * pad, jnp.int32),
            top_p=jnp.asarray([x.top_p for x in p] + [1.0] * pad, jnp.float32),
            seed=jnp.asarray([r.seed for r in reqs] + [0] * pad, jnp.uint32))

    def _emit(self, req: _Request, token: int) -> None:
        req.output.append(token)
        if token in req.stop_ids:
            req.finish_reason = "stop"
        elif len(req.output) >= req.params.max_tokens:
            req.finish_reason = "length"

    # -- device calls ---------------------------------------------------------------------
    def _prefill_batch(self, reqs: list[_Request]) -> None:
        b = bucket(len(reqs), 1, self.max_num_seqs)
        t = bucket(max(len(r.prompt) for r in reqs), 16, self.max_model_len)
        tokens = np.zeros((b, t), np.int32)
        for i, r in enumerate(reqs):
            tokens[i, :len(r.prompt)] = r.prompt
        pad = b - len(reqs)
        batch = PrefillBatch(
            rows=jnp.asarray([r.row for r in reqs] + [0] * pad, jnp.int32),
            tokens=jnp.asarray(tokens),
            prompt_lens=jnp.asarray([len(r.prompt) for r in reqs] + [0] * pad, jnp.int32),
            layout=jnp.asarray([kvcache.LAYOUT_CODES[r.layout] for r in reqs] + [0] * pad,
                               jnp.int32),
            reserve=jnp.asarray([r.reserve for r in reqs] + [0] * pad, jnp.int32),
            sampling=self._sampling(reqs, b))
        first, _, self.cache, ok = self._prefill(self.graphdef, self.params, self.cache, batch,
                                                 max_pages=self.pages_per_row,
                                                 attn_impl=self.attn_impl)
        if not np.all(np.asarray(ok)[:len(reqs)]):
            raise RuntimeError("the pool refused pages that admission had counted as free")
        for r, token in zip(reqs, np.asarray(first).tolist()):
            self._emit(r, token)

    def _decode(self, reqs: list[_Request]) -> None:
        b = bucket(len(reqs), 1, self.max_num_seqs)
        e = bucket(max(len(r.stop_ids) for r in reqs), 4, 1 << 16)
        stop = np.full((b, e), -1, np.int32)
        for i, r in enumerate(reqs):
            stop[i, :len(r.stop_ids)] = r.stop_ids
        pad = b - len(reqs)
        state = DecodeState(
            rows=jnp.asarray([r.row for r in reqs] + [0] * pad, jnp.int32),
            tokens=jnp.asarray([r.output[-1] for r in reqs] + [0] * pad, jnp.int32),
            active=jnp.asarray([True] * len(reqs) + [False] * pad),
            remaining=jnp.asarray([r.params.max_tokens - len(r.output) for r in reqs]
                                  + [0] * pad, jnp.int32),
            stop_ids=jnp.asarray(stop), sampling=self._sampling(reqs, b))
        out, self.cache, _, stalled = self._loop(self.graphdef, self.params, self.cache, state,
                                                 num_steps=self.steps_per_loop,
                                                 attn_impl=self.attn_impl)
        if np.any(np.asarray(stalled)):
            raise RuntimeError("the pool ran out of pages that admission had counted as free")
        for r, row in zip(reqs, np.asarray(out).tolist()):
            for token in row:
                if token >= 0:
                    self._emit(r, token)

    def _release_rows(self, reqs: list[_Request]) -> None:
        b = bucket(len(reqs), 1, self.max_num_seqs)
        rows = jnp.asarray([r.row for r in reqs] + [0] * (b - len(reqs)), jnp.int32)
        mask = jnp.asarray([True] * len(reqs) + [False] * (b - len(reqs)))
        self.cache = self._release(self.cache, rows, mask)

    # -- public ---------------------------------------------------------------------------
    def generate(self, prompts, sampling_params=None) -> list[RequestOutput]:
        """One output per prompt (a string or a list of token ids), in order. sampling_params:
        one SamplingParams for all prompts, or a list with one per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if not isinstance(params, (list, tuple)):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        reqs = [self._make_request(i, p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
        waiting = collections.deque(reqs)
        running: list[_Request] = []
        free_rows = list(range(self.max_num_seqs - 1, -1, -1))
        committed, capacity = 0, self.spec.num_pages - 1
        while waiting or running:
            admitted = []
            while (waiting and free_rows
                   and committed + waiting[0].worst_pages <= capacity):
                r = waiting.popleft()
                r.row, committed = free_rows.pop(), committed + r.worst_pages
                admitted.append(r)
            if admitted:
                self._prefill_batch(admitted)
                running += admitted
            live = [r for r in running if r.finish_reason is None]
            if live:
                self._decode(live)
            done = [r for r in running if r.finish_reason is not None]
            if done:
                self._release_rows(done)
                for r in done:
                    free_rows.append(r.row)
                    committed -= r.worst_pages
                running = [r for r in running if r.finish_reason is None]
        return [RequestOutput(r.prompt, r.output, self._text(r), r.finish_reason, r.layout)
                for r in reqs]

    def chat(self, conversations, sampling_params: SamplingParams | None = None,
             ) -> list[RequestOutput]:
        """Like generate, for conversations (lists of {'role', 'content'} messages) rendered
        with the checkpoint's chat template."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json, so no chat template")
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        for i, messages in enumerate(conversations):
            if not messages:
                raise ValueError(f"conversation {i} has no messages")
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(m),
                                         add_special_tokens=False) for m in conversations]
        return self.generate(prompts, sampling_params)

    def _text(self, r: _Request) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([t for t in r.output if t not in r.stop_ids])

    def usage(self) -> dict:
        """The KV pool's accounting (see kvcache.usage)."""
        return kvcache.usage(self.cache)
