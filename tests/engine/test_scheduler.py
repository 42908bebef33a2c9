"""Continuous batching through Engine.step: chunked prefill, the prefix cache (with its host
tier) and preemption give the same greedy tokens as an unpressured run, with or without
launches planned ahead of reading the one in flight, and the host's page ledger equals the
device's refcounts whenever every launch has been read."""

import dataclasses
import re
import time

import numpy as np
import pytest
from helpers import assert_host_tier_consistent, assert_pool_clean

from engine import Engine, EngineConfig, SamplingParams
from engine.request import Request
from engine.runner import compiles
from engine.sampling import ADJUSTED, GUIDED, PROMPT, PROMPT_SEEN, penalizes
from kvcache import Ledger

BASE = dict(model="tiny-random", dtype="float32", page_size=4, context_length=128,
            max_running_requests=8)
SHARED = list(range(40, 72))                     # 32 tokens = 8 pages shared by every prompt
PROMPTS = [SHARED + [i, i + 1, i + 2][:1 + i % 3] for i in range(3, 12)] + [[7, 8], [9] * 13]
MAX_TOKENS = [3, 17, 9, 12, 1, 25, 6, 14, 30, 5, 20]


def run(config: EngineConfig, prompts=PROMPTS, max_tokens=MAX_TOKENS, arrive_every=0,
        check_every=1, warm=False, stop=None, **params):
    """Feeds the prompts (all at once, or one more every `arrive_every` steps), steps to the end
    checking the ledger every `check_every` steps, after reading the launches in flight (0: only
    at the end; between checks, each step queues its launch before reading the one before);
    returns (outputs, engine, requests). warm: config compiles every program ahead
    (precompile "all"), and then nothing may compile. stop: a stop token id per prompt (else
    every request runs to max_tokens). params: more SamplingParams fields (with penalties each
    running row's KVCache.counts is checked too)."""
    engine = Engine(config)
    if warm:
        assert config.precompile == "all"
        pages = engine.cache.num_pages
        b = engine.runner.buckets
        every = b.shapes(pages) + b.largest(pages) + b.largest(pages, ADJUSTED)
        every += b.largest(pages, GUIDED) + [dataclasses.replace(s, steps=1) for s in
                                             b.largest(pages, GUIDED) if s.kind == "loop"]
        every += [s for s in b.largest(pages, PROMPT) if s.kind == "step"]
        assert engine.warmup(progress=False) == len(every)
        compiled = compiles["xla"]
    stop = stop or [None] * len(prompts)
    reqs = [engine.make_request(f"r{i}", p, SamplingParams(
        max_tokens=m, temperature=0, ignore_eos=True, stop_token_ids=[s] if s is not None else [],
        **params))
        for i, (p, m, s) in enumerate(zip(prompts, max_tokens, stop))]
    pending, steps = list(reqs), 0
    while pending or engine.has_work():
        if pending and (arrive_every == 0 or steps % arrive_every == 0):
            for req in pending[:len(pending) if arrive_every == 0 else 1]:
                engine.add(req)
                pending.remove(req)
        engine.step()
        steps += 1
        if not check_every or steps % check_every:
            continue
        engine.sync()
        sched = engine.scheduler
        np.testing.assert_array_equal(np.asarray(engine.cache.alloc.refcount),
                                      sched.pool.ledger.refcount, err_msg=f"step {steps}")
        assert sched.pool.ledger.free == int(engine.cache.alloc.top), f"step {steps}"
        for r in sched.running:
            row = np.asarray(engine.cache.page_table[r.row])
            assert row[:len(r.pages)].tolist() == r.pages and not row[len(r.pages):].any()
        assert_host_tier_consistent(engine)
        counts = np.asarray(engine.cache.counts)
        for r in sched.running:
            if penalizes(r.params):
                assert_counts(counts[r.row], r)
    assert_pool_clean(engine)
    assert all(len(r.output) == m for r, m, s in zip(reqs, max_tokens, stop) if s is None)
    if warm:
        assert compiles["xla"] == compiled
    return [r.output for r in reqs], engine, reqs


def assert_counts(row: np.ndarray, r: Request) -> None:
    """A row's KVCache.counts: its generated tokens counted, its prompt's ids flagged."""
    np.testing.assert_array_equal(row & (PROMPT_SEEN - 1),
                                  np.bincount(r.output, minlength=row.shape[0]), err_msg=r.rid)
    np.testing.assert_array_equal(row & PROMPT_SEEN != 0,
                                  np.isin(np.arange(row.shape[0]), r.prompt), err_msg=r.rid)


