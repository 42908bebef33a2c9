"""server.tools without a server: the schemas that force tool calls, and reading calls out of
text written freely under tool_choice "auto" in the Hermes / Qwen and Llama 3 formats."""

import json

import jsonschema
import pytest

from server import tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]


def test_forced_schemas():
    named = tools.forced_schema(TOOLS, {"type": "function", "function": {"name": "get_time"}},
                                True)
    assert named == TIME["function"]["parameters"]
    assert tools.forced_schema(TOOLS, "auto", True) is None
    required = tools.forced_schema(TOOLS, "required", True)
    calls = [{"name": "get_weather", "parameters": {"city": "Oslo"}},
             {"name": "get_time", "parameters": {}}]
    jsonschema.validate(calls, required)
    for bad in ([], [{"name": "get_weather", "parameters": {}}],
                [{"name": "nope", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, required)
    with pytest.raises(jsonschema.ValidationError):     # parallel_tool_calls false: one call
        jsonschema.validate(calls, tools.forced_schema(TOOLS, "required", False))
    got = tools.forced_calls(json.dumps(calls), TOOLS, "required")
    assert [c["function"]["name"] for c in got] == ["get_weather", "get_time"]
    assert json.loads(got[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert got[0]["id"].startswith("call_") and got[0]["id"] != got[1]["id"]


def test_template_formats():
    assert tools.format_of("{% for t in tools %}<tool_call>{% endfor %}") == "hermes"
    assert tools.format_of('{{ tools }} {"name": ..., "parameters": ...} <|python_tag|>') == (
        "llama3")
    assert tools.format_of("{{ messages }}") is None and tools.format_of(None) is None


def test_hermes_calls_are_read_and_anything_else_is_content():
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    content, calls = tools.parse(text, "hermes", TOOLS)
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    for plain in ("Just words.", '<tool_call>{"name": "get_weather", "arguments"</tool_call>',
                  '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>'):
        assert tools.parse(plain, "hermes", TOOLS) == (plain, [])


def test_llama3_calls_are_read_and_anything_else_is_content():
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; '
            '{"name": "get_time", "parameters": {"zone": "CET"}}')
    content, calls = tools.parse(text, "llama3", TOOLS)
    assert content is None
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Rome"},
                                                                        {"zone": "CET"}]
    for plain in ("The weather is fine.", '{"name": "get_weather"', '{"city": "Rome"}'):
        assert tools.parse(plain, "llama3", TOOLS) == (plain, [])
    assert tools.parse("anything", None, TOOLS) == ("anything", [])


def test_read_calls_keeps_a_cut_output_as_content():
    assert tools.read_calls('[{"name": "get_ti', "length", TOOLS, "required", None) == (
        '[{"name": "get_ti', [], "length")
    assert tools.read_calls('[{"name": "get_ti', "stop", TOOLS, "required", None) == (
        '[{"name": "get_ti', [], "stop")
    named = {"type": "function", "function": {"name": "get_time"}}
    content, calls, reason = tools.read_calls('{"zone": "UTC"}', "stop", TOOLS, named, None)
    assert content is None and reason == "stop" and calls[0]["function"]["name"] == "get_time"
