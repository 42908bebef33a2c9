"""Structured output (engine.guided): the sampler's mask against llguidance's own numpy one;
through the engine, 20 random JSON schemas (objects, arrays, enums, nested, required fields)
whose every output parses and validates, regular expressions and context-free grammars (GBNF,
Lark) whose outputs match, greedy draws
that are the most likely token the grammar allows, guided rows beside plain multi-step ones;
bad grammars named."""

import json
import random
import re

import jax.numpy as jnp
import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import pytest
from helpers import assert_pool_clean

from engine import LLM, SamplingParams
from engine.guided import Grammars, mask_words
from engine.limits import InvalidRequest
from engine.sampling import allow
from models.presets import byte_tokenizer


def test_the_mask_bars_what_the_bitmask_clears():
    rng = np.random.default_rng(0)
    b, v = 5, 261
    logits = rng.normal(size=(b, v)).astype(np.float32)
    allowed = rng.integers(-2**31, 2**31, (b, mask_words(v)), dtype=np.int64).astype(np.int32)
    allowed[0] = -1                                   # everything allowed
    allowed[1] = 0
    allowed[1, 3] = np.int32(-2**31 + 1)              # bits 0 and 31: tokens 96 and 127
    want = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace(want, allowed)
    got = np.asarray(allow(jnp.asarray(logits), jnp.asarray(allowed)))
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got[1]).nonzero()[0].tolist() == [96, 127]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema whose instances are short (every string, array and number bounded), so a
    random model's output ends within max_tokens."""
    kinds = ["string", "integer", "boolean", "enum", "null", "const"]
    if depth < 2:
        kinds += ["object", "array", "object"]
    kind = rng.choice(kinds)
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 6)}
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", 7, None, True, "x y"], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["fixed", 42, False])}
    if kind == "array":
        lo = rng.randint(0, 1)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo,
                "maxItems": lo + rng.randint(0, 2)}
    names = rng.sample(["id", "name", "tags", "size", "child", "ok", "when", "note"],
                       rng.randint(1, 4))
    return {"type": "object", "additionalProperties": False,
            "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": rng.sample(names, rng.randint(0, len(names)))}


@pytest.fixture(scope="module")
def tiny():
    return LLM("tiny-random", dtype="float32", page_size=4, context_length=1024,
               max_running_requests=8, num_continuous_decode_steps=4)


def test_twenty_random_schemas_every_output_validates(tiny):
    """Sampled (temperature 1) under 20 random schemas, beside plain requests that run 4
    steps a launch and one with log probabilities: every guided output is JSON that validates
    and ends with the grammar ("stop"); the plain requests draw what they draw alone."""
    rng = random.Random(0)
    schemas = [{"type": "object", "additionalProperties": False,
                "properties": {"root": random_schema(rng)}, "required": ["root"]}
               for _ in range(20)]
    plain = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    [alone] = tiny.generate([[256, 5, 6]], plain)
    params = [SamplingParams(max_tokens=600, temperature=1.0, seed=i, guided_json=s)
              for i, s in enumerate(schemas)]
    params.insert(3, plain)
    params.insert(9, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2))
    prompts = [[256, 5, 6] if p.guided_json is None else "Answer in JSON:" for p in params]
    outs = tiny.generate(prompts, params)
    assert outs[3].token_ids == alone.token_ids
    assert outs[9].token_ids == alone.token_ids and len(outs[9].logprobs) == 40
    guided = [o for o, p in zip(outs, params) if p.guided_json is not None]
    for out, schema in zip(guided, schemas):
        assert out.finish_reason == "stop", (out.text, schema)
        jsonschema.validate(json.loads(out.text), schema)
    assert len({o.text for o in guided}) > 10          # the draws differ
    assert_pool_clean(tiny)


@pytest.mark.parametrize("regex", [r"[0-9]{3}-[a-z]{2,4}", r"(yes|no|maybe)!",
                                   r"\([0-9]{1,3}\) [A-Z][a-z]{0,5}", r"[ab]+c"])
def test_regex_outputs_match(tiny, regex):
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, guided_regex=regex)
              for s in range(4)]
    for out in tiny.generate(["pick:"] * 4, params):
        assert out.finish_reason == "stop"
        assert re.fullmatch(regex, out.text), (regex, out.text)


