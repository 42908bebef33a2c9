"""Per-request layout, and the one rule for how many pages a request takes and when: static
reserves everything at admission, paged takes a page at a time. The scheduler asks the policy;
nothing else decides."""

import dataclasses
import math

LAYOUTS = ("static", "paged", "hybrid")


def max_pages(max_len: int, page_size: int) -> int:
    """Pages a request of at most max_len tokens (prompt + max new tokens) can ever hold: its
    last sampled token is never written to the cache."""
    return math.ceil((max_len - 1) / page_size)


@dataclasses.dataclass(frozen=True)
class Admission:
    layout: str       # "static" or "paged"
    take: int         # fresh pages the admission takes from the pool now
    reserve: int      # of which held for the request's whole life, never grown (static rows)


@dataclasses.dataclass(frozen=True)
class LayoutPolicy:
    layout: str = "hybrid"
    static_max_tokens: int = 2048

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose one of {list(LAYOUTS)}")
        if self.static_max_tokens < 0:
            raise ValueError(f"static_max_tokens must be >= 0, got {self.static_max_tokens}")

    def choose(self, max_len: int) -> str:
        """'static' or 'paged' for a request that may reach max_len tokens."""
        if self.layout == "hybrid":
            return "static" if max_len <= self.static_max_tokens else "paged"
        return self.layout

    def admit(self, tokens: int, max_len: int, page_size: int, held: int = 0,
              layout: str | None = None) -> Admission:
        """The pages a request takes at admission, holding `tokens` tokens to store (prompt,
        and output if it resumes) and `held` pages already (a prefix-cache hit): static
        reserves every page it can ever hold, paged the pages its tokens fill. layout: the one
        it had at its first admission (a preempted request keeps it), else chosen now."""
        layout = layout or self.choose(max_len)
        if layout == "static":
            pages = max_pages(max_len, page_size) - held
            return Admission(layout, pages, pages)
        return Admission(layout, max(0, math.ceil(tokens / page_size) - held), 0)

    @staticmethod
    def grow(layout: str, tokens: int, held: int, page_size: int) -> int:
        """Fresh pages a running row of `layout` takes to hold `tokens` tokens when it holds
        `held` pages: none for a static row (it reserved them)."""
        if layout == "static":
            return 0
        return max(0, math.ceil(tokens / page_size) - held)

    @staticmethod
    def preemptible(layout: str) -> bool:
        """Whether a running row may give its pages back and wait: paged rows only (a static
        row holds its reservation to the end)."""
        return layout == "paged"
