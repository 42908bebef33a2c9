"""The sampling fields of the API over the real app and engine process (tiny model): log
probabilities of sampled tokens and of echoed prompts (completions' echo, /generate's
logprob_start_len) through the official client and raw bodies, logit_bias, penalties,
min_tokens, structured output (response_format, /generate's regex, json_schema and ebnf)."""

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

MODEL, KEY, MAX_BYTES = "tiny-random", "sk-sampling", 1 << 20
FLAGS = ["--model", MODEL, "--dtype", "float32", "--page-size", "4", "--context-length", "256",
         "--max-total-tokens", "1024", "--max-running-requests", "8", "--static-max-tokens", "64",
         "--chunked-prefill-size", "8", "--skip-warmup", "--log-level", "warning"]
AUTH = {"authorization": f"Bearer {KEY}"}
C, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/generate"
BASE = {C: {"model": MODEL, "prompt": "hi", "max_tokens": 2},
        CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        GEN: {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}}
PROMPT = [72, 105, 33, 44, 55, 66, 77, 88, 99, 100, 101, 102]      # two chunks of 8


def post(client, path: str, body) -> httpx.Response:
    return client.post(path, content=json.dumps(body).encode(),
                       headers=AUTH | {"content-type": "application/json"})


def body_with(path: str, field: str, value) -> dict:
    body = json.loads(json.dumps(BASE[path]))
    *outer, name = field.split(".")
    (body[outer[0]] if outer else body)[name] = value
    return body


def sorted_desc(values) -> bool:
    return all(a >= b for a, b in zip(values, values[1:]))


def test_logprobs_through_the_official_client(client):
    """Completions (logprobs=3) and chat (top_logprobs=2), whole and streamed: one entry per
    token, the top lists sorted and holding the sampled token's value where they name it; the
    stream carries the same numbers as the whole answer (greedy)."""
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client)
    kw = dict(model=MODEL, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    whole = sdk.completions.create(prompt="hello", logprobs=3, **kw).choices[0]
    lp = whole.logprobs
    ids = whole.model_extra["token_ids"]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) == 6
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # Keyed by text, as OpenAI's legacy shape is: the byte tokens of the tiny model's
        # vocabulary past ASCII all read "\ufffd", so fewer than 3 keys may remain.
        assert 1 <= len(top) <= 3 and value <= 0
        if token != "\ufffd":
            assert sorted_desc(list(top.values()))
            assert top[token] == pytest.approx(value, abs=1e-6)
            assert value == pytest.approx(max(top.values()), abs=1e-6)   # greedy: the top one
    chunks = [c.choices[0] for c in sdk.completions.create(prompt="hello", logprobs=3,
                                                           stream=True, **kw) if c.choices]
    streamed = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
    messages = [{"role": "user", "content": "hi"}]
    chat = sdk.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2,
                                       **kw).choices[0].logprobs.content
    assert len(chat) == 6
    for entry in chat:
        assert [t.logprob for t in entry.top_logprobs][0] == pytest.approx(entry.logprob)
        assert len(entry.top_logprobs) == 2 and bytes(entry.bytes).decode() == entry.token
    plain = sdk.chat.completions.create(messages=messages, **kw).choices[0]
    assert plain.logprobs is None
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        sdk.chat.completions.create(messages=messages, top_logprobs=2, **kw)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        sdk.completions.create(prompt="hi", logprobs=21, **kw)


@pytest.mark.parametrize("path", [C, CHAT, GEN])
def test_logit_bias_is_honoured_and_checked(client, path):
    """Every sampled token is the one biased by +100; a bad key or bias is a 400 naming it."""
    body = body_with(path, "sampling_params.logit_bias" if path == GEN else "logit_bias",
                     {"65": 100})
    r = post(client, path, body)
    assert r.status_code == 200, r.text
    if path == CHAT:       # a chat choice carries its text only: token 65 is "A"
        assert r.json()["choices"][0]["message"]["content"] == "AA"
    else:
        ids = r.json()["output_ids"] if path == GEN else r.json()["choices"][0]["token_ids"]
        assert ids == [65, 65]
    for bad in ({"x": 1}, {"65": 200}):
        field = "sampling_params.logit_bias" if path == GEN else "logit_bias"
        r = post(client, path, body_with(path, field, bad))
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


