"""Offline engine in the style of vLLM's `LLM`: load a model, size the pool, generate."""

import dataclasses

import kvcache
from engine.engine import Engine, EngineConfig
from engine.limits import InvalidRequest
from engine.sampling import SamplingParams


@dataclasses.dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str        # "stop" (stop token / EOS) or "length" (max_tokens)
    layout: str               # "static" or "paged"
    cached_tokens: int        # prompt tokens found in the prefix cache


class LLM:
    """Generates text or token ids with a hybrid static / paged KV cache.

    model: a preset name ('tiny-random') or a HF checkpoint directory. layout: 'static',
    'paged' or 'hybrid' (static when prompt + max_tokens <= static_max_tokens). The pool holds
    max_total_tokens tokens, or what mem_fraction_static of the device leaves after the weights,
    never more than max_num_seqs full contexts; kv_pool 'elastic' starts it at
    kv_pool_min_tokens and grows it up to that size on demand, shrinking it once a smaller size
    has sufficed for kv_shrink_after seconds (on a GPU, set XLA_PYTHON_CLIENT_PREALLOCATE=false
    and XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async before JAX starts, so freed memory goes back to
    the driver; serve.py does). attention_impl: see kernels.IMPLEMENTATIONS; None takes the
    HYBRIDKV_ATTENTION environment variable ('auto' when unset). tensor_parallel_size: devices
    the model and its KV pages are sharded over (attention heads and MLP columns; see
    engine.parallel). host_kv_size: tokens of host memory that prefix-cache pages evicted from
    the pool move to, and come back from on a hit (kvcache.offload; 0: off). Requests run with
    continuous batching, chunked prefill and the radix prefix cache, as in the server.
    """

    def __init__(self, model: str = "tiny-random", *, layout: str = "hybrid",
                 static_max_tokens: int = 2048, dtype: str = "auto", page_size: int = 16,
                 max_model_len: int | None = None, max_num_seqs: int = 32,
                 max_total_tokens: int | None = None, mem_fraction_static: float = 0.9,
                 kv_pool: str = "static", kv_pool_min_tokens: int = 2048,
                 kv_shrink_after: float = 5.0, attention_impl: str | None = None,
                 steps_per_loop: int = 4, chunked_prefill_size: int = 512,
                 enable_prefix_caching: bool = True, tensor_parallel_size: int = 1,
                 host_kv_size: int = 0):
        self.engine = Engine(EngineConfig(
            model=model, dtype=dtype, layout=layout, static_max_tokens=static_max_tokens,
            page_size=page_size, max_total_tokens=max_total_tokens, kv_pool=kv_pool,
            kv_pool_min_tokens=kv_pool_min_tokens, kv_shrink_after=kv_shrink_after,
            mem_fraction_static=mem_fraction_static, context_length=max_model_len,
            max_running_requests=max_num_seqs, chunked_prefill_size=chunked_prefill_size,
            decode_steps=steps_per_loop, disable_radix_cache=not enable_prefix_caching,
            attention_impl=attention_impl, tensor_parallel_size=tensor_parallel_size,
            host_kv_size=host_kv_size))
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        """An LLM over an engine built from config (the server's settings)."""
        llm = cls.__new__(cls)
        llm.engine = Engine(config)
        llm.tokenizer, llm._next_id = llm.engine.tokenizer, 0
        return llm

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
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            try:
                reqs.append(self.engine.make_request(f"llm-{self._next_id + i}", p, sp))
            except InvalidRequest as e:
                raise InvalidRequest(f"prompt {i}: {e}", e.param) from None
        self._next_id += len(reqs)
        for req in reqs:
            self.engine.add(req)
        while self.engine.has_work():
            self.engine.step()
        return [RequestOutput(r.prompt, r.output, self._text(r), r.finish_reason, r.layout,
                              r.cached_tokens) for r in reqs]

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

    def _text(self, r) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([t for t in r.output if t not in r.stop_ids])

    def usage(self) -> dict:
        """The KV pool's accounting (see kvcache.usage); its "pool" entry also gives the pool's
        size, largest free run, and elastic growths, shrinks and pages moved."""
        self.engine.sync()
        report = kvcache.usage(self.engine.cache)
        report["pool"] |= self.engine.scheduler.pool_report()
        return report
