"""Offline engine in the style of vLLM's `LLM`: load a model, size the pool, generate."""

import dataclasses

import kvcache
from engine.config import EngineConfig, make_config
from engine.engine import Engine
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
    # SamplingParams(logprobs=N): per token of token_ids, {token id: log probability} of the
    # sampled token and the N most likely (vLLM's shape, floats for its Logprob objects);
    # else None.
    logprobs: list[dict[int, float]] | None = None
    # SamplingParams(prompt_logprobs=N): per prompt token, the same of the prompt token and the
    # N most likely in its place, None for the first (vLLM's shape); else None.
    prompt_logprobs: list[dict[int, float] | None] | None = None


class LLM:
    """Generates text or token ids with a hybrid static / paged KV cache, with continuous
    batching, chunked prefill and the radix prefix cache, as the server does.

    LLM(model, **knobs): model is a preset name ('tiny-random') or a HF checkpoint directory;
    the knobs are engine.config.EngineConfig's fields, the names and defaults of serve.py's
    flags (layout='hybrid', page_size=16, context_length=None, max_running_requests=32,
    max_total_tokens=None, kv_pool='static', host_kv_size=0, tensor_parallel_size=1, ...). With
    kv_pool='elastic' on a GPU, set XLA_PYTHON_CLIENT_PREALLOCATE=false and
    XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async before JAX starts, so freed memory goes back to the
    driver (serve.py does). The constructor compiles what precompile says before it returns
    (on a GPU/TPU the few largest step programs; engine.programs)."""

    def __init__(self, model: str = "tiny-random", **knobs):
        self.engine = Engine(make_config(model=model, **knobs))
        self.engine.warmup(progress=False)      # as precompile says (none, on a CPU)
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        """An LLM over an engine built from config (the server's settings)."""
        return cls(**dataclasses.asdict(config))

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
                              r.cached_tokens, _logprobs(r), _prompt_logprobs(r)) for r in reqs]

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
        report["pool"] |= self.engine.scheduler.pool.report()
        return report


def _merged(tokens, logprobs) -> list[dict[int, float]]:
    """Per token, {token id: log probability} of the token and the most likely (vLLM's)."""
    return [top | {token: lp} for token, (lp, top) in zip(tokens, logprobs)]


def _logprobs(r) -> list[dict[int, float]] | None:
    return None if r.params.logprobs is None else _merged(r.output, r.logprobs)


def _prompt_logprobs(r) -> list[dict[int, float] | None] | None:
    if r.params.prompt_logprobs is None:
        return None
    return [None] + _merged(r.prompt[1:], r.prompt_logprobs)
