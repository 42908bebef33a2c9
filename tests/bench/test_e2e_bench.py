"""bench/e2e.py on the CPU: each case lays its pages out as it says, and a run of every case
decodes without stalling."""

import numpy as np
import pytest
from helpers import FIXTURES, bench_module

from engine import Engine, EngineConfig

e2e = bench_module("e2e")

B, CONTEXT, AHEAD = 4, 40, 24       # 3 pages of 16 for the context, 4 with the tokens ahead


def pages_of(engine, case):
    e2e.prepare(engine, case, B, CONTEXT, AHEAD)
    table = np.asarray(engine.cache.page_table)
    assert (np.asarray(engine.cache.lengths) == CONTEXT).all()
    return [row[row != 0].tolist() for row in table]


def test_cases_lay_out_their_pages():
    engine = Engine(EngineConfig(model="tiny-random", max_running_requests=B,
                                 context_length=CONTEXT + AHEAD + 16,
                                 max_total_tokens=B * (CONTEXT + AHEAD + 32)))
    static = pages_of(engine, "static")
    assert [len(p) for p in static] == [4] * B
    assert all(p == list(range(p[0], p[0] + 4)) for p in static)          # one run per row
    reserved = pages_of(engine, "paged-reserved")
    assert [len(p) for p in reserved] == [4] * B
    assert all(np.diff(p).min() >= B for p in reserved)                   # rows interleave
    paged = pages_of(engine, "paged")
    assert [len(p) for p in paged] == [3] * B                             # the context only
    hybrid = pages_of(engine, "hybrid")
    assert [len(p) for p in hybrid] == [4, 3, 4, 3]
    layout = np.asarray(engine.cache.layout).tolist()
    assert layout == [1, 2, 1, 2]                                         # static, paged, ...


@pytest.mark.parametrize("model", ["tiny-random", "gemma3_text"])
def test_every_case_decodes(model):
    """gemma3_text: local layers in ring pools (window 8), which the cache prepare() builds
    must hold as the engine's does."""
    if model != "tiny-random":
        model = str(FIXTURES / model)
    rows = e2e.bench_engine(model, B, CONTEXT, steps=2, launches=2, repeats=1, profile=None)
    assert [r["layout"] for r in rows] == list(e2e.CASES)
    assert all(r["step_ms"] > 0 and r["live_kv_bytes"] > 0 for r in rows)


def test_moe_floor_counts_the_routed_experts():
    """Qwen3-MoE fixture: 2 sparse layers of 8 experts, 2 a token. One row reads a quarter of
    each sparse layer's experts; many rows read nearly all; a dense model reads every weight."""
    import kvcache
    engine = Engine(EngineConfig(model=str(FIXTURES / "qwen3_moe"), context_length=64,
                                 max_running_requests=2))
    total = kvcache.nbytes(engine.params)
    experts = sum(kvcache.nbytes(engine.params["layers"][i]["mlp"]["experts"]) for i in (0, 2))
    assert engine.model_config.moe_layers == (True, False, True)
    assert e2e.step_weight_bytes(engine, 1) == total - experts * 3 // 4
    assert total - experts // 1000 < e2e.step_weight_bytes(engine, 64) <= total
    dense = Engine(EngineConfig(model="tiny-random", context_length=64, max_running_requests=2))
    assert e2e.step_weight_bytes(dense, 64) == kvcache.nbytes(dense.params)
