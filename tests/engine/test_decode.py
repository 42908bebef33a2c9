"""Decode step compilation, on-device sampling, and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_pool_clean

from engine import LLM, InvalidRequest, SamplingParams, packing
from engine.sampling import ADJUSTED, PLAIN, PROMPT, chunked_top_k, sample
from engine.step import Feed, SamplingArrays, decode_step

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-random", dtype="float32", page_size=4, context_length=128, max_running_requests=8,
               num_continuous_decode_steps=4)


@pytest.fixture
def compiles():
    events = []

    def listener(event, duration, **_):
        if event == COMPILE_EVENT:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield events
    jax.monitoring.unregister_event_duration_listener(listener)


def test_step_compiles_once_per_batch_bucket():
    """50 steps over changing rows, tokens and active masks: one trace (so one compile) per
    batch size."""
    llm = LLM("tiny-random", page_size=4, context_length=128, max_running_requests=8)
    llm.generate([[1, 2, 3]] * 8, SamplingParams(max_tokens=2, temperature=0))
    traces = []

    def traced_step(*args, **kwargs):
        traces.append(args[-1].temperature.shape)
        return decode_step(*args, **kwargs)

    step = jax.jit(traced_step, static_argnums=0, donate_argnames="cache")
    rng = np.random.default_rng()
    e = llm.engine
    cache = e.cache
    for i in range(50):
        b = 4 if i % 2 else 8
        rows = jnp.asarray(rng.permutation(8)[:b], jnp.int32)
        greedy = SamplingArrays(jnp.zeros(b), jnp.zeros(b, jnp.int32), jnp.ones(b),
                                jnp.zeros(b, jnp.uint32))
        _, _, cache, ok, _ = step(e.graphdef, e.params, cache, rows,
                                  jnp.asarray(rng.integers(0, 200, b), jnp.int32),
                                  jnp.asarray(rng.random(b) < 0.7), greedy)
        assert bool(jnp.all(ok))
    assert sorted(traces) == [(4,), (8,)]


def test_generate_reuses_compiled_buckets(compiles):
    llm = LLM("tiny-random", page_size=4, context_length=128, max_running_requests=8, num_continuous_decode_steps=4)
    params = SamplingParams(max_tokens=6, temperature=0)
    llm.generate([[1, 2, 3], [4, 5, 6, 7, 8]], params)
    first = len(compiles)
    llm.generate([[9, 8, 7, 6], [5, 4]], params)
    assert first > 0 and len(compiles) == first
    assert_pool_clean(llm)


def test_seeded_sampling_is_independent_of_the_batch(llm):
    """The random stream depends on (seed, position) only. float32 with exact matmuls, so the
    logits themselves do not depend on the batch size on an accelerator either."""
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=7)
    with jax.default_matmul_precision("highest"):
        alone = llm.generate([[10, 11, 12]], p)[0].token_ids
        with_others = llm.generate([[1], [10, 11, 12], [5, 6, 7, 8, 9]], p)[1].token_ids
        other_seed = llm.generate([[10, 11, 12]], SamplingParams(max_tokens=12, temperature=0.9,
                                                                 seed=8))[0].token_ids
    assert alone == with_others != other_seed
    assert_pool_clean(llm)


def test_sampler_filters():
    rng = np.random.default_rng()
    logits = jnp.asarray(rng.normal(size=(256, 50)) * 3, jnp.float32)
    b = logits.shape[0]
    ones, zeros = jnp.ones(b), jnp.zeros(b, jnp.int32)
    seeds = jnp.asarray(rng.integers(0, 2**32, b), jnp.uint32)
    argmax = np.argmax(np.asarray(logits), axis=-1)
    top2 = np.argsort(-np.asarray(logits), axis=-1)[:, :2]
    greedy = sample(logits, jnp.zeros(b), zeros, ones, seeds, zeros).tokens
    top_k1 = sample(logits, ones, zeros + 1, ones, seeds, zeros).tokens
    tiny_p = sample(logits, ones, zeros, ones * 1e-6, seeds, zeros).tokens
    k2 = np.asarray(sample(logits, ones * 5, zeros + 2, ones, seeds, zeros).tokens)
    free = np.asarray(sample(logits, ones * 5, zeros, ones, seeds, zeros).tokens)
    np.testing.assert_array_equal(greedy, argmax)
    np.testing.assert_array_equal(top_k1, argmax)
    np.testing.assert_array_equal(tiny_p, argmax)
    assert all(k2[i] in top2[i] for i in range(b))
    at_prompt = sample(logits, ones * 5, zeros + 2, ones, seeds, zeros, level=PROMPT).tokens
    np.testing.assert_array_equal(at_prompt, k2)        # PROMPT filters as FILTERED does
    assert np.mean([free[i] in top2[i] for i in range(b)]) < 0.9  # hot: the filter mattered
    # Below FILTERED the sort is skipped: right for rows that do not filter, and the
    # FILTERED path leaves those rows' draws alone when others in the batch filter. ADJUSTED
    # gives FILTERED's log probabilities (the chunked top-k: a vocabulary of 50 is one chunk
    # of 16 below) and PLAIN none.
    plain = sample(logits, ones * 5, zeros, ones, seeds, zeros, level=PLAIN)
    adjusted = sample(logits, ones * 5, zeros, ones, seeds, zeros, level=ADJUSTED)
    filtered = sample(logits, ones * 5, zeros, ones, seeds, zeros)
    np.testing.assert_array_equal(plain.tokens, free)
    for got in adjusted, filtered:
        np.testing.assert_array_equal(got.tokens, free)
        np.testing.assert_array_equal(got.top_ids, chunked_top_k(logits, 20, chunk=16)[1])
        np.testing.assert_allclose(got.logprob, jax.nn.log_softmax(logits)[np.arange(b), free],
                                   rtol=1e-6, atol=1e-6)
    assert plain.top_ids.shape == (b, 0)
    mixed_k = jnp.where(jnp.arange(b) % 2 == 0, 2, 0)
    mixed = np.asarray(sample(logits, ones * 5, mixed_k, ones, seeds, zeros).tokens)
    np.testing.assert_array_equal(mixed[1::2], free[1::2])
    np.testing.assert_array_equal(mixed[::2], k2[::2])


@pytest.mark.parametrize("kwargs, message", [
    ({"layout": "dense"}, "unknown layout 'dense'"),
    ({"page_size": 12}, "page_size must be a power of two, got 12"),
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
    ({"attention_impl": "magic"}, "unknown attention_impl 'magic'"),
    ({"kv_cache_dtype": "int4"}, r"unknown kv_cache_dtype 'int4'; choose one of \['auto', "
                                 r"'bfloat16', 'float16', 'float32', 'fp8_e4m3', 'fp8_e5m2'\]"),
    ({"max_running_requests": 0}, "max_running_requests must be >= 1, got 0"),
    ({"max_running_requests": "8"}, "max_running_requests must be int, got '8'"),
    ({"max_num_seqs": 8}, r"unknown engine option\(s\) \['max_num_seqs'\]"),
    ({"context_length": 4096}, "exceeds the model's max_position_embeddings=2048; set "
                               "HYBRIDKV_ALLOW_LONGER_CONTEXT=1"),
    ({"max_total_tokens": 10**12}, "needs .* bytes but .* bytes are (available|free).*"
                                   "--max-total-tokens"),
])
def test_bad_engine_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM("tiny-random", **kwargs)


def test_longer_context_with_the_override(monkeypatch):
    """HYBRIDKV_ALLOW_LONGER_CONTEXT lets a request run past the model's 2048 positions."""
    from engine import envs
    monkeypatch.setattr(envs, "ALLOW_LONGER_CONTEXT", True)
    llm = LLM("tiny-random", context_length=2304, max_running_requests=1, layout="paged")
    out = llm.generate([[5] * 2290], SamplingParams(max_tokens=6, temperature=0,
                                                    ignore_eos=True))[0]
    assert len(out.token_ids) == 6


