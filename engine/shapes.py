"""The shapes the compiled launches take. Every launch is padded to a `Shape`, so the engine
runs a bounded set of compiled programs (engine.programs compiles them).

A decode loop is shaped by its rows (powers of 4 up to --max-running-requests) and its steps
(--num-continuous-decode-steps, or 1). A mixed step by its decode rows (none, or powers of 4)
and its prompt chunks: one chunk of 64, 256 or --chunked-prefill-size tokens, or up to
--max-prefill-rows chunks of at most chunked_prefill_size / max_prefill_rows tokens each (the
scheduler lets several rows share a step only in such short chunks). Powers of 4, not 2: the
padding is cheap (a padded decode row is one token of weight-bound matrix work and reads no
KV; a short prompt rarely pads by more than 4x) and the shapes are half as many. Each shape
has a variant per sampler level (engine.sampling: PLAIN; ADJUSTED, with log probabilities and
biases; GUIDED, with a grammar's mask; FILTERED, which sorts the vocabulary for top-k / top-p;
PROMPT, with prompt log probabilities); only the largest shapes are compiled above PLAIN (the
rest run such requests padded to them), and GUIDED's one-step loop.
"""

import dataclasses
import math

import kvcache
from engine.config import EngineConfig
from engine.sampling import ADJUSTED, FILTERED, GUIDED, PLAIN, PROMPT

FACTOR = 4          # bucket growth of rows and single-chunk lengths
MIN_CHUNK = 64      # the shortest single-chunk bucket


def bucket(n: int, lo: int, hi: int, factor: int = 2) -> int:
    """Smallest power of factor >= max(n, lo), capped at hi: shapes compile once per bucket."""
    b = 1
    while b < max(n, lo):
        b *= factor
    return min(b, hi)


