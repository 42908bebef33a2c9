"""Our Llama-family model against HF transformers goldens (tests/fixtures/make_fixtures.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import FIXTURES, assert_pool_clean

import kvcache
from engine import LLM, SamplingParams
from engine.step import SamplingArrays, decode_step
from models import Group

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "qwen3_moe",
            "mixtral"]


def rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    golden = dict(np.load(FIXTURES / request.param / "golden.npz"))
    llm = LLM(str(FIXTURES / request.param), dtype="float32", page_size=4, context_length=64,
              max_running_requests=4)
    return request.param, llm, golden


def test_logits_match_hf(family):
    """float32 logits within 1e-4 relative of HF for the prompt and 16 greedy decode steps."""
    _, llm, golden = family
    e = llm.engine
    prompt = jnp.asarray(golden["prompt_ids"])
    t = len(prompt)
    greedy = SamplingArrays(jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.ones(1),
                            jnp.zeros(1, jnp.uint32))
    rows = jnp.array([1])
    cache, ok = kvcache.admit_rows(e.cache, rows, jnp.array([kvcache.LAYOUT_PAGED]),
                                   jnp.array([-(-t // 4)]), e.pages_per_row)
    assert bool(ok[0])
    model = nnx.merge(e.graphdef, e.params)
    group = Group(prompt[None], jnp.arange(t)[None], cache.page_table[rows], jnp.array([t]),
                  **(kvcache.ring_group(cache, rows, jnp.array([0]), jnp.array([t]), t)[0]
                     if cache.ring else {}))
    [hidden], k, v, (ring_k, ring_v) = model((group,), cache.k, cache.v,
                                             rings=(cache.ring_k, cache.ring_v))
    logits = model.logits(hidden[0])                                       # [T,V]
    assert rel_err(logits, golden["prompt_logits"]) <= 1e-4
    cache = dataclasses.replace(cache, k=k, v=v, ring_k=ring_k, ring_v=ring_v,
                                lengths=cache.lengths.at[1].set(t))
    token = jnp.argmax(logits[-1:], axis=-1).astype(jnp.int32)
    step = jax.jit(decode_step, static_argnums=0)
    generated = [int(token[0])]
    for i in range(16):
        sampled, logits, cache, ok, _ = step(e.graphdef, e.params, cache, rows, token,
                                             jnp.array([True]), greedy)
        token = sampled.tokens
        assert bool(ok[0])
        assert rel_err(logits[0], golden["decode_logits"][i]) <= 1e-4, f"decode step {i}"
        generated.append(int(token[0]))
    assert generated[:16] == golden["decode_tokens"].tolist()
    assert generated[16] == int(np.argmax(golden["decode_logits"][15]))


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_moe_prompt_logits_through_the_gpu_kernels(name):
    """The experts through kernels/grouped.py's Pallas kernel (and attention through the GPU
    kernels), in interpret mode: the prompt's logits within 1e-4 of HF's, as on the default
    path (test_logits_match_hf)."""
    golden = dict(np.load(FIXTURES / name / "golden.npz"))
    e = LLM(str(FIXTURES / name), dtype="float32", page_size=4, context_length=64,
            max_running_requests=4).engine
    prompt = jnp.asarray(golden["prompt_ids"])
    t = len(prompt)
    cache, ok = kvcache.admit_rows(e.cache, jnp.array([1]), jnp.array([kvcache.LAYOUT_PAGED]),
                                   jnp.array([-(-t // 4)]), e.pages_per_row)
    group = Group(prompt[None], jnp.arange(t)[None], cache.page_table[1:2], jnp.array([t]))
    model = nnx.merge(e.graphdef, e.params)
    [hidden], _, _, _ = model((group,), cache.k, cache.v, attn_impl="gpu-interpret")
    assert rel_err(model.logits(hidden[0]), golden["prompt_logits"]) <= 1e-4


@pytest.mark.parametrize("layout", ["static", "paged", "hybrid"])
def test_greedy_tokens_match_hf(family, layout):
    _, llm, golden = family
    llm.engine.scheduler.policy = kvcache.LayoutPolicy(layout, static_max_tokens=20)
    out = llm.generate([golden["prompt_ids"].tolist()],
                       SamplingParams(max_tokens=17, temperature=0, ignore_eos=True))[0]
    expected = golden["decode_tokens"].tolist() + [int(np.argmax(golden["decode_logits"][15]))]
    assert out.token_ids == expected
    assert out.layout == ("paged" if layout == "hybrid" else layout)
    assert_pool_clean(llm)
