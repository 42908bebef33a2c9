"""kernels.tpu (Pallas Mosaic TPU kernel) against the jnp reference, in the TPU interpreter.

Every kernel call runs under `pltpu.InterpretParams(detect_races=True)` and must leave the
interpreter's race detector clean. Each run draws fresh inputs; the seed is in every failure
message (set SEED to replay one). Pages of each row are scattered over the pool by a random
permutation; pages no row references (the trash page 0 included) and the slots past each row's
length hold NaN in the pools the kernel sees, and finite garbage in the copy the reference sees
(the reference multiplies zero probabilities by every value of a row's pages, so NaN would leak
there by design).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels.reference import paged_attention_reference
from kernels.tpu import paged_attention_tpu

SEED = None          # an int replays a failure reported as "seed=..."
K_HEADS = 2
GARBAGE = 40.0       # what the reference sees where the kernel sees NaN


@pytest.fixture
def seed():
    return SEED if SEED is not None else int(np.random.SeedSequence().entropy % 2**63)


@pytest.fixture(autouse=True)
def clean_interpreter():
    yield
    pltpu.reset_tpu_interpret_mode_state()   # after a failure inside the interpreter


def odd_length(rng, g):
    """A length of one to two full pages plus a partial one: never a multiple of g."""
    return int(rng.integers(1, 3)) * g + int(rng.integers(1, g))


def decode_rows(rng, g):
    """Ragged decode batch: lengths 1, odd, random and 0 (a padding row), one query each."""
    lengths = rng.permutation([1, odd_length(rng, g), int(rng.integers(1, 3 * g + 1)), 0])
    return [(int(s), [s - 1] if s else []) for s in lengths]


def mixed_rows(rng, g, t):
    """Decode rows (one ending mid-page, one on a page boundary), a prefill chunk after a cached
    prefix, a first chunk and a padding row."""
    chunk = int(rng.integers(2, t + 1))
    prefix = odd_length(rng, g)
    first = int(rng.integers(1, t + 1))
    decode, full = odd_length(rng, g), int(rng.integers(1, 3)) * g
    rows = [(decode, [decode - 1]), (full, [full - 1]),
            (prefix + chunk, list(range(prefix, prefix + chunk))), (first, list(range(first))),
            (0, [])]
    return [rows[i] for i in rng.permutation(len(rows))]


def make_case(rng, rows, *, t, q_per_kv, page_size, head_dim, spare_pages=2):
    """One batch from rows of (kv_len, query positions); numpy arrays in a dict.

    Query positions are placed in random slots of the row's t slots (the rest -1), so live
    tokens and padding interleave. k/v_pages have NaN in every unreferenced page and in the
    slots past kv_len; k/v_clean hold finite garbage there instead.
    """
    g, n, b = page_size, K_HEADS * q_per_kv, len(rows)
    pages_of = [math.ceil(s / g) for s, _ in rows]
    m = max(pages_of) + 1                          # a trash column in every row
    num_pages = 1 + sum(pages_of) + spare_pages    # page 0 is the trash page
    ids = rng.permutation(np.arange(1, num_pages))
    table = np.zeros((b, m), np.int32)
    shape = (num_pages, g, K_HEADS, head_dim)
    k_clean, v_clean = rng.uniform(-GARBAGE, GARBAGE, (2, *shape))
    live = np.zeros(shape[:2], bool)               # [P,G]
    positions = np.full((b, t), -1, np.int32)
    used = 0
    for row, (s, pos) in enumerate(rows):
        table[row, :pages_of[row]] = ids[used:used + pages_of[row]]
        used += pages_of[row]
        for p in range(s):
            page, slot = table[row, p // g], p % g
            k_clean[page, slot], v_clean[page, slot] = rng.standard_normal((2, K_HEADS, head_dim))
            live[page, slot] = True
        positions[row, rng.permutation(t)[:len(pos)]] = pos
    k_pages, v_pages = k_clean.copy(), v_clean.copy()
    k_pages[~live], v_pages[~live] = np.nan, np.nan
    return dict(q=rng.standard_normal((b, t, n, head_dim)), k_pages=k_pages, v_pages=v_pages,
                k_clean=k_clean, v_clean=v_clean, table=table, positions=positions,
                lengths=np.asarray([s for s, _ in rows], np.int32), v_live=v_clean[live])


def run_tpu(case, dtype, table=None, **kw):
    """The kernel in the TPU interpreter, with race detection; float64 numpy output."""
    cast = lambda x: jnp.asarray(np.asarray(x, dtype))   # noqa: E731
    out = paged_attention_tpu(cast(case["q"]), cast(case["k_pages"]), cast(case["v_pages"]),
                              jnp.asarray(case["table"] if table is None else table),
                              jnp.asarray(case["positions"]), jnp.asarray(case["lengths"]),
                              interpret=True, **kw)
    out = np.asarray(out)
    races = tpu_interpreter.races     # the last interpreted call's; no public accessor in jax 0.11.2
    assert races is not None and not races.races_found, "the interpreter reported a race"
    assert out.shape == case["q"].shape and out.dtype == jnp.dtype(dtype)
    return out.astype(np.float64)


def run_reference(case, dtype, window=None):
    """The reference in float32 on the clean pools, inputs first rounded to dtype."""
    cast = lambda x: jnp.asarray(np.asarray(x, dtype), jnp.float32)   # noqa: E731
    out = paged_attention_reference(cast(case["q"]), cast(case["k_clean"]),
                                    cast(case["v_clean"]), jnp.asarray(case["table"]),
                                    jnp.asarray(case["positions"]),
                                    jnp.asarray(case["lengths"]), sliding_window=window)
    return np.asarray(out, np.float64)


def describe(seed, case, **kw):
    return (f"seed={seed} lengths={case['lengths'].tolist()} "
            f"positions={case['positions'].tolist()} {kw}")


def check_f32(seed, case, window=None, **kw):
    """float32: the kernel and the reference both compute in f32 over at most ~100 keys of
    unit scale, differing only in summation order and the online rescaling; that rounding stays
    well below 1e-5 of the largest output."""
    out = run_tpu(case, np.float32, sliding_window=window, **kw)
    want = run_reference(case, np.float32, window)
    msg = describe(seed, case, window=window, **kw)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max(), msg
    pad = case["positions"] < 0
    assert pad.any() and not np.any(out[pad]), msg      # padding queries: exactly zero


@pytest.mark.parametrize("q_per_kv,page_size,head_dim,pages_per_block", [
    (1, 16, 128, 1), (3, 64, 64, 1), (8, 16, 64, None)])
def test_decode_batch(seed, q_per_kv, page_size, head_dim, pages_per_block):
    rng = np.random.default_rng(seed)
    case = make_case(rng, decode_rows(rng, page_size), t=1, q_per_kv=q_per_kv,
                     page_size=page_size, head_dim=head_dim)
    check_f32(seed, case, pages_per_block=pages_per_block)


@pytest.mark.parametrize("q_per_kv,page_size,t,tokens_per_block", [(3, 16, 12, 8),
                                                                  (8, 64, 6, 2)])
def test_mixed_batch(seed, q_per_kv, page_size, t, tokens_per_block):
    """Decode rows, chunks at an offset and padding in one call; several query blocks per row
    and several key blocks per query block, so the DMA chain crosses programs."""
    rng = np.random.default_rng(seed)
    case = make_case(rng, mixed_rows(rng, page_size, t), t=t, q_per_kv=q_per_kv,
                     page_size=page_size, head_dim=64)
    check_f32(seed, case, pages_per_block=2, tokens_per_block=tokens_per_block)


def test_sliding_window(seed):
    rng = np.random.default_rng(seed)
    case = make_case(rng, mixed_rows(rng, 16, 8), t=8, q_per_kv=3, page_size=16, head_dim=64)
    window = int(rng.integers(1, 40))
    check_f32(seed, case, window=window, pages_per_block=1, tokens_per_block=8)


def test_pages_outside_the_visible_span_are_never_read(seed):
    """Page-table entries past each row's last query and wholly before the window of its first
    query are replaced by an id past the pool: the interpreter raises on any DMA of one. A
    window of 5 over at most 4 queries spans at most 2 pages, so every 3-page key block has a
    page past the span, which must be skipped."""
    rng = np.random.default_rng(seed)
    g, window = 16, 5
    case = make_case(rng, mixed_rows(rng, g, 4), t=4, q_per_kv=1, page_size=g, head_dim=64)
    table = case["table"].copy()
    bad = len(case["k_pages"]) + 7
    for row, pos in enumerate(case["positions"]):
        live = pos[pos >= 0]
        if not live.size:
            table[row] = bad
            continue
        table[row, (live.max() // g) + 1:] = bad
        table[row, :max(live.min() - window + 1, 0) // g] = bad
    out = run_tpu(case, np.float32, table=table, sliding_window=window, pages_per_block=3)
    want = run_reference(case, np.float32, window)
    assert np.abs(out - want).max() <= 1e-5 * np.abs(want).max(), describe(seed, case)


# Half precision: inputs are rounded to the dtype for both sides. bfloat16 goes to the MXU as
# bf16: Q.K products are exact in f32 as in the reference, but the probabilities are rounded to
# bf16 (2**-9 relative) before P @ V, moving an output by at most 2**-9 * max|V|; then the
# result is rounded to bf16, half an ulp: 2**-8 relative. float16 is computed in f32 and only
# rounded at the end: 2**-11 relative.
HALF = {jnp.bfloat16: (2.0**-9, 2.0**-8), np.float16: (0.0, 2.0**-11)}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16], ids=["bf16", "fp16"])
def test_half_precision(seed, dtype):
    rng = np.random.default_rng(seed)
    case = make_case(rng, mixed_rows(rng, 32, 6), t=6, q_per_kv=4, page_size=32, head_dim=256)
    out = run_tpu(case, dtype)                   # default block sizes
    want = run_reference(case, dtype)
    p_err, out_err = HALF[dtype]
    v_max = np.abs(np.asarray(case["v_live"], dtype).astype(np.float64)).max()
    tol = p_err * v_max + out_err * np.abs(want) + 1e-5 * np.abs(want).max()
    assert np.all(np.abs(out - want) <= tol), describe(seed, case, dtype=dtype)
    assert not np.any(out[case["positions"] < 0])


def test_race_detector_catches_a_read_before_the_dma_wait():
    """The race assertion in run_tpu is live: a kernel that reads its DMA buffer before waiting
    on the copy makes the interpreter report a race."""
    def racy(x_hbm, o_ref, buf, sem):
        copy = pltpu.make_async_copy(x_hbm, buf, sem.at[0])
        copy.start()
        o_ref[...] = buf[...]
        copy.wait()

    pl.pallas_call(racy, grid=(1,), in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
                   out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
                   scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32),
                                   pltpu.SemaphoreType.DMA((1,))],
                   out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                   interpret=pltpu.InterpretParams(detect_races=True),
                   )(jnp.ones((8, 128), jnp.float32)).block_until_ready()
    assert tpu_interpreter.races.races_found