def shared_chunk_len(chunk_size: int, max_prefill_rows: int) -> int:
    """The most tokens a chunk may have when it shares a step with other chunks."""
    return max(1, chunk_size // max_prefill_rows)


def ring_plan(cfg, config: EngineConfig, context_length: int) -> tuple[int, int, int]:
    """(layers, pages a row, scratch pages for a step's prompt chunks) of the ring pools that
    keep the sliding-window layers' KV window-sized (kvcache.page_table), or zeros:
    EngineConfig.local_kv "full", or a model without both window and global layers. A ring
    that holds a row's whole context needs no scratch; otherwise a step's chunks take
    ceil(tokens / G) + 1 pages a row, tokens as padded (engine.shapes): one long chunk, or
    --max-prefill-rows short ones."""
    windows = [w for w in (cfg.window(i) for i in range(cfg.num_layers)) if w is not None]
    if config.local_kv != "window" or not 0 < len(windows) < cfg.num_layers:
        return 0, 0, 0
    g = config.page_size
    width = math.ceil(context_length / g)
    ring = kvcache.ring_pages(max(windows), g, width)
    if ring == width:
        return len(windows), ring, 0
    c, rows = config.chunked_prefill_size, config.max_prefill_rows
    single = math.ceil(bucket(c, 1, 1 << 30) / g) + 1
    shared = rows * (math.ceil(shared_chunk_len(c, rows) / g) + 1) if rows > 1 else 0
    return len(windows), ring, max(single, shared)


@dataclasses.dataclass(frozen=True, order=True)
class Shape:
    """One compiled launch, at a pool of `pages` pages: a mixed step ("step": `rows` decode
    rows, 0 for none, beside `chunk_rows` chunks of `chunk_len` tokens) or a decode loop
    ("loop": `rows` rows, `steps` steps). sampler: its sampler's level (engine.sampling)."""
    kind: str
    pages: int
    rows: int
    chunk_rows: int = 0
    chunk_len: int = 0
    steps: int = 1
    sampler: int = PLAIN

    def covers(self, need: "Shape") -> bool:
        """Whether need's launch can run as this one, padded (rows past need's are padding;
        a loop's steps past need's are spent by rows whose budget is capped at need.steps)."""
        return (self.kind == need.kind and self.pages == need.pages and self.rows >= need.rows
                and self.chunk_rows >= need.chunk_rows and self.chunk_len >= need.chunk_len
                and self.steps >= need.steps and self.sampler >= need.sampler)

    @property
    def cost(self) -> tuple:
        """Padded token-steps, then the sampler's level: the covering shape of least cost runs
        a launch."""
        return (self.rows * self.steps + self.chunk_rows * self.chunk_len, self.sampler)


@dataclasses.dataclass(frozen=True)
class Buckets:
    config: EngineConfig

    def rows(self, n: int) -> int:
        """The decode rows a launch of n decode rows is padded to."""
        return bucket(n, 1, self.config.max_running_requests, FACTOR) if n else 0

    @property
    def shared_len(self) -> int:
        c = self.config
        return shared_chunk_len(c.chunked_prefill_size, c.max_prefill_rows)

    def chunks(self, lengths: list[int]) -> tuple[int, int]:
        """(rows, tokens a row) of a step's prompt chunks of these lengths."""
        if len(lengths) > 1:
            assert max(lengths) <= self.shared_len, lengths
            return self.config.max_prefill_rows, self.shared_len
        return 1, self._single(lengths[0])

    def _single(self, n: int) -> int:
        return bucket(n, MIN_CHUNK, bucket(self.config.chunked_prefill_size, 1, 1 << 30), FACTOR)

    def step(self, pages: int, decode: int, lengths: list[int], sampler: int) -> Shape:
        r, t = self.chunks(lengths)
        return Shape("step", pages, self.rows(decode), r, t, 1, sampler)

    def loop(self, pages: int, rows: int, steps: int, sampler: int) -> Shape:
        return Shape("loop", pages, self.rows(rows), steps=steps, sampler=sampler)

    def shapes(self, pages: int) -> list[Shape]:
        """Every shape a launch at a pool of `pages` pages may need, at the PLAIN sampler."""
        c = self.config
        rows = sorted({self.rows(n) for n in range(1, c.max_running_requests + 1)})
        chunks = sorted({(1, self._single(n)) for n in range(1, c.chunked_prefill_size + 1)})
        if c.max_prefill_rows > 1:
            chunks.append((c.max_prefill_rows, self.shared_len))
        steps = sorted({1, c.num_continuous_decode_steps})
        return ([Shape("step", pages, d, r, t) for d in [0, *rows] for r, t in chunks]
                + [Shape("loop", pages, b, steps=s) for b in rows for s in steps])

    def largest(self, pages: int, sampler: int = FILTERED) -> list[Shape]:
        """The fewest shapes that cover every launch at `pages` pages up to this sampler
        level: the longest decode loop at the most rows, and a mixed step at the most decode
        rows for each chunk layout (the longest single chunk; the most shared chunks)."""
        every = self.shapes(pages)
        loops = [s for s in every if s.kind == "loop"]
        steps = [s for s in every if s.kind == "step"]
        top = [max(loops, key=lambda s: s.cost)]
        for r in sorted({s.chunk_rows for s in steps}):
            top.append(max((s for s in steps if s.chunk_rows == r), key=lambda s: s.cost))
        return [dataclasses.replace(s, sampler=sampler) for s in top]

    def shapes_for(self, pages: int) -> tuple[list[Shape], list[Shape]]:
        """(the largest shapes, the others) at a pool of `pages` pages. The others: every
        shape at the PLAIN sampler, then the largest at ADJUSTED (so that launches wanting log
        probabilities or biases, without top-k / top-p, stop sorting the vocabulary) and at
        GUIDED (structured output; its one-step loop too), then the largest mixed steps at
        PROMPT (prompt log probabilities)."""
        prompt = [s for s in self.largest(pages, PROMPT) if s.kind == "step"]
        guided = self.largest(pages, GUIDED)
        # Guided rows draw one token a launch: a loop of them alone runs one step.
        guided += [dataclasses.replace(s, steps=1) for s in guided if s.kind == "loop"]
        return self.largest(pages), (self.shapes(pages) + self.largest(pages, ADJUSTED)
                                     + guided + prompt)
