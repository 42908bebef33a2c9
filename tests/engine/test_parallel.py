"""Tensor parallelism on CPU devices (tests/conftest.py asks XLA for eight): tp=N gives the same
greedy tokens as tp=1, with the params and the KV pages sharded over "tp" and KV heads repeated
when tp > num_kv_heads. On a backend of fewer than eight devices (one GPU) the tests that shard
an engine are skipped, with the reason."""

import jax
import pytest
from helpers import FIXTURES, assert_pool_clean, scaled_checkpoint
from jax.sharding import PartitionSpec as P

import serve
from engine import LLM, SamplingParams
from models import PRESETS, ModelConfig, RopeConfig, load_hf
from models.parallel import kv_replicas, replicate_kv_heads
from models.presets import shaped_random

# Small models whose heads reach tp=8 (2 KV heads, each repeated 4x) and tp=6 (3 KV heads, an
# uneven count: tp=6 repeats each twice, tp=2 and tp=4 are refused).
TEST_MODELS = {"tiny-8-heads": shaped_random(64, 96, 2, 8, 2, 16, 261, tied=False),
               "tiny-3-kv-heads": shaped_random(64, 96, 2, 6, 3, 16, 261, tied=False)}
KV_HEADS = {"tiny-random": 2, "tiny-8-heads": 2, "tiny-3-kv-heads": 3}
SHARED = list(range(40, 52))                     # 3 pages of 4, shared by three prompts
PROMPTS = [[5], SHARED + [7], SHARED + [8, 9], list(range(20, 29)), SHARED + list(range(3))]
PARAMS = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (9, 3, 7, 5, 6)]
KW = dict(page_size=4, context_length=64, max_running_requests=4, layout="hybrid", static_max_tokens=16)
eight_devices = pytest.mark.skipif(
    jax.device_count() < 8, reason=f"shards over up to 8 devices; JAX sees {jax.device_count()} "
    f"{jax.default_backend()} device(s) (tests/conftest.py asks for 8 only on a CPU backend)")


@pytest.fixture(scope="module", autouse=True)
def test_models():
    with pytest.MonkeyPatch.context() as mp:
        for name, make in TEST_MODELS.items():
            mp.setitem(PRESETS, name, make)
        yield


def generate(llm, runs=2):
    """The prompts `runs` times (later runs hit the prefix cache) -> tokens of every run."""
    tokens = []
    for i in range(runs):
        outs = llm.generate(PROMPTS, PARAMS)
        assert_pool_clean(llm)
        if i:
            assert all(o.cached_tokens >= 12 for o, p in zip(outs, PROMPTS) if p[:12] == SHARED)
        tokens.append([o.token_ids for o in outs])
    return tokens


@pytest.fixture(scope="module")
def reference():
    """model -> its tokens at tp=1, computed once."""
    cache = {}

    def tokens(model):
        if model not in cache:
            cache[model] = generate(LLM(model, **KW))
        return cache[model]
    return tokens


@eight_devices
@pytest.mark.parametrize("model, tp", [("tiny-random", 2), ("tiny-random", 4),
                                       ("tiny-8-heads", 8), ("tiny-3-kv-heads", 6)])
