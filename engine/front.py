"""What the API side needs of an engine, without the engine: its tokenizer and the limits a
request is checked against. The server's process builds requests with it while the engine runs
in a process of its own (server.worker); `Engine.make_request` goes through it too."""

import dataclasses
import numbers
import secrets

from engine.guided import Grammars
from engine.limits import InvalidRequest, check_text
from engine.request import Request
from engine.sampling import SamplingParams
from kvcache.policy import max_pages
from models import Tokenizer


@dataclasses.dataclass(frozen=True)
class Front:
    tokenizer: Tokenizer | None
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    context_length: int
    page_size: int
    bytes_per_page: int
    max_pages: int               # the most pages the KV pool can hold (an elastic pool's largest)
    grammars: Grammars | None = None   # structured output's compiler (None: no tokenizer)

    def make_request(self, rid: str, prompt, params: SamplingParams) -> Request:
        """Validates a prompt (text or token ids) against the model, the context and the pool;
        raises InvalidRequest naming what is wrong."""
        if len(prompt) == 0:
            raise InvalidRequest("the prompt is empty", "prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("this checkpoint has no tokenizer.json: pass token ids",
                                     "prompt")
            ids = self.tokenizer.encode(check_text(prompt, "prompt"))
        elif all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise InvalidRequest("the prompt must be text or a list of token ids", "prompt")
        vocab = self.vocab_size
        for name, values in (("prompt", ids), ("stop_token_ids", params.stop_token_ids),
                             ("logit_bias", [t for t, _ in params.logit_bias])):
            bad = [t for t in values if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"{name} has token ids outside [0, {vocab}): {bad[:5]}",
                                     name)
        if params.guided:
            if self.grammars is None:
                raise InvalidRequest("structured output needs the model's tokenizer, which "
                                     "this checkpoint lacks (no tokenizer.json)",
                                     "guided_json" if params.guided_json else "guided_regex")
            self.grammars.check(params)
        if params.top_k > vocab:
            raise InvalidRequest(f"top_k is {params.top_k} but the vocabulary has {vocab} "
                                 "tokens (-1 for no limit)", "top_k")
        total = len(ids) + params.max_tokens
        if len(ids) >= self.context_length:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens but the context length is "
                                 f"{self.context_length} (prompt + max_tokens)", "prompt")
        if total > self.context_length:
            raise InvalidRequest(f"the prompt has {len(ids)} tokens and max_tokens is "
                                 f"{params.max_tokens}: {total} exceeds the context length "
                                 f"{self.context_length}", "max_tokens")
        eos = () if params.ignore_eos else self.eos_token_ids
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        req = Request(rid, ids, params, seed, params.stop_token_ids + eos)
        worst, most, g = max_pages(req.max_len, self.page_size), self.max_pages, self.page_size
        if worst > most:
            page = self.bytes_per_page
            raise InvalidRequest(
                f"the request may hold {total - 1} tokens ({worst} pages of {g}, "
                f"{worst * page:,} bytes of KV) but the KV pool holds at most {most} pages "
                f"({most * g} tokens, {most * page:,} bytes); raise --max-total-tokens or "
                "--mem-fraction-static, or lower max_tokens", "max_tokens")
        return req

    def default_max_tokens(self, prompt_len: int) -> int:
        """What a request without max_tokens may produce: up to the context and the pool."""
        room = min(self.context_length, self.max_pages * self.page_size + 1)
        return max(room - prompt_len, 1)
