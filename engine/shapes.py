"""The shapes the jitted launches take: every batch is padded to a bucket, so each launch
compiles a bounded number of times.

A mixed step compiles once per (decode rows, chunk rows, chunk length) bucket, a decode loop
once per (rows, steps) bucket, per pool size. Decode rows in a mixed step go up in powers of 4
(they cost one token each, so padding them is cheap), chunk lengths in powers of 2 from 64:
with the defaults 5 x 3 x 4 mixed shapes and 2 x 7 loops, which `ModelRunner.warmup` compiles
at start-up.
"""

import dataclasses

from engine.config import EngineConfig


def bucket(n: int, lo: int, hi: int, factor: int = 2) -> int:
    """Smallest power of factor >= max(n, lo), capped at hi: shapes compile once per bucket."""
    b = 1
    while b < max(n, lo):
        b *= factor
    return min(b, hi)


@dataclasses.dataclass(frozen=True)
class Buckets:
    config: EngineConfig

    def mixed_rows(self, n: int) -> int:
        return bucket(n, 1, self.config.max_running_requests, factor=4) if n else 0

    def chunk_rows(self, n: int) -> int:
        return bucket(n, 1, self.config.max_prefill_rows)

    def chunk_len(self, n: int) -> int:
        return bucket(n, 64, bucket(self.config.chunked_prefill_size, 16, 1 << 30))

    def loop_rows(self, n: int) -> int:
        return bucket(n, 1, self.config.max_running_requests)

    def step_shapes(self) -> tuple[list, list]:
        """Every (decode rows, chunk rows, chunk length) of a mixed step and every (rows, steps)
        of a decode loop that the scheduler's plans can take, as padded to their buckets."""
        c = self.config
        dec = sorted({self.mixed_rows(n) for n in range(c.max_running_requests + 1)})
        rows = sorted({self.chunk_rows(n) for n in range(1, c.max_prefill_rows + 1)})
        lens = sorted({self.chunk_len(n) for n in range(1, c.chunked_prefill_size + 1)})
        loops = sorted({self.loop_rows(n) for n in range(1, c.max_running_requests + 1)})
        return ([(d, r, t) for d in dec for r in rows for t in lens],
                [(b, s) for b in loops for s in sorted({1, c.num_continuous_decode_steps})])


def step_key(feeds) -> tuple:
    """A mixed step's compiled shape, as the runner logs and counts it."""
    return ("step", *((f.tokens.shape, f.sampling.filtering) for f in feeds))


def loop_key(state, steps: int) -> tuple:
    """A decode loop's compiled shape: rows, stop ids a row, filtering, steps."""
    return ("decode loop", *state.stop_ids.shape, state.sampling.filtering, steps)
