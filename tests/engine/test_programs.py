"""Compiled step programs (engine.shapes, engine.programs): a bounded set of shapes that covers
every launch the scheduler can plan; an engine that holds only the largest programs gives the
tokens one that compiles every launch's own shape gives, and waits for no compile; the
background thread compiles the rest while requests run; an elastic pool grows only to sizes
whose programs are compiled."""

import dataclasses
import gc
import itertools
import threading
import time
import weakref

import pytest
from helpers import assert_pool_clean

from engine import LLM, EngineConfig, SamplingParams
from engine.programs import Programs
from engine.runner import compiles
from engine.sampling import ADJUSTED, FILTERED, GUIDED, PLAIN, PROMPT
from engine.shapes import Buckets, Shape
from kvcache.elastic import PoolSizes

LEVELS = (PLAIN, ADJUSTED, FILTERED)


@pytest.mark.parametrize("rows", [32, 64])
def test_default_flags_compile_28_shapes_and_3_cover_them_all(rows):
    """The count designed for: decode rows 1/4/16/max, 5 step decode layouts (none too) x 4
    chunk layouts (one chunk of 64/256/512 tokens, or four of 128) and 4 x 2 decode loops; the
    three largest, with the top-k / top-p sampler, cover every launch the scheduler plans;
    the three largest with the ADJUSTED sampler every launch that does not filter."""
    b = Buckets(EngineConfig(max_running_requests=rows))
    shapes = b.shapes(1000)
    assert len(shapes) == len(set(shapes)) == 28
    largest = b.largest(1000)
    assert len(largest) == 3 and all(s.sampler == FILTERED for s in largest)
    adjusted = b.largest(1000, ADJUSTED)
    c = b.config
    chunk_plans = [[n] for n in range(1, c.chunked_prefill_size + 1)]
    chunk_plans += [[b.shared_len] * k for k in range(2, c.max_prefill_rows + 1)]
    needs = [b.step(1000, d, lengths, f) for d, lengths, f in
             itertools.product(range(rows + 1), chunk_plans, LEVELS)]
    needs += [b.loop(1000, n, s, f) for n, s, f in
              itertools.product(range(1, rows + 1), (1, c.num_continuous_decode_steps),
                                LEVELS)]
    for need in needs:
        assert need.sampler > PLAIN or need in shapes, need
        assert any(s.covers(need) for s in largest), need
        assert need.sampler == FILTERED or any(s.covers(need) for s in adjusted), need


def test_covers_pads_rows_chunks_and_steps_but_not_the_pool():
    big = Shape("step", 100, rows=16, chunk_rows=4, chunk_len=128, sampler=FILTERED)
    assert big.covers(Shape("step", 100, rows=0, chunk_rows=1, chunk_len=64))
    assert not big.covers(Shape("step", 100, rows=4, chunk_rows=1, chunk_len=256))
    assert not big.covers(Shape("step", 200, rows=4, chunk_rows=1, chunk_len=64))
    assert big.covers(Shape("step", 100, 1, 1, 64, sampler=ADJUSTED))
    for low, high in itertools.combinations(LEVELS, 2):
        assert not Shape("step", 100, 16, 4, 128, sampler=low).covers(
            Shape("step", 100, 1, 1, 64, sampler=high))
    assert Shape("loop", 100, 16, steps=8).covers(Shape("loop", 100, 3, steps=1))
    assert not Shape("loop", 100, 16, steps=1).covers(Shape("loop", 100, 3, steps=8))


def test_elastic_sizes_move_only_to_usable_sizes():
    sizes = PoolSizes((5, 9, 17), shrink_after=0)
    assert sizes.grow(5, 3) == 9
    assert sizes.grow(5, 3, usable=lambda s: s != 9) == 17
    assert sizes.grow(5, 3, usable=lambda s: s == 5) is None
    assert sizes.shrink_due(17, 1, 0.0) == (5, None)
    assert sizes.shrink_due(17, 1, 0.0, usable=lambda s: s != 5) == (9, None)


CONFIG = dict(model="tiny-random", dtype="float32", page_size=4, context_length=128,
              max_running_requests=4, chunked_prefill_size=32, max_prefill_rows=2,
              num_continuous_decode_steps=3)
# One long prompt (chunks of 32, alone in their step), short ones that share steps (<= 16
# tokens each), one that fills a shared chunk exactly; greedy, sampled, top-p and top-k rows.
PROMPTS = [[3 + (7 * j) % 250 for j in range(n)] for n in (70, 5, 16, 9, 2, 40, 17, 1)]
PARAMS = [SamplingParams(max_tokens=m, temperature=t, top_p=p, top_k=k, seed=i,
                         ignore_eos=True, stop_token_ids=[s] if s else [])
          for i, (m, t, p, k, s) in enumerate([(5, 0, 1, -1, 0), (9, 1, 1, -1, 0),
                                               (7, 0.8, 0.9, -1, 0), (12, 0, 1, -1, 0),
                                               (3, 1, 1, 5, 0), (11, 0, 1, -1, 17),
                                               (6, 1.2, 0.5, 3, 0), (8, 0, 1, -1, 0)])]