@pytest.fixture(scope="module")
def reference():
    """No prefix cache, a pool big enough for everyone, whole prompts in one chunk."""
    outputs, _, _ = run(EngineConfig(**BASE, disable_radix_cache=True, chunked_prefill_size=256))
    return outputs


@pytest.mark.parametrize("layout,check_every", [("static", 1), ("paged", 3), ("hybrid", 3)])
def test_prefix_cache_and_chunks_give_the_same_tokens(reference, layout, check_every):
    """Chunks of 8 tokens, arrivals spread over steps, shared prefixes served from the cache."""
    outputs, engine, _ = run(EngineConfig(**BASE, layout=layout, static_max_tokens=48,
                                          chunked_prefill_size=8, max_prefill_rows=2),
                             arrive_every=3, check_every=check_every)
    assert outputs == reference
    stats = engine.stats()
    assert stats["hit_tokens"] >= 32 * 5, stats   # most later prompts reuse the shared pages
    assert stats["pages_cached"] > 0


def test_preemption_loses_nothing(reference):
    """A pool of 24 pages for 11 paged requests that need up to 14 pages each, at once: the
    newest paged requests are preempted and resumed, and the tokens do not change."""
    outputs, engine, _ = run(EngineConfig(**BASE, layout="paged", max_total_tokens=96,
                                          chunked_prefill_size=16, num_continuous_decode_steps=3))
    assert outputs == reference
    assert engine.stats()["preemptions"] > 0


def test_preemption_without_a_prefix_cache(reference):
    outputs, engine, _ = run(EngineConfig(**BASE, layout="paged", max_total_tokens=96,
                                          disable_radix_cache=True, num_continuous_decode_steps=2))
    assert outputs == reference
    assert engine.stats()["preemptions"] > 0


def test_static_requests_are_never_preempted(reference):
    """Hybrid with a tight pool: static requests keep their rows from admission to the end."""
    outputs, engine, reqs = run(EngineConfig(**BASE, layout="hybrid", static_max_tokens=48,
                                             max_total_tokens=80, chunked_prefill_size=16,
                                             disable_radix_cache=True))
    assert outputs == reference
    assert engine.stats()["preemptions"] > 0
    static = [r for r in reqs if r.layout == "static"]
    assert static and all(r.preemptions == 0 for r in static)
    assert any(r.preemptions for r in reqs if r.layout == "paged")


@pytest.mark.parametrize("layout", ["static", "hybrid"])
def test_launches_planned_ahead_give_the_same_tokens(reference, layout):
    """No sync between steps: each launch is queued before the host reads the one ahead of it
    (decode rows feed the token the device sampled), finished rows go back once no launch in
    flight holds them."""
    outputs, engine, _ = run(EngineConfig(**BASE, layout=layout, static_max_tokens=48,
                                          chunked_prefill_size=64, num_continuous_decode_steps=4), check_every=0)
    assert outputs == reference
    assert engine.stats()["overlapped_launches"] > 0


@pytest.mark.parametrize("layout,max_total_tokens,decode_steps", [("hybrid", None, 4),
                                                                  ("paged", 64, 1)])
