"""Per-request layout choice: static reserves everything at admission, paged grows per page."""

import dataclasses
import math

LAYOUTS = ("static", "paged", "hybrid")


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

    def pages_at_admission(self, prompt_len: int, max_new_tokens: int,
                           page_size: int) -> tuple[str, int]:
        """(layout, pages to reserve when the request is admitted).

        The last sampled token is never written to the cache, so a request stores at most
        prompt_len + max_new_tokens - 1 tokens.
        """
        stored = prompt_len + max_new_tokens - 1
        kind = self.choose(prompt_len + max_new_tokens)
        tokens = stored if kind == "static" else prompt_len
        return kind, math.ceil(tokens / page_size)