def test_tp_gives_the_same_tokens(reference, model, tp):
    """Static and paged rows in one batch, then the same prompts from the prefix cache."""
    llm = LLM(model, tensor_parallel_size=tp, **KW)
    before = llm.engine.cache
    assert generate(llm) == reference(model)
    e = llm.engine
    # Every call reuses the pool's buffers: the arrays handed in are gone (donated).
    assert all(x.is_deleted() for x in (*before.k, *before.v))
    heads = max(KV_HEADS[model], tp)              # repeated up to one per device
    assert e.model_config.num_kv_heads == e.spec.num_kv_heads == heads
    for pages in (*e.cache.k, *e.cache.v):
        assert pages.sharding.spec == P(None, None, "tp", None)
        assert len(pages.sharding.device_set) == tp
        assert {s.data.shape[2] for s in pages.addressable_shards} == {heads // tp}
    for replicated in (e.cache.page_table, e.cache.lengths, e.cache.alloc.free_stack):
        assert replicated.sharding.spec == P() and replicated.sharding.is_fully_replicated
    attn, mlp = e.params["layers"][0]["self_attn"], e.params["layers"][0]["mlp"]
    assert attn["k_proj"]["kernel"][...].sharding.spec == P(None, "tp")
    assert attn["o_proj"]["kernel"][...].sharding.spec == P("tp", None)
    assert mlp["down_proj"]["kernel"][...].sharding.spec == P("tp", None)


@eight_devices
def test_tp_under_preemption(reference):
    """Paged rows in a pool of 12 pages: some are preempted and resumed, tokens unchanged."""
    llm = LLM("tiny-random", tensor_parallel_size=2, **(KW | dict(layout="paged")),
              max_total_tokens=48)
    assert generate(llm, runs=1) == reference("tiny-random")[:1]
    assert llm.engine.stats()["preemptions"] > 0


@eight_devices
def test_tp_with_an_elastic_pool(reference):
    """An elastic pool of 3 pages grows for the batch and shrinks back once idle (no delay),
    each device resizing its own share of the KV heads; tokens unchanged, pages still split."""
    llm = LLM("tiny-random", tensor_parallel_size=2, kv_pool="elastic", kv_pool_min_tokens=8,
              kv_shrink_after=0, max_total_tokens=96, **KW)
    assert generate(llm, runs=1) == reference("tiny-random")[:1]
    llm.engine.maintain()
    assert_pool_clean(llm)
    pool = llm.engine.scheduler.pool.report()
    assert pool["grows"] > 0 and pool["shrinks"] > 0, pool
    e = llm.engine
    for pages in (*e.cache.k, *e.cache.v):
        assert pages.sharding.spec == P(None, None, "tp", None)
        assert pages.shape[0] == e.cache.num_pages
    assert e.cache.page_table.sharding.is_fully_replicated


@eight_devices
def test_tp_runs_pallas_kernels_per_device(reference):
    """The GPU Pallas kernel (interpret mode) under shard_map == the jnp reference at tp=1."""
    llm = LLM("tiny-random", tensor_parallel_size=2, attention_impl="gpu-interpret", **KW)
    assert generate(llm, runs=1) == reference("tiny-random")[:1]


@eight_devices
def test_tp_with_fp8_pages():
    """fp8 pages sharded over 2 devices by KV head: the tokens of fp8 pages on one device."""
    fp8 = KW | dict(kv_cache_dtype="fp8_e4m3")
    llm = LLM("tiny-random", tensor_parallel_size=2, **fp8)
    assert llm.engine.cache.k[0].sharding.spec == P(None, None, "tp", None)
    assert generate(llm, runs=1) == generate(LLM("tiny-random", **fp8), runs=1)


@eight_devices
def test_tp_with_fp8_scales(tmp_path):
    """A checkpoint's per-KV-head fp8 scales (a different one each head) on 2 devices, each
    with its own heads' scales: the tokens of one device. Where KV heads are repeated for more
    devices than heads, each copy keeps its head's scales."""
    directory = scaled_checkpoint(tmp_path / "scaled", scales=True)
    fp8 = KW | dict(kv_cache_dtype="fp8_e4m3")
    assert generate(LLM(str(directory), tensor_parallel_size=2, **fp8), runs=1) == \
        generate(LLM(str(directory), **fp8), runs=1)
    model = load_hf(directory, progress=False)
    replicate_kv_heads(model, 3)
    assert model.layers[1].self_attn.kv_scales == ((4096.0,) * 3 + (1 / 64,) * 3,) * 2


@eight_devices
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "qwen3_moe", "mixtral"])
def test_tp_gemma_and_moe(family):
    """Gemma's extra norms, q/k norms (Gemma 3, one KV head repeated), local layers' ring pools
    (wrapping; prompt chunks of 6 through scratch pages) split by KV head like the pages; Qwen3-MoE's and Mixtral's
    experts, each split over the devices: on 2 devices, the tokens of one."""
    model = str(FIXTURES / family)
    kw = KW | dict(chunked_prefill_size=6)
    llm = LLM(model, tensor_parallel_size=2, **kw)
    if family in ("qwen3_moe", "mixtral"):
        experts = llm.engine.params["layers"][0]["mlp"]["experts"]
        assert experts["gate_proj"][...].sharding.spec == P(None, None, "tp")
        assert experts["down_proj"][...].sharding.spec == P(None, "tp", None)
    else:
        assert llm.engine.cache.ring == 3
        assert llm.engine.cache.ring_k[0].sharding.spec == P(None, None, "tp", None)
    assert generate(llm, runs=1) == generate(LLM(model, **kw), runs=1)


def config(heads, kv_heads, mlp=64):
    return ModelConfig(model_type="llama", vocab_size=8, hidden_size=16, intermediate_size=mlp,
                       num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=4,
                       rms_norm_eps=1e-5, rope=RopeConfig(1e4), max_position_embeddings=8)


@pytest.mark.parametrize("heads, kv_heads, tp, replicas", [
    (8, 8, 8, 1), (8, 8, 2, 1), (8, 2, 2, 1), (8, 2, 4, 2), (8, 2, 8, 4), (8, 1, 8, 8),
    (6, 3, 3, 1), (6, 3, 6, 2), (12, 3, 6, 2)])
def test_kv_replicas(heads, kv_heads, tp, replicas):
    assert kv_replicas(config(heads, kv_heads, mlp=48), tp) == replicas


@pytest.mark.parametrize("cfg, tp, message", [
    (config(4, 2), 8, "4 attention heads do not split evenly over 8 devices"),
    (config(6, 3), 2, "3 KV heads neither split evenly over 2 devices nor divide 2"),
    (config(12, 3), 4, "3 KV heads neither split evenly over 4 devices nor divide 4"),
    (config(8, 2, mlp=20), 8, "MLP width 20 does not split evenly over 8 devices"),
])
def test_kv_replicas_refuses_uneven_splits(cfg, tp, message):
    with pytest.raises(ValueError, match=f"--tensor-parallel-size / tensor_parallel_size={tp}: "
                                         f".*{message}"):
        kv_replicas(cfg, tp)


@eight_devices
@pytest.mark.parametrize("model, tp, message", [
    ("tiny-random", 0, "tensor_parallel_size must be >= 1, got 0"),
    ("tiny-random", 16, "tensor_parallel_size=16 needs 16 devices but JAX sees 8 cpu"),
    ("tiny-random", 8, "4 attention heads do not split evenly over 8 devices"),
    ("tiny-3-kv-heads", 2, "3 KV heads neither split evenly over 2 devices"),
])
def test_bad_tensor_parallel_size(model, tp, message):
    with pytest.raises(ValueError, match=message):
        LLM(model, tensor_parallel_size=tp, **KW)


@eight_devices
def test_serve_flag(capsys):
    assert serve.engine_config(serve.parse_args(["--tensor-parallel-size", "2"])
                               ).tensor_parallel_size == 2
    # No compilation cache: serve.main would turn it on for the rest of this pytest process.
    assert serve.main(["--model", "tiny-random", "--tensor-parallel-size", "3",
                       "--prompt", "hi", "--compilation-cache-dir", ""]) == 2
    assert "error: --tensor-parallel-size / tensor_parallel_size=3: the model's 4 attention " \
           "heads" in capsys.readouterr().err
