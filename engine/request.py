"""A request as the engine tracks it: its tokens, its row and pages, and what launches the
host has not read yet hold of it."""

import dataclasses
import time

from engine.sampling import SamplingParams


@dataclasses.dataclass(slots=True, eq=False)
class Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    stop_ids: tuple[int, ...]
    output: list[int] = dataclasses.field(default_factory=list)
    layout: str | None = None        # chosen at the first admission
    row: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)  # mirror of the row's page table
    computed: int = 0                # tokens whose K/V are in the cache
    cached_tokens: int = 0           # prefix-cache hit at the first admission
    host_cached_tokens: int = 0      # of which came from the host tier
    node: object = None              # locked prefix-cache node while running
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None         # why the engine failed it (finish_reason "error")
    preemptions: int = 0
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    admitted_once: bool = False
    pending: int = 0                 # tokens sampled in launches the host has not read
    unread_pages: int = 0            # pages taken in launches the host has not read
    inflight: int = 0                # launches holding the row that the host has not read
    # Per output token, when params.logprobs is set: (its log probability, {token: log
    # probability} of the params.logprobs most likely), engine.sampling.SamplingParams.
    logprobs: list[tuple[float, dict[int, float]]] = dataclasses.field(default_factory=list)
    # The same per prompt token after the first, when params.prompt_logprobs is set.
    prompt_logprobs: list[tuple[float, dict[int, float]]] = dataclasses.field(
        default_factory=list)
    # Structured output (params.guided): the grammar's matcher (llguidance), made in the
    # engine's process when the request is added and advanced by every token emitted.
    matcher: object = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    # These three, not `tokens`, on the per-step paths: `tokens` copies the whole sequence.
    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    def prefix(self, n: int) -> tuple[int, ...]:
        """tokens[:n] as a tuple, copied once: the prefix cache keys on tuples and takes one of
        the exact length as is."""
        p = len(self.prompt)
        return tuple(self.prompt[:n]) if n <= p else (*self.prompt, *self.output[:n - p])

    @property
    def max_len(self) -> int:
        return len(self.prompt) + self.params.max_tokens

    def draws(self, steps: int) -> int:
        """Tokens it may draw in a decode loop of `steps` steps: one when a grammar masks its
        draws (the next mask needs the host to have read the token before), else `steps`;
        within its budget."""
        return min(1 if self.params.guided else steps, self.budget)

    @property
    def budget(self) -> int:
        """Tokens it may still sample, counting those drawn in launches not read yet."""
        return self.params.max_tokens - len(self.output) - self.pending

    @property
    def to_feed(self) -> int:
        """Tokens not stored yet, the samples not read yet included: 1 for a decode row."""
        return self.num_tokens + self.pending - self.computed

    def prompt_logprob(self, position: int, logprobs: tuple[float, dict[int, float]]) -> None:
        """Prompt token `position`'s log probabilities, in order; a position computed again
        (after a preemption) is not taken twice."""
        if position == len(self.prompt_logprobs) + 1:
            self.prompt_logprobs.append(logprobs)

    def emit(self, token: int, logprobs: tuple[float, dict[int, float]] | None = None) -> None:
        self.output.append(token)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        if self.matcher is not None and not self.matcher.consume_token(token):
            self.finish_reason = "error"
            self.error = f"the grammar refused token {token}: {self.matcher.get_error()}"
        elif token in self.stop_ids or (self.matcher is not None and self.matcher.is_stopped()):
            self.finish_reason = "stop"     # a grammar that is complete ends the output
        elif len(self.output) >= self.params.max_tokens:
            self.finish_reason = "length"