@pytest.fixture(scope="module")
def reference():
    """Every launch on its own shape, compiled when first met (precompile "none")."""
    llm = LLM(**CONFIG, precompile="none")
    outs = llm.generate(PROMPTS, PARAMS)
    # Every launch compiled its own shape, on the request path or, for a decode loop expected
    # after a step that ended its prompts, in the compile thread (ModelRunner.expect_loop).
    assert 3 < llm.engine.stats()["request_path_compiles"] <= len(llm.engine.runner.programs)
    return [o.token_ids for o in outs]


def test_a_shape_the_thread_is_compiling_is_waited_for_not_compiled_twice():
    """A launch that needs the shape the compile thread is compiling waits for that compile
    and takes its program; the shape compiles once."""
    started, release, calls = threading.Event(), threading.Event(), []

    def compile(shape):
        calls.append(threading.current_thread().name)
        started.set()
        assert release.wait(10)
        return f"program of {shape.rows} rows"

    programs = Programs(compile, "none")
    shape = Shape("loop", 10, 4, steps=2)
    programs.background([shape])
    assert started.wait(10)
    threading.Timer(0.2, release.set).start()
    assert programs.get(shape) == (shape, "program of 4 rows")
    assert calls == ["hybridkv-compile"] and len(programs) == 1
    programs.close()


def test_the_compile_thread_ends_with_its_queue_and_lets_the_engine_go():
    """Once its queue is empty the compile thread ends, so nothing holds the engine: dropped,
    it is collected (a waiting thread kept every engine a test process made, and their
    programs' memory maps, until the process ended)."""
    llm = LLM(**CONFIG, precompile="none")
    llm.generate([PROMPTS[1]], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    programs = llm.engine.runner.programs
    programs.wait()
    deadline = time.monotonic() + 30
    while programs._thread is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert programs._thread is None
    engine = weakref.ref(llm.engine)
    del llm, programs
    gc.collect()
    assert engine() is None


def test_the_decode_loop_after_a_prompt_compiles_beside_its_step():
    """Lazy compiles on a CPU: the step that ends a prompt (nothing queued behind it) has the
    compile thread compile the decode loop that follows it while the step's own program
    compiles on the request path; the loop's launches then run on that program, and nothing
    else compiles."""
    llm = LLM(**CONFIG, precompile="none")
    programs = llm.engine.runner.programs
    compile, made = programs._compile, []
    programs._compile = lambda shape: made.append(
        (shape.kind, threading.current_thread().name)) or compile(shape)
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=7, temperature=0,
                                                    ignore_eos=True))
    assert len(out[0].token_ids) == 7
    assert sorted(made) == [("loop", "hybridkv-compile"), ("step", "MainThread")]
    assert len(programs) == 2
    assert_pool_clean(llm)


def test_the_largest_programs_alone_run_every_launch(reference, monkeypatch):
    """Only the three largest programs (nothing queued for the compile thread): every launch
    runs padded on one of them (top-k / top-p variants for plain rows, 3-step loops for 1-step
    plans) and the tokens are the same; nothing compiles."""
    monkeypatch.setattr(Programs, "background", lambda self, shapes, first=False: None)
    llm = LLM(**CONFIG, precompile="background")
    assert len(llm.engine.runner.programs) == 3
    before = compiles["xla"]
    outs = llm.generate(PROMPTS, PARAMS)
    assert [o.token_ids for o in outs] == reference
    assert compiles["xla"] == before and llm.engine.stats()["request_path_compiles"] == 0
    assert_pool_clean(llm)


def test_the_compile_thread_finishes_while_requests_run(reference):
    """The rest compile in the background while requests run on what has compiled; once the
    thread is done every shape is there and a second run compiles nothing."""
    llm = LLM(**CONFIG, precompile="background")
    programs = llm.engine.runner.programs
    assert programs.pending() > 0
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == reference
    programs.wait()
    pages = llm.engine.cache.num_pages
    buckets = llm.engine.runner.buckets
    assert programs.pending() == 0
    every = buckets.shapes(pages) + buckets.largest(pages) + buckets.largest(pages, ADJUSTED)
    guided = buckets.largest(pages, GUIDED)
    every += guided + [dataclasses.replace(s, steps=1) for s in guided if s.kind == "loop"]
    every += [s for s in buckets.largest(pages, PROMPT) if s.kind == "step"]
    assert len(programs) == len(set(every)) == 13 + 3 + (3 + 1) + 2
    before = compiles["xla"]
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == reference
    assert compiles["xla"] == before and llm.engine.stats()["request_path_compiles"] == 0
    assert_pool_clean(llm)


def test_an_elastic_pool_grows_once_its_next_size_is_compiled(reference):
    """An elastic pool starts at 8 pages; the prompts need more. The larger sizes' largest
    programs compile in the background, and the pool grows to them only then: no launch
    waits for a compile and the tokens are the reference's."""
    llm = LLM(**CONFIG, precompile="background", kv_pool="elastic", kv_pool_min_tokens=32,
              max_total_tokens=256)
    runner = llm.engine.runner
    sizes = llm.engine.scheduler.pool.sizes.sizes
    assert len(sizes) > 2 and not runner.ready_for(sizes[-1])
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == reference
    stats = llm.engine.stats()
    assert stats["pool_grows"] > 0 and stats["request_path_compiles"] == 0
    runner.programs.close()
    assert_pool_clean(llm)
