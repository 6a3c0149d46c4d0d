"""Tool calls out of generated text. Every parser reads the text so far and returns the content
that is safe to show and the calls that are complete, so streaming and non-streaming share it:
a stream sends what is new since its last look.

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2.5/3).
- `llama3_json`: the whole reply is `{"name": ..., "parameters": {...}}` objects separated by `;`,
  optionally after `<|python_tag|>` (Llama 3.1/3.2).
- forced choices: `required` generates a JSON array of {"name", "parameters"} under a grammar
  (`required_schema`); a named choice generates the function's arguments alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass
class Extraction:
    content: str = ""                                                    # safe to show so far
    calls: list[tuple[str, str]] = field(default_factory=list)          # (name, arguments as JSON text)


def hermes(text: str, final: bool) -> Extraction:
    content, calls, rest = [], [], text
    while True:
        start = rest.find(HERMES_OPEN)
        if start < 0:
            content.append(rest if final else rest[:len(rest) - _partial_suffix(rest, HERMES_OPEN)])
            break
        content.append(rest[:start])
        end = rest.find(HERMES_CLOSE, start)
        if end < 0:
            if final:       # an unclosed block: the model stopped mid-call; it is text, not a call
                content.append(rest[start:])
            break
        call = _call(rest[start + len(HERMES_OPEN):end], "arguments")
        if call is None:
            content.append(rest[start:end + len(HERMES_CLOSE)])
        else:
            calls.append(call)
        rest = rest[end + len(HERMES_CLOSE):]
    return Extraction("".join(content), calls)


def llama3_json(text: str, final: bool) -> Extraction:
    body = text.lstrip()
    tagged = body.startswith(PYTHON_TAG)
    if tagged:
        body = body[len(PYTHON_TAG):].lstrip()
    if not final and (not body or (not tagged and PYTHON_TAG.startswith(body))):
        return Extraction()                  # too early to tell a call from text
    if not body.startswith("{"):
        return Extraction(text)
    calls, rest, decoder = [], body, json.JSONDecoder()
    while rest:
        try:
            obj, end = decoder.raw_decode(rest)
        except ValueError:
            break                            # incomplete (streaming) or not JSON
        call = _call_object(obj, "parameters")
        if call is None:
            break
        calls.append(call)
        rest = rest[end:].lstrip().removeprefix(";").lstrip()
    if not calls:
        return Extraction(text if final else "")
    return Extraction(rest if final else "", calls)     # what follows the calls, once nothing more can come


def forced_required(text: str, final: bool) -> Extraction:
    """The JSON array `required_schema` constrains the reply to; each element once complete."""
    calls, decoder = [], json.JSONDecoder()
    rest = text.lstrip().removeprefix("[")
    while True:
        rest = rest.lstrip().removeprefix(",").lstrip()
        try:
            obj, end = decoder.raw_decode(rest)
        except ValueError:
            break
        call = _call_object(obj, "parameters")
        if call is not None:
            calls.append(call)
        rest = rest[end:]
    return Extraction("", calls)


def forced_named(name: str):
    def parse(text: str, final: bool) -> Extraction:
        return Extraction("", [(name, text)] if final else [])
    return parse


TOOL_PARSERS = {"hermes": hermes, "llama3_json": llama3_json}


def required_schema(tools: list[dict], parallel: bool) -> dict:
    """One or more calls of the offered functions, each with arguments valid for its parameters."""
    one_of = [{"type": "object", "properties": {"name": {"const": t["name"]},
                                                "parameters": t.get("parameters") or {"type": "object"}},
               "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _call(text: str, arguments_key: str) -> tuple[str, str] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return _call_object(obj, arguments_key)


def _call_object(obj, arguments_key: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of {"name": ..., arguments_key or the other spelling: {...}}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    other = "arguments" if arguments_key == "parameters" else "parameters"
    arguments = obj.get(arguments_key, obj.get(other, {}))
    if isinstance(arguments, str):         # some models write the arguments as a JSON string
        return obj["name"], arguments
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that could begin `tag` (held back while streaming)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