@pytest.mark.parametrize("path", [C, GEN])
def test_penalties_reach_the_sampler(client, path):
    """Greedy with frequency 1.5 and presence 0.5: the second token is the one a request of
    the prompt + the first draws with a bias of -2 on the first (both generated-token
    penalties, OpenAI's meaning); repetition_penalty is taken too."""
    def ids(prompt, n, **fields):
        if path == GEN:
            body = {"input_ids": prompt, "sampling_params": {
                "max_new_tokens": n, "temperature": 0, "ignore_eos": True, **fields}}
            r = post(client, GEN, body)
            assert r.status_code == 200, r.text
            return r.json()["output_ids"]
        r = post(client, C, {"model": MODEL, "prompt": prompt, "max_tokens": n,
                             "temperature": 0, "ignore_eos": True, **fields})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    first, second = ids([72, 105], 2, frequency_penalty=1.5, presence_penalty=0.5)
    assert ids([72, 105, first], 1, logit_bias={str(first): -2.0}) == [second]
    assert len(ids([72, 105], 3, repetition_penalty=1.3)) == 3


def test_min_tokens_hold_off_the_stop_token(client):
    """The greedy first token made a stop token: min_tokens 3 draws three others first."""
    greedy = {**BASE[C], "temperature": 0}
    ids = post(client, C, {**greedy, "max_tokens": 1}).json()["choices"][0]["token_ids"]
    body = {**greedy, "max_tokens": 6, "stop_token_ids": ids}
    assert post(client, C, body).json()["choices"][0]["token_ids"] == ids
    held = post(client, C, {**body, "min_tokens": 3}).json()["choices"][0]["token_ids"]
    assert len(held) >= 3 and ids[0] not in held[:3]
    r = post(client, GEN, {"input_ids": [5], "sampling_params": {"max_new_tokens": 2,
                                                                 "min_new_tokens": 3}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.min_new_tokens"


def test_generate_returns_sglang_logprobs(client):
    r = post(client, GEN, {"input_ids": [5, 6, 7], "return_logprob": True,
                           "top_logprobs_num": 2,
                           "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                               "ignore_eos": True}})
    meta = r.json()["meta_info"]
    out = meta["output_token_logprobs"]
    assert [t for _, t, _ in out] == r.json()["output_ids"] and len(out) == 4
    for (value, token, _), top in zip(out, meta["output_top_logprobs"]):
        assert len(top) == 2 and top[0][1] == token and top[0][0] == pytest.approx(value)
    assert "output_token_logprobs" not in post(client, GEN, BASE[GEN]).json()["meta_info"]




def forced_logprob(client, prefix: list[int], token: int) -> float:
    """token's log probability after prefix, read as a sampled token's: a one-token request
    that a bias of +100 makes draw it (log probabilities are of the unbiased logits)."""
    r = post(client, C, {"model": MODEL, "prompt": prefix, "max_tokens": 1, "logprobs": 0,
                         "temperature": 0, "ignore_eos": True, "logit_bias": {str(token): 100}})
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == [token], r.text
    return choice["logprobs"]["token_logprobs"][0]


def test_echo_returns_the_prompt_and_its_logprobs(client):
    """What lm-evaluation-harness sends for a log-likelihood (echo, logprobs 1, max_tokens 0):
    the prompt back, text and ids, each token after the first with the log probability a
    request of the tokens before it reads for it (across the prompt's two chunks), the first
    null; nothing generated, none counted."""
    r = post(client, C, {"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 1,
                         "max_tokens": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["token_ids"] == PROMPT and r.json()["usage"]["completion_tokens"] == 0
    assert choice["text"] == "".join(lp["tokens"]) and choice["finish_reason"] == "length"
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for j in (1, 7, 8, 11):             # the last position of a chunk predicts the next's first
        want = forced_logprob(client, PROMPT[:j], PROMPT[j])
        assert lp["token_logprobs"][j] == pytest.approx(want, abs=1e-5), j
        assert len(lp["top_logprobs"][j]) >= 1
    again = post(client, C, {"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 1,
                             "max_tokens": 0, "temperature": 0}).json()["choices"][0]
    assert again["logprobs"]["token_logprobs"] == lp["token_logprobs"]   # no cached prefix


def test_echo_before_a_completion_whole_and_streamed(client):
    """echo with max_tokens 3: the prompt's text, ids and log probabilities, then the
    completion's; streamed, the first chunk carries the prompt and the whole is the same."""
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client)
    kw = dict(model=MODEL, prompt="Hello there", max_tokens=3, temperature=0, echo=True,
              logprobs=2, extra_body={"ignore_eos": True})
    whole = sdk.completions.create(**kw).choices[0]
    plain = sdk.completions.create(**{**kw, "echo": False}).choices[0]
    assert whole.text == "Hello there" + plain.text
    n = len(whole.model_extra["token_ids"]) - 3
    assert whole.model_extra["token_ids"][n:] == plain.model_extra["token_ids"]
    assert whole.logprobs.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs)
    assert whole.logprobs.token_logprobs[0] is None
    assert whole.logprobs.text_offset == [len("".join(whole.logprobs.tokens[:i]))
                                          for i in range(n + 3)]
    chunks = [c.choices[0] for c in sdk.completions.create(stream=True, **kw) if c.choices]
    assert chunks[0].text.startswith("Hello there")
    assert "".join(c.text for c in chunks) == whole.text
    streamed = [v for c in chunks for v in c.logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.logprobs.token_logprobs)


def test_max_tokens_0_needs_echo(client):
    r = post(client, C, {"model": MODEL, "prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text


def test_generate_returns_the_prompts_logprobs_from_logprob_start_len(client):
    """SGLang's input_token_logprobs / input_top_logprobs from logprob_start_len on: the same
    numbers as completions' echo (position 0 has none)."""
    echo = post(client, C, {"model": MODEL, "prompt": PROMPT, "echo": True, "logprobs": 2,
                            "max_tokens": 0}).json()["choices"][0]["logprobs"]
    for start in (0, 3):
        r = post(client, GEN, {"input_ids": PROMPT, "return_logprob": True,
                               "top_logprobs_num": 2, "logprob_start_len": start,
                               "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
        meta = r.json()["meta_info"]
        got = meta["input_token_logprobs"]
        assert [t for _, t, _ in got] == PROMPT[start:]
        assert [v for v, _, _ in got] == pytest.approx(echo["token_logprobs"][start:])
        assert [None if top is None else len(top) for top in meta["input_top_logprobs"]] == [
            None if e is None else 2 for e in echo["top_logprobs"][start:]]
    r = post(client, GEN, {"input_ids": PROMPT, "return_logprob": True,
                           "sampling_params": {"max_new_tokens": 1}})
    assert "input_token_logprobs" not in r.json()["meta_info"]


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                  "maxItems": 2}}}


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=120)
    retired: bool


def test_response_format_through_the_official_client(client):
    """json_schema (whole, streamed, on completions too, and the SDK's own parse() of a
    pydantic model) and json_object: the tiny model's noise comes out as JSON that
    validates."""
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client)
    messages = [{"role": "user", "content": "Who?"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    kw = dict(model=MODEL, max_tokens=200, temperature=1.0)
    for seed in range(3):
        out = sdk.chat.completions.create(messages=messages, response_format=fmt, seed=seed,
                                          **kw).choices[0]
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.message.content), PERSON)
    chunks = sdk.chat.completions.create(messages=messages, response_format=fmt, seed=7,
                                         stream=True, **kw)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks
                                           if c.choices)), PERSON)
    text = sdk.completions.create(prompt="Who?", extra_body={"response_format": fmt},
                                  **kw).choices[0].text
    jsonschema.validate(json.loads(text), PERSON)
    parsed = sdk.chat.completions.parse(messages=messages, response_format=Person, seed=1,
                                        **kw).choices[0].message.parsed
    assert isinstance(parsed, Person)
    anything = sdk.chat.completions.create(messages=messages, seed=2, **kw,
                                           response_format={"type": "json_object"})
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_generate_takes_sglang_regex_json_schema_and_ebnf(client):
    for sp, check in [({"regex": r"[0-9]{2}:[0-9]{2} (am|pm)"},
                       lambda t: re.fullmatch(r"[0-9]{2}:[0-9]{2} (am|pm)", t)),
                      ({"ebnf": 'root ::= "at " hour ":00"\nhour ::= [1-9] | "1" [0-2]'},
                       lambda t: re.fullmatch(r"at ([1-9]|1[0-2]):00", t)),
                      ({"json_schema": json.dumps(PERSON)},
                       lambda t: jsonschema.validate(json.loads(t), PERSON) is None)]:
        r = post(client, GEN, {"text": "when?", "sampling_params": {
            "max_new_tokens": 200, "temperature": 1.0, "seed": 5, **sp}})
        assert r.status_code == 200, r.text
        assert check(r.json()["text"]), r.json()["text"]
        assert r.json()["meta_info"]["finish_reason"] == "stop"


