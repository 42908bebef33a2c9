"""logit_bias (SamplingParams(logit_bias={token: bias})): added to the logits before every
draw, against a numpy re-implementation; in the engine, alone and beside requests without
one; bad values named. min_tokens, which bars the stop ids the same way while a row is short."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_pool_clean

from engine import LLM, SamplingParams
from engine.limits import InvalidRequest
from engine.sampling import sample


def test_the_sampler_adds_the_bias_before_every_draw():
    rng = np.random.default_rng(0)
    b, v, n = 16, 50, 6
    logits = rng.normal(size=(b, v)).astype(np.float32) * 3
    ids = np.stack([rng.choice(v, n, replace=False) for _ in range(b)]).astype(np.int32)
    ids[::3, 4:] = -1                                     # rows with fewer entries
    bias = rng.uniform(-100, 100, (b, n)).astype(np.float32)
    biased = logits.copy()
    for i in range(b):
        for t, x in zip(ids[i], bias[i]):
            if t >= 0:
                biased[i, t] += x
    temp = np.where(np.arange(b) % 2 == 0, 0.0, 1.5).astype(np.float32)
    args = (jnp.asarray(temp), jnp.zeros(b, jnp.int32), jnp.ones(b),
            jnp.asarray(rng.integers(0, 2**32, b), jnp.uint32), jnp.zeros(b, jnp.int32))
    got = sample(jnp.asarray(logits), *args, jnp.asarray(ids), jnp.asarray(bias))
    ref = sample(jnp.asarray(biased), *args)             # the same draws on biased logits
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.tokens[::2], np.argmax(biased, axis=-1)[::2])
    raw = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)
                          ) - logits.max(1, keepdims=True)
    np.testing.assert_allclose(got.logprob, raw[np.arange(b), got.tokens], atol=1e-5)


@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny-random", dtype="float32", page_size=4, context_length=128,
               max_running_requests=8, num_continuous_decode_steps=4)


def test_the_engine_draws_with_the_bias(tiny):
    prompt = [256, 72, 105]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    [plain] = tiny.generate([prompt], greedy)
    forced = SamplingParams(max_tokens=10, temperature=0.9, seed=1, ignore_eos=True,
                            logit_bias={65: 100})
    banned = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True,
                            logit_bias={t: -100 for t in set(plain.token_ids)})
    outs = tiny.generate([prompt, prompt, prompt], [forced, greedy, banned])
    assert outs[0].token_ids == [65] * 10
    assert outs[1].token_ids == plain.token_ids            # beside biased rows: unchanged
    assert not set(outs[2].token_ids) & set(plain.token_ids)
    assert_pool_clean(tiny)


@pytest.mark.parametrize("bias, message", [
    ({5: 101}, "biases in \\[-100, 100\\]"), ({-1: 1}, "token ids"),
    ({5: float("nan")}, "biases"), (dict.fromkeys(range(301), 1.0), "at most 300"),
    ("x", "a map of token ids")])
def test_bad_biases_are_named(bias, message):
    with pytest.raises(InvalidRequest, match=message) as e:
        SamplingParams(logit_bias=bias)
    assert e.value.param == "logit_bias"


def test_a_token_past_the_vocabulary_is_named(tiny):
    with pytest.raises(InvalidRequest, match="logit_bias has token ids outside"):
        tiny.generate([[256, 65]], SamplingParams(logit_bias={10**6: 1.0}))


@pytest.mark.parametrize("min_tokens", [1, 3, 7])
def test_min_tokens_bar_the_stop_ids_until_reached(tiny, min_tokens):
    """A stop id the greedy run would draw at once: with min_tokens the first min_tokens tokens
    are those of a run that bars it by bias (through the prefill step and the 4-step decode
    loops), then it may stop the request."""
    prompt = [256, 72, 105]
    [first] = tiny.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    stop = first.token_ids[0]
    [barred] = tiny.generate([prompt], SamplingParams(
        max_tokens=min_tokens, temperature=0, logit_bias={stop: -100}))
    [out] = tiny.generate([prompt], SamplingParams(
        max_tokens=12, temperature=0, stop_token_ids=[stop], min_tokens=min_tokens))
    assert out.token_ids[:min_tokens] == barred.token_ids
    assert stop not in out.token_ids[:min_tokens]
    # Then the bar lifts: the rest is a plain greedy continuation of those tokens.
    [rest] = tiny.generate([prompt + barred.token_ids], SamplingParams(
        max_tokens=12 - min_tokens, temperature=0, stop_token_ids=[stop]))
    assert out.token_ids[min_tokens:] == rest.token_ids
    assert out.finish_reason == rest.finish_reason
    [plain] = tiny.generate([prompt], SamplingParams(max_tokens=12, temperature=0,
                                                     stop_token_ids=[stop]))
    assert plain.token_ids == [stop] and plain.finish_reason == "stop"
    assert_pool_clean(tiny)


def test_min_tokens_past_max_tokens_is_named():
    with pytest.raises(InvalidRequest, match="min_tokens must be an integer in") as e:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert e.value.param == "min_tokens"