def test_stop_tokens_met_while_the_next_launch_is_queued(reference, layout, max_total_tokens,
                                                         decode_steps):
    """Each request stops at a token from the middle of its reference output. The launch
    queued before the host read that token still feeds the row: what it adds is dropped, and
    the row's pages come back (the paged case under preemption)."""
    stop = [out[len(out) // 2] for out in reference]
    outputs, engine, reqs = run(EngineConfig(
        **BASE, layout=layout, static_max_tokens=48, max_total_tokens=max_total_tokens,
        chunked_prefill_size=16, num_continuous_decode_steps=decode_steps), check_every=0, stop=stop)
    assert outputs == [out[:out.index(s) + 1] for out, s in zip(reference, stop)]
    assert all(r.finish_reason == "stop" for r in reqs)
    stats = engine.stats()
    assert stats["overlapped_launches"] > 0
    assert stats["preemptions"] > 0 or layout != "paged", stats


def test_warmup_compiles_every_launch_the_run_needs(reference):
    """Warmed up, a run that mixes chunks (two rows, lengths 1-16) with decode rows, decode
    loops of 1 and 3 steps, and preemption compiles no model launch; nor does a request with
    the most stop ids a request may have (engine.limits, EOS included: every decode launch
    carries that many)."""
    outputs, engine, _ = run(EngineConfig(**BASE, layout="paged", max_total_tokens=96,
                                          chunked_prefill_size=16, max_prefill_rows=2,
                                          num_continuous_decode_steps=3, precompile="all"),
                             arrive_every=1, check_every=0, warm=True)
    assert outputs == reference
    assert engine.stats()["preemptions"] > 0
    compiled = compiles["xla"]
    unused = [t for t in range(261) if all(t not in out for out in reference)][:32]
    assert len(unused) == 32
    req = engine.make_request("stops", PROMPTS[-1], SamplingParams(
        max_tokens=MAX_TOKENS[-1], temperature=0, ignore_eos=True, stop_token_ids=unused))
    engine.add(req)
    while engine.has_work():
        engine.step()
    assert req.output == reference[-1]
    assert compiles["xla"] == compiled


def test_overlapped_launches_under_preemption(reference):
    outputs, engine, _ = run(EngineConfig(**BASE, layout="paged", max_total_tokens=96,
                                          chunked_prefill_size=16, num_continuous_decode_steps=3), check_every=0)
    assert outputs == reference
    assert engine.stats()["preemptions"] > 0


def test_abort_during_a_chain_of_launches():
    engine = Engine(EngineConfig(**BASE, layout="paged", num_continuous_decode_steps=2))
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    reqs = [engine.make_request(f"r{i}", [5 + i] * 7, params) for i in range(3)]
    for r in reqs:
        engine.add(r)
    for _ in range(40):
        engine.step()
        if engine.stats()["overlapped_launches"] >= 2:
            break
    assert engine.stats()["overlapped_launches"] >= 2
    engine.abort("r1")
    while engine.has_work():
        engine.step()
    assert reqs[1].finish_reason == "abort" and len(reqs[1].output) < 60
    assert [len(r.output) for r in (reqs[0], reqs[2])] == [60, 60]
    assert_pool_clean(engine)


def test_abort_frees_the_row_and_pages():
    engine = Engine(EngineConfig(**BASE, layout="paged"))
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    a = engine.make_request("a", SHARED, params)
    b = engine.make_request("b", [5, 6, 7], params)
    engine.add(a)
    engine.add(b)
    for _ in range(3):
        engine.step()
    engine.abort("a")
    engine.abort("b")
    engine.step()
    assert a.finish_reason == b.finish_reason == "abort"
    assert_pool_clean(engine)
    assert engine.flush_cache()
    assert engine.stats()["pages_free"] == engine.stats()["pages_total"]


def test_flush_cache_refuses_while_requests_run():
    engine = Engine(EngineConfig(**BASE))
    engine.add(engine.make_request("a", SHARED, SamplingParams(max_tokens=8, temperature=0)))
    engine.step()
    assert not engine.flush_cache()
    while engine.has_work():
        engine.step()
    assert engine.flush_cache()
    assert_pool_clean(engine)
    assert engine.scheduler.pool.radix.cached_pages() == 0


@pytest.mark.parametrize("layout,radix,arrive_every,check_every", [("hybrid", True, 3, 2),
                                                                   ("paged", False, 0, 1)])
def test_elastic_pool_grows_and_shrinks_without_changing_tokens(reference, layout, radix,
                                                                 arrive_every, check_every):
    """The pool starts at 5 pages, doubles as admissions need pages (up to 25: past that,
    preemption) and shrinks, compacting held pages, whenever a smaller size would be at most
    half full (no delay): under running requests, the tokens do not change and the ledger
    equals the device after every step."""
    outputs, engine, _ = run(EngineConfig(
        **BASE, layout=layout, static_max_tokens=48, max_total_tokens=96, kv_pool="elastic",
        kv_pool_min_tokens=16, kv_shrink_after=0, chunked_prefill_size=16,
        disable_radix_cache=not radix), arrive_every=arrive_every, check_every=check_every)
    assert outputs == reference
    pool = engine.scheduler.pool.report()
    assert engine.scheduler.pool.sizes.sizes == (5, 10, 20, 25)
    assert pool["grows"] > 0 and pool["shrinks"] > 0, pool
    if arrive_every:               # staggered: later rows hold high ids when early ones leave
        assert pool["pages_moved"] > 0, pool
    else:                          # everyone at once: the ceiling is reached, paged rows yield
        assert engine.stats()["preemptions"] > 0


def test_idle_elastic_pool_shrinks_to_its_smallest_size_after_the_delay():
    engine = Engine(EngineConfig(**BASE, kv_pool="elastic", kv_pool_min_tokens=16,
                                 kv_shrink_after=30))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for i in range(4):
        engine.add(engine.make_request(f"r{i}", SHARED + [i], params))
    while engine.has_work():
        engine.step()
    sched = engine.scheduler
    grown = engine.cache.num_pages
    assert grown > sched.pool.sizes.sizes[0] and sched.pool.radix.cached_pages() > 4
    start = time.monotonic() - 1000.0                       # the real clock is long past due
    assert sched.pool.shrink_due(start) == (None, 30)              # oversized from now on
    assert sched.pool.shrink_due(start + 29)[0] is None
    assert sched.pool.shrink_due(start + 30) == (sched.pool.sizes.sizes[0], None)
    assert engine.maintain() is None                          # shrinks, on the real clock
    assert engine.cache.num_pages == sched.pool.sizes.sizes[0] == 5
    assert sched.pool.radix.cached_pages() <= 4                    # the rest was evicted
    assert_pool_clean(engine)
    assert sched.pool.shrink_due(start) == (None, None)            # nothing smaller to go to


# Two 8-page prefixes in waves (A, B, A, B; a request every 4 steps): a 16-page pool cannot keep
# one prefix cached while the other's wave runs, so it goes to the host tier and comes back.
A, B = list(range(40, 72)), list(range(100, 132))
WAVES = [prefix + [i] for prefix in (A, B, A, B) for i in range(3)]
WAVE_TOKENS = [6, 3, 8] * 4


@pytest.fixture(scope="module")
def wave_reference():
    outputs, _, _ = run(EngineConfig(**BASE, disable_radix_cache=True, chunked_prefill_size=256),
                        WAVES, WAVE_TOKENS)
    return outputs


@pytest.mark.parametrize("layout", ["static", "paged"])
def test_host_tier_brings_evicted_prefixes_back(wave_reference, layout):
    outputs, engine, reqs = run(EngineConfig(**BASE, layout=layout, max_total_tokens=64,
                                             chunked_prefill_size=64, host_kv_size=256),
                                WAVES, WAVE_TOKENS, arrive_every=4)
    assert outputs == wave_reference
    stats = engine.stats()
    assert stats["host_pages_offloaded"] > 0 and stats["host_pages_loaded"] > 0, stats
    assert stats["host_hit_tokens"] >= 32 * 2, stats          # the second waves of A and B
    assert sum(r.host_cached_tokens for r in reqs) == stats["host_hit_tokens"]
    assert stats["hit_tokens"] > stats["host_hit_tokens"]     # device hits within a wave


def test_preemption_and_an_elastic_pool_with_a_host_tier(reference):
    """test_preemption_loses_nothing's pressure on an elastic pool with a host tier: preempted
    requests' pages go to the prefix cache, then to the host, and come back when they resume;
    the pool grows, and its last shrink sends the cold prefix-cache leaves to the host (their
    slots are not page ids: compaction leaves them alone)."""
    outputs, engine, _ = run(EngineConfig(
        **BASE, layout="paged", max_total_tokens=96, chunked_prefill_size=16, num_continuous_decode_steps=3,
        kv_pool="elastic", kv_pool_min_tokens=16, kv_shrink_after=0, host_kv_size=128))
    assert outputs == reference
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["host_pages_loaded"] > 0, stats
    assert stats["pool_grows"] > 0 and stats["pool_shrinks"] > 0, stats
    assert engine.cache.num_pages == 5 and stats["host_pages_cached"] > stats["pages_cached"]


def test_fp8_pages_through_preemption_an_elastic_pool_and_a_host_tier():
    """The same pressure on fp8 pages: preempted pages through the prefix cache to the host and
    back, the pool grown and compacted: the same tokens as fp8 pages with room for everyone
    (whatever moves the pages moves their bytes unchanged)."""
    fp8 = dict(BASE, kv_cache_dtype="fp8_e4m3")
    want, _, _ = run(EngineConfig(**fp8, disable_radix_cache=True, chunked_prefill_size=256))
    outputs, engine, _ = run(EngineConfig(
        **fp8, layout="paged", max_total_tokens=96, chunked_prefill_size=16,
        num_continuous_decode_steps=3, kv_pool="elastic", kv_pool_min_tokens=16,
        kv_shrink_after=0, host_kv_size=128))
    assert outputs == want
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["host_pages_loaded"] > 0, stats
    assert stats["pool_grows"] > 0 and stats["pool_shrinks"] > 0, stats


def test_host_tier_config_errors():
    with pytest.raises(ValueError, match="needs the radix cache"):
        EngineConfig(**BASE, host_kv_size=64, disable_radix_cache=True)
    with pytest.raises(ValueError, match="tensor_parallel_size > 1"):
        EngineConfig(**BASE, host_kv_size=64, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="at least one page"):
        Engine(EngineConfig(**BASE, host_kv_size=3))


def test_request_prefix_is_a_slice_of_its_tokens():
    req = Request("r", [1, 2, 3], SamplingParams(), 0, ())
    for output in ([], [4, 5]):
        req.output = output
        for n in range(len(req.tokens) + 2):
            assert req.prefix(n) == tuple(req.tokens[:n])


def test_ledger_counts_holders_and_refuses_miscounts():
    ledger = Ledger(6)
    ledger.take([1, 2, 3])
    ledger.share([2, 3])
    ledger.drop([1, 2])
    assert ledger.refcount.tolist() == [1, 0, 1, 2, 0, 0] and ledger.free == 3
    ledger.drop([])
    for call, pages, match in ((ledger.take, [3], "not free"), (ledger.drop, [3, 1], "more often"),
                               (ledger.share, [4, 4], "named twice")):
        with pytest.raises(RuntimeError, match=match):
            call(pages)
        assert ledger.refcount.tolist() == [1, 0, 1, 2, 0, 0] and ledger.free == 3


PENALTIES = dict(frequency_penalty=0.7, presence_penalty=0.4, repetition_penalty=1.6)


def test_penalties_count_through_chunks_the_prefix_cache_and_preemption(reference):
    """The counts the penalties read (KVCache.counts: generated tokens per id, prompt ids
    flagged) are right for every running row after every launch, through chunks of a prompt,
    prefixes served by the cache (their tokens never fed) and preemption (generated tokens fed
    again as prompt); and the tokens are those of an unpressured penalized run."""
    want, _, _ = run(EngineConfig(**BASE, disable_radix_cache=True, chunked_prefill_size=256),
                     **PENALTIES)
    for config in (dict(layout="paged", max_total_tokens=96, chunked_prefill_size=16,
                        num_continuous_decode_steps=3),
                   dict(layout="hybrid", static_max_tokens=48, chunked_prefill_size=8,
                        max_prefill_rows=2)):
        outputs, engine, _ = run(EngineConfig(**BASE, **config), arrive_every=2, **PENALTIES)
        assert outputs == want, config
        stats = engine.stats()
        assert stats["preemptions"] > 0 or stats["hit_tokens"] > 0, stats
    assert reference != want                             # the penalties changed the tokens


def test_prompt_logprobs_through_chunks_and_preemption():
    """prompt_logprobs under a tight pool (requests preempted, their prompts computed again)
    and small chunks: each prompt token's log probabilities once, in order, equal to those of
    an unpressured run."""
    _, _, want = run(EngineConfig(**BASE, disable_radix_cache=True, chunked_prefill_size=256),
                     prompt_logprobs=2)
    _, engine, reqs = run(EngineConfig(**BASE, layout="paged", max_total_tokens=96,
                                       chunked_prefill_size=16, num_continuous_decode_steps=3),
                          prompt_logprobs=2)
    assert engine.stats()["preemptions"] > 0
    for got, ref in zip(reqs, want):
        assert len(got.prompt_logprobs) == len(got.prompt) - 1, got.rid
        for (lp, top), (ref_lp, ref_top) in zip(got.prompt_logprobs, ref.prompt_logprobs):
            assert list(top) == list(ref_top)
            np.testing.assert_allclose([lp, *top.values()], [ref_lp, *ref_top.values()],
                                       rtol=1e-5, atol=1e-6)


def test_guided_rows_through_chunks_the_prefix_cache_and_preemption():
    """Structured output under a tight pool (preempted requests compute prompt and output
    again, their grammars where they stood), chunks of 16 beside 3-step decode launches, the
    prefix cache: a guided row draws one token a launch and is planned only once its last one
    is read, so every draw is masked for the tokens before it: the outputs match the grammar
    and equal an unpressured run's."""
    regex = "[a-z ]{40}"       # longer than every max_tokens: each request runs to its length
    _, _, want = run(EngineConfig(**BASE, disable_radix_cache=True, chunked_prefill_size=256),
                     guided_regex=regex)
    _, engine, reqs = run(EngineConfig(**BASE, layout="paged", max_total_tokens=96,
                                       chunked_prefill_size=16, num_continuous_decode_steps=3),
                          check_every=2, guided_regex=regex)
    assert engine.stats()["preemptions"] > 0
    for got, ref in zip(reqs, want):
        text = bytes(got.output).decode()
        assert got.finish_reason == "length" and re.fullmatch("[a-z ]*", text), text
        assert got.output == ref.output