@pytest.mark.parametrize("path, field, value, param", [
    (CHAT, "response_format", {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "frobnicate"}}}, "response_format"),
    (CHAT, "response_format", {"type": "json_schema"}, "response_format"),
    (CHAT, "response_format", {"type": "yaml"}, "response_format.type"),
    (C, "response_format", {"type": "json_object", "json_schema": {"name": "x", "schema": {}}},
     "response_format"),
    (GEN, "sampling_params.regex", "a(b", "sampling_params.regex"),
    (GEN, "sampling_params.json_schema", "{oops", "sampling_params.json_schema"),
    (GEN, "sampling_params.ebnf", "root ::= hour", "sampling_params.ebnf")])
def test_bad_structured_output_is_named(client, path, field, value, param):
    r = post(client, path, body_with(path, field, value))
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


def test_forced_tool_calls_through_the_official_client(client):
    """A named function and "required" (whole, streamed, one call without parallel tool
    calls): the tiny model's calls name given tools and their arguments validate."""
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Weather?"}],
              tools=[WEATHER, TIME], max_tokens=200, temperature=1.0)
    out = sdk.chat.completions.create(
        tool_choice={"type": "function", "function": {"name": "get_time"}}, seed=1,
        **kw).choices[0]
    assert out.finish_reason == "stop" and out.message.content is None
    [named] = out.message.tool_calls
    assert named.type == "function" and named.function.name == "get_time"
    jsonschema.validate(json.loads(named.function.arguments), params["get_time"])
    for seed, parallel in [(2, True), (3, True), (4, False)]:
        out = sdk.chat.completions.create(tool_choice="required", seed=seed,
                                          parallel_tool_calls=parallel, **kw).choices[0]
        assert out.finish_reason == "tool_calls" and out.message.tool_calls
        assert parallel or len(out.message.tool_calls) == 1
        for c in out.message.tool_calls:
            jsonschema.validate(json.loads(c.function.arguments), params[c.function.name])
    chunks = [c.choices[0] for c in sdk.chat.completions.create(
        tool_choice="required", seed=2, stream=True, **kw) if c.choices]
    [last] = [c for c in chunks if c.delta.tool_calls]
    assert last.finish_reason == "tool_calls"
    whole = sdk.chat.completions.create(tool_choice="required", seed=2, **kw).choices[0]
    assert [(c.function.name, c.function.arguments) for c in last.delta.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    # "auto" with a template that renders no tools (the tiny model's): the model's text.
    auto = sdk.chat.completions.create(seed=1, **kw).choices[0]
    assert auto.message.tool_calls is None and auto.message.content


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"functions": [WEATHER["function"]]}, "functions")])
def test_bad_tool_requests_are_named(client, fields, param):
    r = post(client, CHAT, {**BASE[CHAT], **fields})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_generate_takes_n(client):
    """n choices: a list of answers with their index, each drawn with seed + index (so
    choice 1 of seed 5 is choice 0 of seed 6); streamed, every event names its choice."""
    def gen(n, seed, stream=False):
        return post(client, GEN, {"input_ids": [5, 6], "stream": stream, "sampling_params": {
            "max_new_tokens": 6, "temperature": 1.0, "seed": seed, "n": n, "ignore_eos": True}})
    answers = gen(3, 5).json()
    assert [a["index"] for a in answers] == [0, 1, 2]
    assert answers[1]["output_ids"] == gen(1, 6).json()["output_ids"]
    assert len({tuple(a["output_ids"]) for a in answers}) > 1
    events = [json.loads(line[6:]) for line in gen(2, 5, stream=True).text.splitlines()
              if line.startswith("data: {")]
    last = {e["index"]: e for e in events}
    assert [last[i]["output_ids"] for i in (0, 1)] == [a["output_ids"] for a in answers[:2]]
    r = post(client, GEN, {"input_ids": [5], "sampling_params": {"n": 9}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.n"