def test_engine_options_are_checked_before_the_model_loads():
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        LLM("/no/such/checkpoint", page_size=12)


@pytest.mark.parametrize("prompt, params, message", [
    ([1] * 120, SamplingParams(max_tokens=10), "120 tokens .* 130 exceeds the context length"),
    ([], SamplingParams(), "prompt 0: the prompt is empty"),
    ("", SamplingParams(), "prompt 0: the prompt is empty"),
    ([1, 99999], SamplingParams(), "token ids outside"),
    ([1, 2.5], SamplingParams(), "text or a list of token ids"),
    ("a\ud800b", SamplingParams(), "lone UTF-16 surrogate"),
    ([1, 2], SamplingParams(stop_token_ids=[300]), r"stop_token_ids has token ids outside "
                                                   r"\[0, 261\): \[300\]"),
    ([1, 2], SamplingParams(top_k=262), "top_k is 262 but the vocabulary has 261 tokens"),
])
def test_bad_requests(llm, prompt, params, message):
    with pytest.raises(InvalidRequest, match=message):
        llm.generate([prompt], params)
    assert_pool_clean(llm)


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2**31}, "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2**31}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"stop_token_ids": [2**31]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": "12"}, "stop_token_ids"),
    ({"stop_token_ids": list(range(33))}, "stop_token_ids"),
    ({"ignore_eos": 1}, "ignore_eos"),
])
def test_bad_sampling_params_name_their_field(kwargs, param):
    """Every value outside engine.limits raises InvalidRequest (a ValueError) naming the field
    and the value it got."""
    with pytest.raises(InvalidRequest, match=f"^{param} must be|^{param} has") as err:
        SamplingParams(**kwargs)
    assert err.value.param == param and isinstance(err.value, ValueError)


