"""Log probabilities of sampled tokens (SamplingParams(logprobs=N)), computed inside the step:
equal to log_softmax of transformers' logits on the HF fixture, the same from the decode loop
as from a prefill of the same prefix, and the same whatever batch a request runs in."""

import numpy as np
import pytest
from helpers import FIXTURES, assert_pool_clean

import kvcache
from engine import LLM, SamplingParams
from engine.limits import InvalidRequest


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


@pytest.fixture(scope="module")
def llama():
    golden = dict(np.load(FIXTURES / "llama" / "golden.npz"))
    llm = LLM(str(FIXTURES / "llama"), dtype="float32", page_size=4, context_length=64,
              max_running_requests=4, num_continuous_decode_steps=4)
    return llm, golden


@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny-random", dtype="float32", page_size=4, context_length=128,
               max_running_requests=8, num_continuous_decode_steps=4)


@pytest.mark.parametrize("layout", ["static", "paged"])
def test_greedy_logprobs_equal_transformers(llama, layout):
    """The first token comes from the prefill step, the others from decode loops: each token's
    log probability and the top 5 are log_softmax of HF's logits at that position."""
    llm, golden = llama
    llm.engine.scheduler.policy = kvcache.LayoutPolicy(layout, static_max_tokens=20)
    [out] = llm.generate([golden["prompt_ids"].tolist()],
                         SamplingParams(max_tokens=17, temperature=0, ignore_eos=True,
                                        logprobs=5))
    refs = [golden["prompt_logits"][-1], *golden["decode_logits"]]
    assert len(out.logprobs) == len(out.token_ids) == 17
    for token, got, logits in zip(out.token_ids, out.logprobs, refs):
        ref = log_softmax(logits)
        top = list(np.argsort(-ref)[:5])
        assert list(got) == top and token == top[0]        # greedy: the sampled one leads
        np.testing.assert_allclose([got[t] for t in top], ref[top], atol=1e-4)
    assert_pool_clean(llm)


def test_sampled_logprobs_equal_a_prefill_of_the_same_prefix(tiny):
    """Sampling at temperature 1.3 with top-k: the logprobs are the model's distribution (before
    temperature and filters). A one-token request on prompt + the first j output tokens (a
    prefill) gives the same numbers as step j of the decode loop."""
    prompt = [256, 72, 101, 108, 108, 111]
    params = SamplingParams(max_tokens=9, temperature=1.3, top_k=40, seed=7, ignore_eos=True,
                            logprobs=4)
    [out] = tiny.generate([prompt], params)
    for j in (0, 1, 4, 8):
        [one] = tiny.generate([prompt + out.token_ids[:j]],
                              SamplingParams(max_tokens=1, temperature=0, logprobs=4))
        top = dict(sorted(one.logprobs[0].items(), key=lambda kv: -kv[1])[:4])
        got = {t: lp for t, lp in out.logprobs[j].items() if t in top}
        assert got.keys() == top.keys(), j
        np.testing.assert_allclose(list(got.values()), [top[t] for t in got], atol=1e-4)
        sampled = out.logprobs[j][out.token_ids[j]]
        assert sampled <= max(top.values()) + 1e-6
    assert_pool_clean(tiny)


def test_logprobs_do_not_depend_on_the_batch(tiny):
    """Alone, or beside requests that ask for none (greedy, top-p), in one batch."""
    prompt = [256, 80, 97, 114, 105, 115]
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True, logprobs=2)
    [alone] = tiny.generate([prompt], params)
    others = [SamplingParams(max_tokens=5, temperature=0), SamplingParams(max_tokens=7, top_p=0.5)]
    outs = tiny.generate([[256, 65], prompt, [256, 66, 67]], [others[0], params, others[1]])
    assert outs[1].token_ids == alone.token_ids
    for a, b in zip(outs[1].logprobs, alone.logprobs):
        assert a.keys() == b.keys()
        np.testing.assert_allclose(list(a.values()), list(b.values()), atol=1e-5)
    assert outs[0].logprobs is None and outs[2].logprobs is None
    assert all(len(d) in (2, 3) for d in alone.logprobs)     # the top 2, and the sampled one
    [zero] = tiny.generate([prompt], SamplingParams(max_tokens=3, temperature=0, logprobs=0))
    assert [list(d) for d in zero.logprobs] == [[t] for t in zero.token_ids]


@pytest.mark.parametrize("value", [21, -1, 1.5, True])
def test_bad_logprobs_are_named(value):
    with pytest.raises(InvalidRequest, match="logprobs must be an integer in") as e:
        SamplingParams(logprobs=value)
    assert e.value.param == "logprobs"


@pytest.mark.parametrize("chunk", [8, 64])
def test_prompt_logprobs_equal_transformers(llama, chunk):
    """SamplingParams(prompt_logprobs=3): every prompt token after the first with its log
    probability and the 3 most likely in its place, of log_softmax of HF's logits at the
    position before, in one chunk or across chunks of 8 (the last position of a chunk
    predicts the next chunk's first token); the first is None, as in vLLM."""
    _, golden = llama
    llm = LLM(str(FIXTURES / "llama"), dtype="float32", page_size=4, context_length=64,
              max_running_requests=4, chunked_prefill_size=chunk)
    prompt = golden["prompt_ids"].tolist()
    [out] = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0,
                                                  prompt_logprobs=3))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        ref = log_softmax(golden["prompt_logits"][j - 1])
        top = list(np.argsort(-ref)[:3])
        got = out.prompt_logprobs[j]
        assert set(got) == set(top) | {prompt[j]}, j
        np.testing.assert_allclose([got[t] for t in got], ref[list(got)], atol=1e-4)
    assert out.logprobs is None
    assert_pool_clean(llm)


def test_prompt_logprobs_skip_the_prefix_cache(tiny):
    """A prompt the prefix cache holds is computed again for a request that wants its log
    probabilities (they would be missing for the cached part), and they are the same."""
    prompt = list(range(40, 75))
    params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0)
    [first] = tiny.generate([prompt], params)
    [again] = tiny.generate([prompt], params)
    [plain] = tiny.generate([prompt], SamplingParams(max_tokens=3, temperature=0))
    assert again.cached_tokens == 0 and plain.cached_tokens > 0
    assert again.prompt_logprobs == first.prompt_logprobs and len(first.prompt_logprobs) == 35
    assert all(len(lp) == 1 for lp in first.prompt_logprobs[1:])   # the prompt token alone
    assert again.token_ids == plain.token_ids
    assert_pool_clean(tiny)
