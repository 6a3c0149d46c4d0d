"""Tool-call parsers on the reply formats of the model families they are named after: whole replies,
and every prefix of them (what a stream sees), which must only ever add content and calls."""
import json

import jsonschema
import pytest

from fp8lm.entrypoints.openai.tool_parsers import (forced_named, forced_required, hermes, llama3_json,
                                                   required_schema)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}'


def streamed(parser, text):
    """The content and calls a stream would send, reading the reply one character at a time."""
    content, calls = "", []
    for end in range(1, len(text) + 1):
        found = parser(text[:end], end == len(text))
        assert found.content.startswith(content), (text[:end], found.content, content)   # only ever appended
        assert found.calls[:len(calls)] == calls
        content, calls = found.content, found.calls
    return content, calls


@pytest.mark.parametrize("text,content,calls", [
    ("Sure.", "Sure.", []),
    (f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>", "Let me check.\n",
     [("get_weather", '{"city": "Paris", "unit": "C"}')]),
    (f"<tool_call>{WEATHER}</tool_call>\n<tool_call>" + '{"name": "time", "arguments": {}}</tool_call>', "\n",
     [("get_weather", '{"city": "Paris", "unit": "C"}'), ("time", "{}")]),
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("<tool_call>" + WEATHER[:20], "<tool_call>" + WEATHER[:20], []),        # stopped mid-call: text
    ("a < b <tool", "a < b <tool", []),
])
def test_hermes(text, content, calls):
    found = hermes(text, True)
    assert (found.content, found.calls) == (content, calls)
    assert streamed(hermes, text) == (content, calls)


def test_hermes_holds_back_a_partial_tag_while_streaming():
    assert hermes("Hi <tool_c", False).content == "Hi "
    assert hermes("Hi <tool_c", True).content == "Hi <tool_c"


@pytest.mark.parametrize("text,content,calls", [
    ("The weather is fine.", "The weather is fine.", []),
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", '{"city": "Oslo"}')]),
    ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "arguments": {"x": 1}}', "",
     [("a", "{}"), ("b", '{"x": 1}')]),
    ('{"name": "a", "parameters": {}} and more', "and more", [("a", "{}")]),
    ('{"not a call": 1}', '{"not a call": 1}', []),
])
def test_llama3_json(text, content, calls):
    found = llama3_json(text, True)
    assert (found.content, found.calls) == (content, calls)
    assert streamed(llama3_json, text) == (content, calls)


def test_forced_required_reads_each_call_once_complete():
    text = '[{"name": "a", "parameters": {"q": "x"}}, {"name": "b", "parameters": {}}]'
    assert forced_required(text[:30], False).calls == []
    assert forced_required(text[:42], False).calls == [("a", '{"q": "x"}')]
    assert forced_required(text, True).calls == [("a", '{"q": "x"}'), ("b", "{}")]
    assert streamed(forced_required, text) == ("", [("a", '{"q": "x"}'), ("b", "{}")])
    assert forced_named("f")('{"q": 1}', True).calls == [("f", '{"q": 1}')]


def test_required_schema_accepts_only_offered_calls_with_valid_arguments():
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                    "required": ["city"]}}, {"name": "now"}]
    schema = required_schema(tools, parallel=False)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Oslo"}}], schema)
    jsonschema.validate([{"name": "now", "parameters": {}}], schema)
    for bad in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "other", "parameters": {}}],
                [{"name": "now", "parameters": {}}] * 2):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    jsonschema.validate([{"name": "now", "parameters": {}}] * 2, required_schema(tools, parallel=True))
    json.dumps(schema)                              # what the grammar compiler gets
