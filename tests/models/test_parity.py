"""Our Llama-family model against HF transformers goldens (tests/fixtures/make_fixtures.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FIXTURES, assert_pool_clean

import kvcache
from engine import LLM, SamplingParams
from engine.step import PrefillBatch, SamplingArrays, decode_step, prefill

FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]


def rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    golden = dict(np.load(FIXTURES / request.param / "golden.npz"))
    llm = LLM(str(FIXTURES / request.param), dtype="float32", page_size=4, max_model_len=64,
              max_num_seqs=4)
    return request.param, llm, golden


def test_logits_match_hf(family):
    """float32 logits within 1e-4 relative of HF for the prompt and 16 greedy decode steps."""
    _, llm, golden = family
    prompt = golden["prompt_ids"]
    greedy = SamplingArrays(jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.ones(1),
                            jnp.zeros(1, jnp.uint32))
    batch = PrefillBatch(rows=jnp.array([1]), tokens=jnp.asarray(prompt[None]),
                         prompt_lens=jnp.array([len(prompt)]),
                         layout=jnp.array([kvcache.LAYOUT_PAGED]),
                         reserve=jnp.array([-(-len(prompt) // 4)]), sampling=greedy)
    pre = jax.jit(prefill, static_argnums=0, static_argnames=("max_pages", "all_logits"))
    step = jax.jit(decode_step, static_argnums=0)
    token, logits, cache, ok = pre(llm.graphdef, llm.params, llm.cache, batch,
                                   max_pages=llm.pages_per_row, all_logits=True)
    assert bool(ok[0])
    assert rel_err(logits[0], golden["prompt_logits"]) <= 1e-4
    generated = [int(token[0])]
    for i in range(16):
        token, logits, cache, ok = step(llm.graphdef, llm.params, cache, jnp.array([1]),
                                        token, jnp.array([True]), greedy)
        assert bool(ok[0])
        assert rel_err(logits[0], golden["decode_logits"][i]) <= 1e-4, f"decode step {i}"
        generated.append(int(token[0]))
    assert generated[:16] == golden["decode_tokens"].tolist()
    assert generated[16] == int(np.argmax(golden["decode_logits"][15]))


@pytest.mark.parametrize("layout", ["static", "paged", "hybrid"])
def test_greedy_tokens_match_hf(family, layout):
    _, llm, golden = family
    llm.policy = kvcache.LayoutPolicy(layout, static_max_tokens=20)
    out = llm.generate([golden["prompt_ids"].tolist()],
                       SamplingParams(max_tokens=17, temperature=0, ignore_eos=True))[0]
    expected = golden["decode_tokens"].tolist() + [int(np.argmax(golden["decode_logits"][15]))]
    assert out.token_ids == expected
    assert out.layout == ("paged" if layout == "hybrid" else layout)
    assert_pool_clean(llm)
