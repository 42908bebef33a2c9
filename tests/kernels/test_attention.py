"""Every paged-attention implementation against naive dense causal attention in float64.

The jnp reference and the Pallas kernels in interpret mode run here on any machine; the compiled
GPU kernel runs under `pytest -m gpu` on a GPU and is skipped elsewhere.

Every run draws fresh inputs; the seed is in every failure message. To replay a failure, set
SEED below to that number. K/V of each row sit in pages scattered over the pool by a random
permutation; slots that hold no live token are filled with large garbage, so any masking
mistake shows.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import worklist

SEED = None          # an int replays a failure reported as "seed=..."
K_HEADS, HEAD_DIM = 2, 16   # Triton's dot needs every dimension >= 16
GARBAGE = 40.0       # magnitude of what fills the slots that hold no live token


IMPLS = ["reference", "gpu-interpret", "tpu-interpret", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture
def seed():
    return SEED if SEED is not None else int(np.random.SeedSequence().entropy % 2**63)


def row_lengths(rng, page_size):
    """Ragged: length 1, a length that is not a multiple of the page size, a random one, and a
    padding row (length 0), in random order."""
    odd = int(rng.integers(1, 3)) * page_size + int(rng.integers(1, page_size))
    return rng.permutation([1, odd, int(rng.integers(1, 3 * page_size + 1)), 0]).tolist()


def make_case(rng, *, q_per_kv, page_size, num_queries, fill=GARBAGE, spare_pages=3,
              head_dim=HEAD_DIM, lengths=None):
    """Builds one batch: dense per-row K/V and queries, and the same K/V scattered in pages.

    Queries of row b are its last t_b positions (1 <= t_b <= num_queries), padded with -1; the
    padding row has only padding queries. Lengths default to row_lengths(). Returns a dict of
    numpy arrays.
    """
    g, n = page_size, K_HEADS * q_per_kv
    lengths = row_lengths(rng, g) if lengths is None else lengths
    b = len(lengths)
    pages_of = [math.ceil(s / g) for s in lengths]
    m = max(pages_of) + 1                         # at least one trash column in every row
    num_pages = 1 + sum(pages_of) + spare_pages   # page 0 is the trash page
    ids = rng.permutation(np.arange(1, num_pages))
    table = np.zeros((b, m), np.int32)
    k_pages = rng.uniform(-fill, fill, (num_pages, g, K_HEADS, head_dim))
    v_pages = rng.uniform(-fill, fill, (num_pages, g, K_HEADS, head_dim))
    k_dense, v_dense = [], []
    used = 0
    for row, s in enumerate(lengths):
        table[row, :pages_of[row]] = ids[used:used + pages_of[row]]
        used += pages_of[row]
        kd = rng.standard_normal((s, K_HEADS, head_dim))
        vd = rng.standard_normal((s, K_HEADS, head_dim))
        for pos in range(s):
            k_pages[table[row, pos // g], pos % g] = kd[pos]
            v_pages[table[row, pos // g], pos % g] = vd[pos]
        k_dense.append(kd)
        v_dense.append(vd)
    positions = np.full((b, num_queries), -1, np.int32)
    for row, s in enumerate(lengths):
        t = int(rng.integers(1, min(num_queries, s) + 1)) if s else 0
        positions[row, :t] = np.arange(s - t, s)
    q = rng.standard_normal((b, num_queries, n, head_dim))
    live_pages = set(ids[:used].tolist())
    return dict(q=q, k_pages=k_pages, v_pages=v_pages, table=table, positions=positions,
                lengths=np.asarray(lengths, np.int32), k_dense=k_dense, v_dense=v_dense,
                unused_pages=[p for p in range(num_pages) if p not in live_pages])


def dense_attention(q, k_dense, v_dense, positions, window=None, softcap=None):
    """Naive float64 attention: query at position t sees keys s with t - W < s <= t; a
    soft-cap c maps each logit x to c * tanh(x / c)."""
    b, t_max, n, h = q.shape
    q_per_kv = n // K_HEADS
    out = np.zeros((b, t_max, n, h))
    for row in range(b):
        for t in range(t_max):
            pos = positions[row, t]
            if pos < 0:
                continue
            lo = 0 if window is None else max(0, pos - window + 1)
            keys, values = k_dense[row][lo:pos + 1], v_dense[row][lo:pos + 1]   # [S,K,H]
            for head in range(n):
                kv = head // q_per_kv
                logits = keys[:, kv] @ q[row, t, head] / math.sqrt(h)            # [S]
                if softcap is not None:
                    logits = softcap * np.tanh(logits / softcap)
                p = np.exp(logits - logits.max())
                out[row, t, head] = (p / p.sum()) @ values[:, kv]
    return out


def run(case, dtype=np.float32, window=None, impl="reference", softcap=None):
    cast = lambda x: jnp.asarray(np.asarray(x, dtype))   # noqa: E731
    out = kernels.paged_attention(cast(case["q"]), cast(case["k_pages"]), cast(case["v_pages"]),
                                  jnp.asarray(case["table"]), jnp.asarray(case["positions"]),
                                  jnp.asarray(case["lengths"]), impl=impl,
                                  sliding_window=window, logit_softcap=softcap)
    assert out.shape == case["q"].shape and out.dtype == jnp.dtype(dtype)
    return np.asarray(out, np.float64)


def rounded(case, dtype):
    """The case with every input rounded to dtype (so the reference sees what the kernel sees)."""
    r = lambda x: np.asarray(x, dtype).astype(np.float64)   # noqa: E731
    out = dict(case, q=r(case["q"]), k_pages=r(case["k_pages"]), v_pages=r(case["v_pages"]))
    out["k_dense"] = [r(x) for x in case["k_dense"]]
    out["v_dense"] = [r(x) for x in case["v_dense"]]
    return out


def expected(case, dtype=np.float32, window=None, softcap=None):
    r = rounded(case, dtype)
    return dense_attention(r["q"], r["k_dense"], r["v_dense"], case["positions"], window,
                           softcap)


def describe(seed, case, **kw):
    return (f"seed={seed} lengths={case['lengths'].tolist()} "
            f"positions={case['positions'].tolist()} {kw}")


# float32: logits, softmax and the weighted sum run in float32 over at most ~50 keys of unit
# scale; the float32 rounding of those few steps stays well below 1e-5 of the output scale.
# The compiled GPU kernel keeps float32 dots in float32 (no TF32).
F32_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_queries", [1, 6], ids=["decode", "chunk"])
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("q_per_kv", [1, 3, 8])
def test_matches_dense_attention(impl, seed, q_per_kv, page_size, num_queries):
    rng = np.random.default_rng(seed)
    case = make_case(rng, q_per_kv=q_per_kv, page_size=page_size, num_queries=num_queries)
    out = run(case, impl=impl)
    want = expected(case)
    np.testing.assert_allclose(out, want, **F32_TOL, err_msg=describe(seed, case))
    pad = case["positions"] < 0
    assert pad.any() and not np.any(out[pad]), describe(seed, case)   # padding queries: zero


@pytest.mark.parametrize("window", [1, 3, 6, 100])
@pytest.mark.parametrize("page_size", [4, 16])
def test_sliding_window(impl, seed, page_size, window):
    rng = np.random.default_rng(seed)
    case = make_case(rng, q_per_kv=3, page_size=page_size, num_queries=6)
    out = run(case, window=window, impl=impl)
    want = expected(case, window=window)
    np.testing.assert_allclose(out, want, **F32_TOL, err_msg=describe(seed, case, window=window))
    if window == 100:   # wider than every row: the same as no window
        np.testing.assert_array_equal(out, run(case, impl=impl))


@pytest.mark.parametrize("num_queries,window", [(1, None), (6, None), (6, 5)],
                         ids=["decode", "chunk", "chunk-window"])
def test_logit_softcap(impl, seed, num_queries, window):
    """Gemma-style soft-cap c * tanh(logit / c), with c in [0.5, 2) on logits of unit scale: it
    moves the outputs far beyond the tolerance (checked), so a kernel that ignores the cap, or
    caps after masking (tanh(-inf) = -1), fails."""
    rng = np.random.default_rng(seed)
    cap = float(rng.uniform(0.5, 2.0))
    case = make_case(rng, q_per_kv=3, page_size=4, num_queries=num_queries)
    want = expected(case, window=window, softcap=cap)
    assert np.abs(want - expected(case, window=window)).max() > 0.05
    np.testing.assert_allclose(run(case, window=window, impl=impl, softcap=cap), want,
                               **F32_TOL, err_msg=describe(seed, case, cap=cap))


# bfloat16: inputs are rounded to bf16 before both computations, so the only extra error is the
# final cast of the float32 result to bf16: at most half an ulp, 2**-8 relative (8-bit
# significand), on top of the float32 error above.
# The Pallas kernels also round the softmax weights to bf16 for the weighted sum of V (as flash
# attention does): each weight is off by up to 2**-9 relative, so an output of unit-scale values
# is off by up to ~2**-9 * max|v| absolute on top of the final cast.
BF16_TOL = {"reference": dict(rtol=2.0**-8, atol=1e-5)}
BF16_KERNEL_TOL = dict(rtol=2.0**-8, atol=2.0**-9 * 4)


@pytest.mark.parametrize("num_queries", [1, 6], ids=["decode", "chunk"])
@pytest.mark.parametrize("page_size", [4, 16])
@pytest.mark.parametrize("q_per_kv", [1, 8])
def test_bfloat16(impl, seed, q_per_kv, page_size, num_queries):
    rng = np.random.default_rng(seed)
    case = make_case(rng, q_per_kv=q_per_kv, page_size=page_size, num_queries=num_queries)
    out = run(case, dtype=jnp.bfloat16, impl=impl)
    want = expected(case, jnp.bfloat16)
    np.testing.assert_allclose(out, want, **BF16_TOL.get(impl, BF16_KERNEL_TOL),
                               err_msg=describe(seed, case))
    assert not np.any(out[case["positions"] < 0])


GPU_IMPLS = ["gpu-interpret", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("items", [4, 5, 13])
def test_gpu_kernel_key_splits(impl, seed, items, dtype):
    """Decode rows with their keys cut into work items by length (merged in XLA) or one item a
    row (normalised in the kernel; the batch has 4 rows), 16 keys (4 pages) a key block, so
    empty items occur too."""
    from kernels.gpu import paged_attention_gpu
    rng = np.random.default_rng(seed)
    case = make_case(rng, q_per_kv=3, page_size=4, num_queries=1)
    cast = lambda x: jnp.asarray(np.asarray(x, dtype))   # noqa: E731
    out = paged_attention_gpu(cast(case["q"]), cast(case["k_pages"]), cast(case["v_pages"]),
                              jnp.asarray(case["table"]), jnp.asarray(case["positions"]),
                              jnp.asarray(case["lengths"]), interpret=impl == "gpu-interpret",
                              pages_per_block=4, items=items)
    assert out.dtype == jnp.dtype(dtype)
    tol = F32_TOL if dtype == np.float32 else BF16_KERNEL_TOL
    np.testing.assert_allclose(np.asarray(out, np.float64), expected(case, dtype), **tol,
                               err_msg=describe(seed, case, items=items))
    assert not np.any(np.asarray(out)[case["positions"] < 0])


# float16: as bfloat16 with a 10-bit significand: 2**-11 relative for the final cast and for
# each softmax weight.
FP16_KERNEL_TOL = dict(rtol=2.0**-10, atol=2.0**-11 * 4)


def mosaic_case(impl, seed, *, q_per_kv, page_size, num_queries, longest):
    """A case for the Mosaic GPU kernels (the compiled run skipped before Hopper): head_dim 64,
    rows of 0, 1, an odd number and `longest` = [lo, hi) keys in random order, and NaN in every
    page that holds no live token."""
    if impl == "gpu" and not kernels._hopper_or_newer():
        pytest.skip("the Mosaic GPU kernel needs compute capability 9.0 or later")
    rng = np.random.default_rng(seed)
    odd = int(rng.integers(1, 4)) * page_size + int(rng.integers(1, page_size))
    lengths = rng.permutation([0, 1, odd, int(rng.integers(*longest))]).tolist()
    return poisoned(make_case(rng, q_per_kv=q_per_kv, page_size=page_size,
                              num_queries=num_queries, head_dim=64, lengths=lengths),
                    ["k_pages", "v_pages"])


@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("q_per_kv,page_size,dtype,softcap", [
    (1, 16, jnp.bfloat16, None), (3, 8, jnp.float16, 1.5), (8, 32, jnp.bfloat16, None)])
def test_mosaic_prefill(impl, seed, q_per_kv, page_size, dtype, softcap, monkeypatch):
    """Rows of many query tokens in fp16/bf16 with head_dim 64 go to the Mosaic GPU kernel
    (kernels/mgpu.py), in interpret mode on a CPU: rows of 0, 1, an odd number and several
    128-key blocks of keys (the copy ring wraps), chunk and decode-like rows in one batch,
    query tiles that span several GQA groups, NaN in every page that holds no live token, with
    and without a logit soft-cap."""
    from kernels import mgpu
    case = mosaic_case(impl, seed, q_per_kv=q_per_kv, page_size=page_size, num_queries=40,
                       longest=(257, 400))
    calls = []
    kernel = mgpu.paged_prefill_mgpu
    monkeypatch.setattr(mgpu, "paged_prefill_mgpu",
                        lambda *a, **kw: calls.append(kw) or kernel(*a, **kw))
    out = run(case, dtype=dtype, impl=impl, softcap=softcap)
    assert calls == [{"logit_softcap": softcap, "interpret": impl == "gpu-interpret"}]
    tol = FP16_KERNEL_TOL if dtype == jnp.float16 else BF16_KERNEL_TOL
    np.testing.assert_allclose(out, expected(case, dtype, softcap=softcap), **tol,
                               err_msg=describe(seed, case))
    assert not np.any(out[case["positions"] < 0])


def test_mosaic_consumers_need_different_key_counts(seed):
    """A 270-key row with 40 queries of 8 heads: one program's second consumer warpgroup needs
    a key block its first does not, so the first only drains it (found by the interpreter's
    check that every warpgroup observes every phase of the barriers it waits on)."""
    rng = np.random.default_rng(seed)
    case = make_case(rng, q_per_kv=8, page_size=32, num_queries=40, head_dim=64, lengths=[270])
    case["positions"][0] = np.arange(230, 270)
    out = run(case, dtype=jnp.bfloat16, impl="gpu-interpret")
    np.testing.assert_allclose(out, expected(case, jnp.bfloat16), **BF16_KERNEL_TOL,
                               err_msg=describe(seed, case))


@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("q_per_kv,page_size,dtype,window,softcap,items,stages", [
    (4, 16, jnp.bfloat16, None, 1.5, None, None),  # 8 heads; 2 pages a key block
    (12, 8, jnp.float16, 7, None, 7, 1),           # 24 heads, not a power of 2; one slot
    (8, 4, jnp.bfloat16, 30, 0.7, 4, 2),           # 8 pages a key block; an item a row
    (32, 32, jnp.float16, None, None, 17, 1),      # 64 heads fill the tile
])
def test_mosaic_decode(impl, seed, q_per_kv, page_size, dtype, window, softcap, items,
                       stages, monkeypatch):
    """Decode rows in fp16/bf16 with head_dim 64 go to the Mosaic GPU decode kernel
    (kernels/mgpu.py), in interpret mode on a CPU: rows of 0, 1, an odd number and many key
    blocks of keys (the copy ring wraps), with and without a sliding window and a logit
    soft-cap, keys cut into work items by length (the long row gets several, some items are
    empty) and merged, or one item a row, and NaN in every page that holds no live token. The
    default configuration runs through kernels.paged_attention; the others call the kernel
    with their items and slots."""
    from kernels import mgpu
    case = mosaic_case(impl, seed, q_per_kv=q_per_kv, page_size=page_size, num_queries=1,
                       longest=(150, 260))
    calls = []
    kernel = mgpu.paged_decode_mgpu
    monkeypatch.setattr(mgpu, "paged_decode_mgpu", lambda *a, **kw: calls.append(kw) or kernel(
        *a, **kw, items=items, stages=stages))
    monkeypatch.setattr(mgpu, "DECODE_MIN_KEYS", 0)     # small shapes, to keep interpret fast
    out = run(case, dtype=dtype, window=window, impl=impl, softcap=softcap)
    assert calls == [{"sliding_window": window, "logit_softcap": softcap,
                      "interpret": impl == "gpu-interpret", "work": None}]
    tol = FP16_KERNEL_TOL if dtype == jnp.float16 else BF16_KERNEL_TOL
    np.testing.assert_allclose(out, expected(case, dtype, window, softcap), **tol,
                               err_msg=describe(seed, case, items=items))
    assert not np.any(out[case["positions"] < 0])


@pytest.mark.parametrize("rows,width,page_size,kernel", [
    (1, 128, 16, "triton"), (2, 128, 16, "mosaic"), (1, 256, 16, "mosaic"),
    (4, 64, 8, "triton"), (8, 64, 8, "mosaic")])
def test_decode_dispatch_by_table_size(rows, width, page_size, kernel, monkeypatch):
    """Decode calls with a page table of fewer than mgpu.DECODE_MIN_KEYS key slots go to the
    Triton kernel (its fixed cost per call is smaller), larger ones to the Mosaic GPU kernel."""
    from kernels import gpu, mgpu
    calls = []
    monkeypatch.setattr(mgpu, "paged_decode_mgpu", lambda *a, **kw: calls.append("mosaic"))
    monkeypatch.setattr(gpu, "paged_attention_gpu", lambda *a, **kw: calls.append("triton"))
    q = jnp.zeros((rows, 1, 32, 128), jnp.bfloat16)
    pages = jnp.zeros((4, page_size, 8, 128), jnp.bfloat16)
    table = jnp.zeros((rows, width), jnp.int32)
    kernels.paged_attention(q, pages, pages, table, jnp.zeros((rows, 1), jnp.int32),
                            jnp.ones((rows,), jnp.int32), impl="gpu-interpret")
    assert calls == [kernel]
    assert mgpu.DECODE_MIN_KEYS == 4096


@pytest.mark.parametrize("rows,width,kernel,items", [
    (64, 256, "triton", 64), (96, 512, "triton", 96), (63, 256, "mosaic", None),
    (64, 513, "mosaic", None)])
def test_many_rows_over_a_narrow_table_decode_one_item_a_row(rows, width, kernel, items,
                                                             monkeypatch):
    """Decode calls of >= kernels.UNSPLIT_ROWS rows over a table of <= UNSPLIT_MAX_KEYS key
    slots (page 16 here: 512 pages) go to the Triton kernel with one work item a row (nothing
    to merge); fewer rows, or a wider table, keep the dispatch by table size and its plan."""
    from kernels import gpu, mgpu
    calls = []
    monkeypatch.setattr(mgpu, "paged_decode_mgpu", lambda *a, **kw: calls.append(("mosaic",)))
    monkeypatch.setattr(gpu, "paged_attention_gpu",
                        lambda *a, **kw: calls.append(("triton", kw["items"])))
    q = jnp.zeros((rows, 1, 32, 128), jnp.bfloat16)
    pages = jnp.zeros((4, 16, 8, 128), jnp.bfloat16)
    table = jnp.zeros((rows, width), jnp.int32)
    pos, lens = jnp.zeros((rows, 1), jnp.int32), jnp.ones((rows,), jnp.int32)
    kernels.paged_attention(q, pages, pages, table, pos, lens, impl="gpu-interpret")
    assert calls == [(kernel, items) if kernel == "triton" else (kernel,)]
    work = kernels.decode_work(q, pages, table, pos, lens, impl="gpu-interpret")
    assert work.shape == (3, items or worklist.default_items(rows))
    assert (kernels.UNSPLIT_ROWS, kernels.UNSPLIT_MAX_KEYS) == (64, 8192)


def test_one_item_a_row_equals_dense_attention(seed, monkeypatch):
    """The unsplit dispatch's output: 8 rows of ragged lengths (the bar lowered to 8 rows to
    keep interpret mode quick) through kernels.paged_attention in interpret mode against
    float64 dense attention."""
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(kernels, "UNSPLIT_ROWS", 8)
    case = make_case(rng, q_per_kv=4, page_size=4, num_queries=1,
                     lengths=[int(x) for x in rng.integers(0, 40, 8)])
    assert kernels._unsplit(case["q"], case["k_pages"], case["table"])
    np.testing.assert_allclose(run(case, impl="gpu-interpret"), expected(case), **F32_TOL,
                               err_msg=describe(seed, case))


def poisoned(case, which):
    """Every page that holds no live token (the trash page and the spare pages) set to NaN."""
    case = dict(case)
    for name in which:
        pages = case[name].copy()
        pages[case["unused_pages"]] = np.nan
        case[name] = pages
    return case


@pytest.mark.parametrize("num_queries", [1, 6], ids=["decode", "chunk"])
def test_nan_keys_in_unused_pages_do_not_leak(impl, seed, num_queries):
    rng = np.random.default_rng(seed)
    case = poisoned(make_case(rng, q_per_kv=3, page_size=4, num_queries=num_queries),
                    ["k_pages"])
    assert 0 in case["unused_pages"]
    out = run(case, window=5, impl=impl)
    want = expected(case, window=5)
    np.testing.assert_allclose(out, want, **F32_TOL, err_msg=describe(seed, case))


@pytest.mark.parametrize("num_queries", [1, 6], ids=["decode", "chunk"])
def test_nan_values_in_unused_pages_do_not_leak(impl, seed, num_queries):
    rng = np.random.default_rng(seed)
    case = poisoned(make_case(rng, q_per_kv=3, page_size=4, num_queries=num_queries),
                    ["k_pages", "v_pages"])
    np.testing.assert_allclose(run(case, impl=impl), expected(case), **F32_TOL,
                               err_msg=describe(seed, case))


def test_page_placement_does_not_matter(impl, seed):
    """The same sequences under two different page permutations give the same output."""
    rng = np.random.default_rng(seed)
    case = make_case(rng, q_per_kv=8, page_size=4, num_queries=6)
    perm = np.concatenate([[0], 1 + rng.permutation(len(case["k_pages"]) - 1)])   # keep trash
    moved = dict(case, k_pages=case["k_pages"][np.argsort(perm)],
                 v_pages=case["v_pages"][np.argsort(perm)], table=perm[case["table"]])
    np.testing.assert_allclose(run(moved, impl=impl), run(case, impl=impl), rtol=1e-6, atol=1e-6,
                               err_msg=describe(seed, case))


def test_dispatch():
    backend = jax.default_backend()
    native = backend if backend in ("gpu", "tpu") else "reference"
    assert kernels.resolve_impl("auto") == native
    assert kernels.resolve_impl("reference") == "reference"
    assert kernels.resolve_impl("gpu-interpret") == "gpu-interpret"
    with pytest.raises(ValueError) as err:
        kernels.resolve_impl("flash")
    assert "'flash'" in str(err.value)
    for name in kernels.IMPLEMENTATIONS:
        assert repr(name) in str(err.value)
    for compiled in {"gpu", "tpu"} - {backend}:
        with pytest.raises(ValueError, match=f"needs a {compiled.upper()} backend"):
            kernels.resolve_impl(compiled)
    case = make_case(np.random.default_rng(0), q_per_kv=3, page_size=4, num_queries=2)
    with jax.default_device(jax.devices()[0]):     # the backend's own device, GPU included
        np.testing.assert_array_equal(run(case, impl="auto"), run(case, impl=native))
    for bad in (dict(window=0), dict(softcap=0.0), dict(softcap=-30.0)):
        name = "sliding_window" if "window" in bad else "logit_softcap"
        with pytest.raises(ValueError, match=f"{name} must be None or a positive number"):
            run(case, **bad)


def test_decode_work_follows_the_dispatch():
    """kernels.decode_work makes the plan of the kernel paged_attention would run: the Mosaic
    GPU decode kernel's (one item an SM of an H100 off-GPU), the Triton one's (~4 waves of
    programs a KV head), and none for prefill calls or the reference."""
    q = jax.ShapeDtypeStruct((4, 1, 32, 128), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((64, 16, 8, 128), jnp.bfloat16)
    table, lens = jnp.ones((4, 64), jnp.int32), jnp.array([1000, 16, 0, 5], jnp.int32)
    pos = (lens - 1)[:, None]
    work = kernels.decode_work(q, pages, table, pos, lens, impl="gpu-interpret")
    assert work.shape == (3, 132) and np.bincount(np.asarray(work[0]), minlength=5)[3] == 1
    q32 = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    f32 = jax.ShapeDtypeStruct(pages.shape, jnp.float32)
    assert kernels.decode_work(q32, f32, table, pos, lens, impl="gpu-interpret").shape == (3, 66)
    chunk = jax.ShapeDtypeStruct((4, 6, 32, 128), jnp.bfloat16)
    assert kernels.decode_work(chunk, pages, table, pos, lens, impl="gpu-interpret") is None
    assert kernels.decode_work(q, pages, table, pos, lens, impl="reference") is None


FP8 = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


@pytest.mark.parametrize("impl", ["reference", "gpu-interpret", "tpu-interpret",
                                  pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fp8", list(FP8))
@pytest.mark.parametrize("page_size,q_per_kv,head_dim,num_queries", [
    (8, 2, 32, 1), (16, 16, 64, 1), (32, 20, 32, 1), (16, 2, 64, 5)])
def test_fp8_pages(impl, seed, fp8, page_size, q_per_kv, head_dim, num_queries):
    """K/V pages in fp8 (e4m3, e5m2), queries in bfloat16: after JAX's quantized paged-attention
    test grid (page 8/16/32, GQA 2/16/20, head_dim 32/64; rows of 1, an odd number and a
    random number of keys, and a padding row), decode rows and a chunk, against float64
    attention over the dequantised K/V: mean relative error <= 0.05 (JAX's own test accepts
    0.3). Q is rounded to bfloat16 in the reference as well, so what remains is the kernel's
    arithmetic (bf16 products, float32 sums)."""
    if impl == "gpu" and kernels.compute_capability() < 8.9:
        pytest.skip("fp8 pages need compute capability 8.9 or later")
    rng = np.random.default_rng(seed)
    case = make_case(rng, q_per_kv=q_per_kv, page_size=page_size, num_queries=num_queries,
                     head_dim=head_dim, fill=0.0)
    dtype = FP8[fp8]
    k_pages = jnp.asarray(case["k_pages"], dtype)
    v_pages = jnp.asarray(case["v_pages"], dtype)
    deq = dict(case, q=np.asarray(jnp.asarray(case["q"], jnp.bfloat16), np.float64))
    for name, pages in (("k", k_pages), ("v", v_pages)):
        dense = np.asarray(pages, np.float64)
        deq[f"{name}_dense"] = [np.stack([dense[case["table"][r, s // page_size], s % page_size]
                                          for s in range(length)]).reshape(
            length, K_HEADS, head_dim) if length else np.zeros((0, K_HEADS, head_dim))
            for r, length in enumerate(case["lengths"])]
    out = kernels.paged_attention(jnp.asarray(case["q"], jnp.bfloat16), k_pages, v_pages,
                                  jnp.asarray(case["table"]), jnp.asarray(case["positions"]),
                                  jnp.asarray(case["lengths"]), impl=impl)
    got = np.asarray(out, np.float64)
    want = dense_attention(deq["q"], deq["k_dense"], deq["v_dense"], case["positions"])
    live = case["positions"] >= 0
    err = np.abs(got - want)[live].mean() / np.abs(want)[live].mean()
    assert err <= 0.05, describe(seed, case, fp8=fp8, err=err)
    assert not np.any(got[~live])