def balanced(text: str) -> bool:
    """Whether text is "x" inside n >= 0 pairs of parentheses (no regex says this)."""
    n = len(text) // 2
    return text == "(" * n + "x" + ")" * n


@pytest.mark.parametrize("grammar, check", [
    ('root ::= greeting " " num "!"\ngreeting ::= "hi" | "hello"\nnum ::= [0-9] [0-9]?',
     lambda t: re.fullmatch(r"(hi|hello) [0-9][0-9]?!", t)),
    ('root ::= "(" root ")" | "x"', balanced),                      # recursive: not a regex
    ('start: ("ab" | "c")+ "."', lambda t: re.fullmatch(r"(ab|c)+\.", t))])     # Lark
def test_context_free_grammar_outputs_match(tiny, grammar, check):
    params = [SamplingParams(max_tokens=60, temperature=1.0, seed=s, guided_grammar=grammar)
              for s in range(4)]
    for out in tiny.generate(["pick:"] * 4, params):
        assert out.finish_reason == "stop"
        assert check(out.text), (grammar, out.text)
    assert_pool_clean(tiny)


def test_a_grammar_of_one_string_forces_it(tiny):
    [out] = tiny.generate(["x"], SamplingParams(max_tokens=30, temperature=1.5, seed=3,
                                               guided_regex=r"forced: \{ok\}"))
    assert out.text == "forced: {ok}" and out.finish_reason == "stop"


def test_greedy_draws_the_most_likely_token_the_grammar_allows(tiny):
    """Each greedy token is allowed, and every token the model's own distribution ranks above
    it (its top 20 log probabilities) is barred by the grammar at that point."""
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5},
                                               "b": {"enum": [1, 22, 333]}},
              "required": ["a", "b"], "additionalProperties": False}
    [out] = tiny.generate(["json"], SamplingParams(max_tokens=80, temperature=0, logprobs=20,
                                                  guided_json=schema))
    jsonschema.validate(json.loads(out.text), schema)
    cfg = tiny.engine.model_config
    matcher = Grammars(byte_tokenizer(), cfg.vocab_size, cfg.eos_token_ids).matcher(
        SamplingParams(guided_json=schema))
    mask = np.zeros((1, mask_words(cfg.vocab_size)), np.int32)
    barred_above = 0
    for token, top in zip(out.token_ids, out.logprobs):     # {token: log probability}
        llguidance.numpy.fill_next_token_bitmask(matcher, mask)
        ok = lambda t: mask[0, t // 32] >> (t % 32) & 1       # noqa: E731
        assert ok(token)
        above = [t for t, x in top.items() if x > top[token] + 1e-6]
        assert not any(ok(t) for t in above), (token, above)
        barred_above += len(above)
        assert matcher.consume_token(token)
    assert barred_above > 0        # the grammar did overrule the model


def test_bad_grammars_are_named(tiny):
    for kw, field in [({"guided_json": "{not json"}, "guided_json"),
                      ({"guided_json": [1, 2]}, "guided_json"),
                      ({"guided_json": {"type": "frobnicate"}}, "guided_json"),
                      ({"guided_regex": "a(b"}, "guided_regex"),
                      ({"guided_regex": ""}, "guided_regex"),
                      ({"guided_json": {}, "guided_regex": "a"}, "guided_regex"),
                      ({"guided_grammar": "root ::= nope"}, "guided_grammar"),
                      ({"guided_grammar": 'root ::= "a'}, "guided_grammar"),
                      ({"guided_grammar": 'start: "a" ('}, "guided_grammar"),
                      ({"guided_grammar": ""}, "guided_grammar"),
                      ({"guided_regex": "a", "guided_grammar": "start: \"a\""},
                       "guided_grammar"),
                      ({"guided_regex": "a", "min_tokens": 2}, "min_tokens")]:
        with pytest.raises(InvalidRequest) as e:
            tiny.generate(["x"], SamplingParams(max_tokens=4, **kw))
        assert e.value.param == field, (kw, e.value)
    assert_pool_clean(tiny)
