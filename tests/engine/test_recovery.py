"""A device error in a launch fails that launch's requests, not the engine: the pool is made
anew, the other requests run on with the tokens they would have had, and every page comes back.
Also a 10M-token context length on a CPU: a short request costs what a short request costs."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIXTURES, assert_pool_clean

import kernels
import kvcache
from engine import LLM, SamplingParams

PROMPTS = [list(range(3 + i, 12 + 3 * i)) for i in range(4)]
GREEDY = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    # Two rows: requests 0 and 1 run first, 2 and 3 wait for their rows.
    return LLM("tiny-random", dtype="float32", page_size=4, context_length=128, max_running_requests=2,
               num_continuous_decode_steps=4)


@pytest.fixture(scope="module")
def reference(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


class Fault:
    """The `at`-th launch of one kind ("step" or "loop") fails like a device error: "before"
    it runs (a compile error), "after" it ran, its cache donated (an error at execution), or
    when the host reads its result (an asynchronous error, raised by np.asarray). Wraps the
    programs that runner.programs hands out."""

    def __init__(self, runner, kind: str, at: int, when: str):
        self.runner, self.kind, self.at, self.when, self.calls = runner, kind, at, when, 0
        self.get = runner.programs.get

    def __enter__(self):
        def get(need):
            shape, (program, key) = self.get(need)
            if shape.kind != self.kind:
                return shape, (program, key)
            return shape, (lambda *args: self.call(program, *args), key)
        self.runner.programs.get = get
        return self

    def __exit__(self, *exc):
        del self.runner.programs.get

    def call(self, program, *args):
        self.calls += 1
        if self.calls != self.at:
            return program(*args)
        if self.when == "before":
            raise RuntimeError("INTERNAL: injected compile failure")
        out, cache = program(*args)
        if self.when == "after":
            raise RuntimeError("RESOURCE_EXHAUSTED: injected out of memory")
        out.delete()
        return out, cache


def drive(engine) -> list:
    """What the engine's process does (server.worker.EngineLoop): step while there is
    work; a call that raises goes to Engine.recover."""
    seen = []
    while engine.has_work():
        try:
            seen += engine.step()
        except Exception as e:   # noqa: BLE001 - the engine recovers from any launch error
            seen += engine.recover(e)
    return seen


def submit(engine, tag: str) -> list:
    reqs = [engine.make_request(f"{tag}-{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    for r in reqs:
        engine.add(r)
    return reqs


@pytest.mark.parametrize("launch, at", [("step", 1), ("loop", 3)])
@pytest.mark.parametrize("when", ["before", "after", "read"])
def test_a_failed_launch_fails_its_requests_and_the_rest_run_on(llm, reference, launch, at,
                                                                when):
    engine = llm.engine
    with Fault(engine.runner, launch, at, when):
        reqs = submit(engine, f"{launch}-{when}")
        seen = drive(engine)
    failed, done = reqs[:2], reqs[2:]
    for r in failed:    # the two running requests were in the launch that failed
        assert r.finish_reason == "error" and r in seen
        assert "a launch that held this request failed" in r.error
        assert ("INTERNAL" if when == "before" else
                "RESOURCE_EXHAUSTED" if when == "after" else "deleted") in r.error
    assert [r.output for r in done] == reference[2:]
    assert all(r.finish_reason == "length" and r.error is None for r in done)
    assert engine.errors["recoveries"] >= 1 and engine.errors["failed_requests"] >= 2
    assert_pool_clean(engine)
    # The engine serves on, with the tokens a fresh engine gives.
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
    assert_pool_clean(engine)


def test_requests_not_in_a_failed_launch_resume_with_the_same_tokens(llm, reference):
    """A recovery with no launch in flight fails nothing: every running request starts again
    from its tokens so far (its KV is gone with the pool) and ends as it would have."""
    engine = llm.engine
    reqs = submit(engine, "requeue")
    for _ in range(3):
        engine.step()
    engine.sync()
    running = list(engine.scheduler.running)
    assert running and all(r.output for r in running)
    preemptions = engine.scheduler.preemptions
    assert engine.recover(RuntimeError("INTERNAL: injected")) is not None
    assert engine.scheduler.preemptions == preemptions + len(running)
    assert all(r.row == -1 for r in running)
    drive(engine)
    assert [r.output for r in reqs] == reference
    assert all(r.finish_reason == "length" for r in reqs)
    assert_pool_clean(engine)


# -- a 10M-token context length ---------------------------------------------------------------

@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """The Llama fixture with max_position_embeddings 2**24."""
    path = tmp_path_factory.mktemp("ckpt") / "llama-16m"
    shutil.copytree(FIXTURES / "llama", path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2**24}))
    return str(path)


def test_a_ten_million_token_context_length_costs_nothing_until_a_row_is_long(long_checkpoint):
    """A 4096-token static pool with a 10M context length: a request too large for the pool is
    refused, and a 4-token request runs (it once made the CPU attention path gather the page
    table's whole width: 42 GB). The page table is no wider than the pool."""
    llm = LLM(long_checkpoint, layout="static", max_total_tokens=4096,
              context_length=10_000_000)
    assert llm.engine.pages_per_row == 4096 // 16
    with pytest.raises(ValueError, match="the KV pool holds at most 256 pages"):
        llm.generate([[5] * 10], SamplingParams(max_tokens=5000))
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, temperature=0))[0]
    assert len(out.token_ids) >= 1
    assert_pool_clean(llm)


def test_the_default_pool_on_a_cpu_has_a_fixed_budget(long_checkpoint):
    """No --context-length and no --max-total-tokens on a CPU: the pool takes
    kvcache.pool.CPU_POOL_BYTES at most, not 90% of the host (it was killed by the kernel)."""
    llm = LLM(long_checkpoint, max_running_requests=2)
    spec = llm.engine.spec
    assert spec.total_bytes <= kvcache.pool.CPU_POOL_BYTES < spec.total_bytes + 2 * spec.bytes_per_page
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(out.token_ids) >= 1
    assert_pool_clean(llm)


def test_reference_attention_reads_only_the_live_blocks():
    """The jnp path over a page table 2**20 pages wide (16M key slots) and rows of a few
    tokens: as fast and as right as over a table 8 pages wide (dense, it would gather 8 GiB)."""
    rng = np.random.default_rng(0)
    g, k, h, n = 16, 2, 32, 4
    pages = [jnp.asarray(rng.standard_normal((64, g, k, h)), jnp.float32) for _ in range(2)]
    narrow = jnp.asarray(rng.permutation(np.arange(1, 64))[:16].reshape(2, 8), jnp.int32)
    wide = jnp.zeros((2, 1 << 20), jnp.int32).at[:, :8].set(narrow)
    q = jnp.asarray(rng.standard_normal((2, 1, n, h)), jnp.float32)
    positions, lens = jnp.array([[100], [37]]), jnp.array([101, 38])
    attend = jax.jit(kernels.paged_attention, static_argnames="impl")
    want = attend(q, *pages, narrow, positions, lens, impl="reference")
    got = attend(q, *pages, wide, positions, lens, impl="reference")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
