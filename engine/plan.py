"""A plan: what one launch does, as the scheduler decided it and the engine carries it out."""

import dataclasses

from engine.request import Request
from kvcache.radix import HostMove


@dataclasses.dataclass
class Release:
    row: int
    keep_from: int = 0        # the prefix cache takes over the row's references to the pages
    keep_to: int = 0          # of page-table columns [keep_from, keep_to)


@dataclasses.dataclass
class Plan:
    """One launch. The engine runs, in order: releases, host moves, evictions, admissions, then
    the step."""
    release: list[Release] = dataclasses.field(default_factory=list)
    host: list[HostMove] = dataclasses.field(default_factory=list)  # in order (kvcache.radix)
    evict: list[int] = dataclasses.field(default_factory=list)
    admit: list[tuple[Request, list[int], int]] = dataclasses.field(default_factory=list)
    chunks: list[tuple[Request, int]] = dataclasses.field(default_factory=list)  # (req, tokens)
    decode: list[Request] = dataclasses.field(default_factory=list)
    steps: int = 1            # decode steps on the device (1 when chunks run)
    grow_to: int | None = None  # the pool's new page count, applied before everything else
    wait: bool = False        # planned ahead, it stopped at what needs the launch in flight read
    # Per row, by `launched`: (tokens it stores, pages it takes, tokens it samples).
    expect: dict = dataclasses.field(default_factory=dict)

    @property
    def runs(self) -> bool:
        return bool(self.chunks or self.decode)