def test_sampling_params_at_their_limits_are_accepted():
    p = SamplingParams(max_tokens=2**31 - 1, temperature=0, top_p=1e-9, top_k=2**31 - 1,
                       seed=2**32 - 1, stop_token_ids=list(range(32)))
    assert p.stop_token_ids == tuple(range(32))


def test_request_larger_than_the_pool():
    llm = LLM("tiny-random", page_size=4, context_length=128, max_total_tokens=32,
              dtype="float32")   # KV bytes as on every backend ('auto' is bf16 on a GPU)
    with pytest.raises(ValueError, match=r"may hold 48 tokens \(12 pages of 4, 98,304 bytes of KV\) "
                                         r"but the KV pool holds at most 8 pages \(32 tokens, 65,536 "
                                         r"bytes\)"):
        llm.generate([[1] * 40], SamplingParams(max_tokens=9))


@pytest.mark.parametrize("vocab", [1000, 1024, 1031])
def test_chunked_top_k_is_lax_top_k(vocab):
    """Values and ids, ties (to the lower id) across chunk edges, between chunk maxima and
    everywhere (a row of integers), and -inf included, for a vocabulary that is a whole number
    of chunks and ones that pad the last."""
    rng = np.random.default_rng()
    x = rng.normal(size=(7, vocab)).astype(np.float32)
    x[1, 60:70] = x[2, ::3] = 9.0        # ties spanning chunks of 64; every chunk's max equal
    x[3, :] = -np.inf
    x[4, rng.choice(vocab, 5)] = -np.inf
    x[5] = np.round(x[5] * 2)
    x[6, ::2] = -np.inf
    for k in (1, 7, 20, 64):
        for chunk in (16, 64):
            want, got = jax.lax.top_k(x, k), chunked_top_k(jnp.asarray(x), k, chunk=chunk)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_a_packed_feed_opens_to_the_same_arrays():
    """engine.packing: a Feed packed on the host into one int32 vector opens, in a jitted call
    given its layout, to the same arrays: dtypes, bit patterns (seeds with the top bit set,
    NaN), bools and the static sampler level included; and a result packed in the call opens
    on the host."""
    rng = np.random.default_rng()
    b, t = 5, 7
    sampling = SamplingArrays(temperature=rng.random(b, np.float32),
                              top_k=rng.integers(-1, 50, b).astype(np.int32),
                              top_p=rng.random(b, np.float32),
                              seed=rng.integers(0, 2**32, b, dtype=np.uint64).astype(np.uint32),
                              level=PLAIN)
    sampling.seed[0], sampling.temperature[1] = 2**32 - 1, np.nan
    feed = Feed(rows=rng.permutation(b).astype(np.int32),
                tokens=rng.integers(0, 1000, (b, t)).astype(np.int32),
                num=rng.integers(0, t + 1, b).astype(np.int32), sampling=sampling)
    layout = packing.layout_of(feed)
    buf = packing.pack(feed)
    assert buf.shape == (layout.size,) == (b * (t + 6),) and buf.dtype == np.int32
    back = jax.jit(lambda x: (packing.unpack(x, layout), packing.pack(
        (packing.unpack(x, layout).num > 3, packing.unpack(x, layout).sampling.seed))))
    opened, out = back(buf)
    for got, want in zip(jax.tree.leaves(opened), jax.tree.leaves(feed)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got).view(np.int32), want.view(np.int32))
    assert opened.sampling.level == PLAIN
    big, seeds = packing.unpack(np.asarray(out), packing.layout_of((feed.num > 3, feed.sampling.seed)))
    np.testing.assert_array_equal(big, feed.num > 3)
    np.testing.assert_array_equal(seeds, feed.sampling.seed)
    with pytest.raises(TypeError, match="int64"):
        packing.layout_of(np.zeros(3, np.int64))


