"""Tool calling on /v1/chat/completions. The chat template renders the tools (HF's `tools`
argument); then, by tool_choice:

- "required" or a named function: the output is forced through structured output
  (engine.guided): a named function's arguments as JSON of its `parameters` schema, or for
  "required" a JSON array of one or more {"name", "parameters"} calls of the given tools (one,
  with parallel_tool_calls false), as vLLM forces them;
- "auto": the model writes freely and its text is read for calls in its family's format, picked
  from the chat template: Hermes / Qwen 2.5+ `<tool_call>{"name", "arguments"}</tool_call>`
  blocks, or Llama 3.x JSON `{"name", "parameters"}` (after an optional `<|python_tag|>`,
  several separated by ";"). A template with neither format never yields calls under "auto";
- "none": the tools are rendered, nothing is forced or read.

Calls come back in OpenAI's shape (`message.tool_calls`, arguments as JSON text).
"""

import json
import re
import uuid

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def forced_schema(tools: list[dict], choice, parallel: bool) -> dict | None:
    """The JSON schema that forces tool_choice's calls (None under "auto" / "none")."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        return next(t["function"]["parameters"] for t in tools if t["function"]["name"] == name)
    if choice != "required":
        return None
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
              "properties": {"name": {"const": t["function"]["name"]},
                             "parameters": t["function"]["parameters"]}} for t in tools]
    return {"type": "array", "minItems": 1, "items": {"anyOf": calls}} | (
        {} if parallel else {"maxItems": 1})


def call(name: str, arguments) -> dict:
    """One call in OpenAI's shape."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def forced_calls(text: str, tools: list[dict], choice) -> list[dict]:
    """The calls in an output that forced_schema shaped."""
    if isinstance(choice, dict):
        return [call(choice["function"]["name"], text)]
    return [call(c["name"], c["parameters"]) for c in json.loads(text)]


def format_of(template: str | None) -> str | None:
    """The tool-call format a chat template teaches its model: "hermes", "llama3" or None."""
    if not template or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "parameters" in template:
        return "llama3"
    return None


def parse(text: str, fmt: str | None, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(content, calls) of an output written freely under tool_choice "auto": calls of the
    given tools in the template's format; text that holds none is all content."""
    names = {t["function"]["name"] for t in tools}
    found = []
    if fmt == "hermes":
        for block in HERMES_CALL.findall(text):
            found.append(_loads(block, "arguments"))
        content = text.split("<tool_call>", 1)[0].strip() or None
    elif fmt == "llama3":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if body.startswith("{"):
            found = [_loads(part, "parameters") for part in body.split(";") if part.strip()]
        content = None
    else:
        return text, []
    if not found or any(c is None or c[0] not in names for c in found):
        return text, []          # not a well-formed call of a given tool: the model's text
    return content, [call(name, args) for name, args in found]


def _loads(text: str, key: str) -> tuple[str, object] | None:
    """(name, arguments) of one call's JSON, or None if it is not one."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    return (obj["name"], args) if isinstance(args, (dict, str)) else None


def read_calls(text: str, reason: str, tools: list[dict], forced,
               fmt: str | None) -> tuple[str | None, list[dict], str]:
    """(content, calls, finish reason) of a choice's whole output: its calls when it ended
    ("stop") as a forced or parsed call does ("stop" for a named function, as OpenAI; else
    "tool_calls"); else all of it as content, with its own reason (cut at max_tokens, say)."""
    if reason != "stop":
        return text, [], reason
    if forced is None:
        content, calls = parse(text, fmt, tools)
        return content, calls, "tool_calls" if calls else reason
    try:
        calls = forced_calls(text, tools, forced)
    except (ValueError, KeyError, TypeError):   # a stop string cut the JSON short, say
        return text, [], reason
    return None, calls, "stop" if isinstance(forced, dict) else "tool_calls"
