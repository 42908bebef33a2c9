"""presence_penalty, frequency_penalty and repetition_penalty (SamplingParams): the sampler's
penalties against a numpy re-implementation of vLLM's definitions; in the engine, frequency and
presence penalties draw what a logit_bias of the same amounts draws on the same tokens; bad
values named. (That the counts they read stay right through chunks, the prefix cache and
preemption: tests/engine/test_scheduler.py.)"""

import collections

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_pool_clean

from engine import LLM, SamplingParams
from engine.limits import InvalidRequest
from engine.sampling import ADJUSTED, FILTERED, PLAIN, PROMPT_SEEN, level, sample


def numpy_penalties(logits, prompt, output, presence, frequency, repetition):
    """vLLM's: repetition over prompt and generated tokens, then frequency and presence over
    the generated ones."""
    out = logits.copy()
    seen = sorted(set(prompt) | set(output))
    out[seen] = np.where(out[seen] > 0, out[seen] / repetition, out[seen] * repetition)
    for t, c in collections.Counter(output).items():
        out[t] -= frequency * c + presence
    return out


def test_the_sampler_applies_the_penalties():
    rng = np.random.default_rng(0)
    b, v = 12, 40
    logits = rng.normal(size=(b, v)).astype(np.float32) * 3
    counts = np.zeros((b, v), np.int32)
    want = np.empty_like(logits)
    presence, frequency = rng.uniform(-2, 2, b), rng.uniform(-2, 2, b)
    repetition = rng.uniform(0.2, 3, b)
    repetition[0], presence[0], frequency[0] = 1, 0, 0     # a row without penalties
    for i in range(b):
        prompt = rng.choice(v, rng.integers(0, 8)).tolist()
        output = rng.choice(v, rng.integers(0, 12)).tolist()
        counts[i] = np.bincount(output, minlength=v)
        counts[i, prompt] |= PROMPT_SEEN
        want[i] = numpy_penalties(logits[i], prompt, output, presence[i], frequency[i],
                                  repetition[i])
    temp = np.where(np.arange(b) % 2 == 0, 0.0, 1.3).astype(np.float32)
    args = (jnp.asarray(temp), jnp.zeros(b, jnp.int32), jnp.ones(b),
            jnp.asarray(rng.integers(0, 2**32, b), jnp.uint32), jnp.zeros(b, jnp.int32))
    f32 = lambda x: jnp.asarray(x, jnp.float32)             # noqa: E731
    got = sample(jnp.asarray(logits), *args, penalties=(
        jnp.asarray(counts), f32(presence), f32(frequency), f32(repetition)))
    ref = sample(jnp.asarray(want), *args)                   # the same draws on penalized logits
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.tokens[::2], np.argmax(want, axis=-1)[::2])
    raw = sample(jnp.asarray(logits), *args)                 # log probabilities: the model's
    np.testing.assert_allclose(got.top_logprobs, raw.top_logprobs, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny-random", dtype="float32", page_size=4, context_length=128,
               max_running_requests=8, num_continuous_decode_steps=4)


@pytest.mark.parametrize("frequency,presence", [(1.5, 0.0), (0.0, 2.0), (0.8, -0.5)])
def test_frequency_and_presence_draw_as_the_same_bias(tiny, frequency, presence):
    """Each greedy token (the prefill step's, then 4-step decode loops') is the one a request
    of prompt + the tokens before it draws with a logit_bias of -(frequency * count +
    presence) on those tokens (OpenAI's definition; the prompt itself is not penalized)."""
    prompt = [256, 72, 105, 72, 72]
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True,
                            frequency_penalty=frequency, presence_penalty=presence)
    [out] = tiny.generate([prompt], params)
    [plain] = tiny.generate([prompt], SamplingParams(max_tokens=14, temperature=0,
                                                     ignore_eos=True))
    assert out.token_ids != plain.token_ids
    bias = [{t: -(frequency * c + presence) for t, c in
             collections.Counter(out.token_ids[:j]).items()} for j in range(14)]
    steps = tiny.generate([prompt + out.token_ids[:j] for j in range(14)],
                          [SamplingParams(max_tokens=1, temperature=0, ignore_eos=True,
                                          logit_bias=b) for b in bias])
    assert [s.token_ids[0] for s in steps] == out.token_ids
    assert_pool_clean(tiny)


def test_penalized_rows_beside_plain_ones(tiny):
    """A batch of penalized and plain requests: each draws what it draws alone."""
    prompt = [256, 72, 105]
    plain = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    rep = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, repetition_penalty=3.0)
    alone = [tiny.generate([prompt], p)[0].token_ids for p in (plain, rep)]
    together = [o.token_ids for o in tiny.generate([prompt, prompt], [plain, rep])]
    assert together == alone and alone[0] != alone[1]
    assert_pool_clean(tiny)


@pytest.mark.parametrize("field,value,message", [
    ("presence_penalty", 2.5, "in \\[-2, 2\\]"), ("frequency_penalty", float("nan"), "in \\[-2"),
    ("repetition_penalty", 0, "in \\(0, 100"), ("repetition_penalty", "x", "in \\(0, 100"),
    ("frequency_penalty", True, "in \\[-2")])
def test_bad_penalties_are_named(field, value, message):
    with pytest.raises(InvalidRequest, match=f"{field} must be a number {message}") as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_only_penalized_requests_leave_the_plain_sampler():
    assert level(SamplingParams()) == level(SamplingParams(temperature=0)) == PLAIN
    assert level(SamplingParams(repetition_penalty=1.1)) == ADJUSTED
    assert level(SamplingParams(presence_penalty=-0.1, top_p=0.9)) == FILTERED