def test_page_ops_buffer_does_what_the_calls_it_packs_do():
    """PageOps: one packed buffer (shares, drops, releases with kept column ranges, admissions,
    all padded) changes the cache exactly as share_pages, drop_pages, release_rows and
    admit_rows in turn; the empty buffer changes nothing; too many operations are refused by
    name."""
    import kvcache
    from engine.page_ops import PageOps
    rng = np.random.default_rng()
    spec = kvcache.PoolSpec(num_layers=1, num_pages=40, page_size=4, num_kv_heads=1, head_dim=2,
                            dtype="float32")
    rows, width = 6, 5
    ops = PageOps(shares=8, drops=4, releases=3, admits=2, width=width)
    cache = kvcache.init_cache(spec, rows, width)
    # rows 0-3 hold 1..5 pages each; rows 4 and 5 are free
    held = rng.integers(1, width + 1, 4)
    cache, ok = kvcache.admit_rows(cache, jnp.arange(4), jnp.full(4, kvcache.LAYOUT_STATIC),
                                   jnp.asarray(held, jnp.int32), width)
    assert np.asarray(ok).all()
    table = np.asarray(cache.page_table)
    shares = [int(p) for p in rng.choice(table[0][:held[0]], rng.integers(1, held[0] + 1),
                                         replace=False)]
    drops = shares[:rng.integers(0, len(shares) + 1)][:ops.drops]   # evicted right after
    released = rng.choice(4, 2, replace=False)
    keep = [(int(a), int(a + rng.integers(0, held[r] - a + 1)))
            for r in released for a in [rng.integers(0, held[r] + 1)]]
    releases = [(int(r), a, b) for r, (a, b) in zip(released, keep)]
    kept_row = int(next(r for r in range(4) if r not in released))
    prefix = [int(p) for p in table[kept_row][:1]]     # a page held after the releases
    admits = [(4, kvcache.LAYOUT_PAGED, 2, len(prefix) * spec.page_size, prefix),
              (5, kvcache.LAYOUT_STATIC, 3, 0, [])]

    def apply(cache, arrays):
        layout = packing.layout_of(arrays)
        return jax.jit(lambda c, x: ops.apply(c, packing.unpack(x, layout)))(
            cache, packing.pack(arrays))
    got, got_ok, got_rows = apply(cache, ops.fill(shares, drops, releases, admits))

    want = kvcache.share_pages(cache, jnp.asarray(shares, jnp.int32), jnp.ones(len(shares), bool))
    want = kvcache.drop_pages(want, jnp.asarray(drops, jnp.int32), jnp.ones(len(drops), bool))
    keep_mask = np.zeros((2, width), bool)
    for i, (a, b) in enumerate(keep):
        keep_mask[i, a:b] = True
    want = kvcache.release_rows(want, jnp.asarray(released, jnp.int32), jnp.ones(2, bool),
                                jnp.asarray(keep_mask))
    prefix_pages = np.zeros((2, width), np.int32)
    prefix_pages[0, :len(prefix)] = prefix
    want, want_ok = kvcache.admit_rows(want, jnp.asarray([4, 5]),
                                       jnp.asarray([kvcache.LAYOUT_PAGED, kvcache.LAYOUT_STATIC]),
                                       jnp.asarray([2, 3]), width, jnp.asarray(prefix_pages),
                                       jnp.asarray([len(prefix) * spec.page_size, 0]))
    for path, x in jax.tree.leaves_with_path(got):
        y = dict(jax.tree.leaves_with_path(want))[path]
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    np.testing.assert_array_equal(np.asarray(got_ok), np.asarray(want_ok))
    np.testing.assert_array_equal(np.asarray(got_rows), np.asarray(want.page_table)[[4, 5]])

    same, _, _ = apply(cache, ops.fill())
    for (path, x), (_, y) in zip(jax.tree.leaves_with_path(same), jax.tree.leaves_with_path(cache)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="4 releases"):
        ops.fill(releases=[(0, 0, 0)] * 4)
    with pytest.raises(ValueError, match="5 drops"):
        ops.fill(drops=[1] * 5)
