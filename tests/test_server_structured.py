"""Structured outputs and tool calls through the real server and the official openai client: replies
validated by jsonschema and by the client's own parsing; unsupported fields refused by name."""
import asyncio
import json

import httpx
import jsonschema
import openai
import pytest

from server_util import running_server

MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
                                                                         "additionalProperties": False}}}
HERMES_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}</tool_call>'


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(str(tiny_model), "--served-model-name", MODEL, "--max-model-len", "256",
                        "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=60)


def chat(client, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=200, **kw)


def streamed_calls(stream) -> tuple[str, list[dict], str]:
    """Content, tool calls (assembled from their deltas by index) and finish reason of a stream."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = call.id or entry["id"]
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice_calls_an_offered_tool_with_valid_arguments(client, parallel):
    tools = [WEATHER, CLOCK]
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    r = chat(client, tools=tools, tool_choice="required", parallel_tool_calls=parallel, temperature=1.0, seed=3)
    choice = r.choices[0]
    assert choice.message.tool_calls
    # One call is bounded (short arguments): it must end. Parallel calls need not (a random model
    # may keep adding calls); the complete ones are still calls.
    assert choice.finish_reason == "tool_calls" if not parallel else choice.finish_reason in ("tool_calls", "length")
    assert parallel or len(choice.message.tool_calls) == 1
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])
        assert call.id and call.type == "function"
    content, calls, finish = streamed_calls(chat(client, tools=tools, tool_choice="required", temperature=1.0,
                                                 seed=3, parallel_tool_calls=parallel, stream=True))
    assert finish == choice.finish_reason and not content
    assert [(c["name"], c["arguments"]) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]


def test_named_tool_choice_gives_that_function_s_arguments(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = chat(client, tools=[WEATHER, CLOCK], tool_choice=named, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    _, calls, _ = streamed_calls(chat(client, tools=[WEATHER, CLOCK], tool_choice=named, temperature=0, stream=True))
    assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", call.function.arguments)]


def test_auto_tool_choice_parses_hermes_calls(client):
    """The reply is pinned by a regex (a random model never writes a call on its own); the hermes
    parser must turn it into a call, streamed or not, and leave the text before it as content."""
    reply = "Let me look." + HERMES_CALL
    extra = {"structured_outputs": {"regex": json.dumps(reply)[1:-1].replace("{", "\\{").replace("}", "\\}")
                                    .replace(".", "\\.")}}
    r = chat(client, tools=[WEATHER], tool_choice="auto", temperature=0, extra_body=extra)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("get_weather", {"city": "Oslo", "unit": "C"})]
    content, calls, finish = streamed_calls(chat(client, tools=[WEATHER], temperature=0, extra_body=extra,
                                                 stream=True))
    assert (content, finish) == ("Let me look.", "tool_calls")
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Oslo", "unit": "C"})]
    plain = chat(client, tools=[WEATHER], tool_choice="none", temperature=0, extra_body=extra)
    assert plain.choices[0].message.content == reply and not plain.choices[0].message.tool_calls


def test_tool_messages_go_through_the_chat_template(client):
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "C"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                       max_tokens=3)
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
def test_response_format_replies_validate_streamed_or_not(client, kind):
    schema = WEATHER["function"]["parameters"]
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}} if kind == "json_schema" \
        else {"type": "json_object"}
    for seed in range(3):
        r = chat(client, response_format=fmt, temperature=1.0, seed=seed)
        if kind == "json_object" and r.choices[0].finish_reason == "length":
            continue                       # unbounded: a random model may not close the object in time
        data = json.loads(r.choices[0].message.content)
        if kind == "json_schema":
            jsonschema.validate(data, schema)
        assert isinstance(data, dict)
    if kind == "json_schema":
        stream = chat(client, response_format=fmt, temperature=1.0, seed=0, stream=True)
        content, _, finish = streamed_calls(stream)
        assert finish == "stop" and content == r.choices[0].message.content if seed == 0 else True
        jsonschema.validate(json.loads(content), schema)


@pytest.mark.parametrize("field", ["guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                   "structured_outputs"])
def test_vllm_constraint_fields(server, field):
    value = {"guided_json": {"type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"],
                             "additionalProperties": False},
             "guided_regex": "[ab]{3}", "guided_choice": ["left", "right"], "guided_grammar": 'root ::= "x" [0-9]',
             "structured_outputs": {"choice": ["up", "down"]}}[field]
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "go", field: value, "max_tokens": 30},
                   timeout=30)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    if field == "guided_json":
        assert json.loads(text) in ({"k": 1}, {"k": 2})
    else:
        import re
        pattern = {"guided_regex": "[ab]{3}", "guided_choice": "left|right", "guided_grammar": "x[0-9]",
                   "structured_outputs": "up|down"}[field]
        assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("endpoint,body,param", [
    ("completions", {"suffix": "tail"}, "suffix"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"use_beam_search": True}, "use_beam_search"),
    ("completions", {"logit_bias": {"5": 500}}, "logit_bias"),
    ("completions", {"logit_bias": {"five": 1}}, "logit_bias"),
    ("completions", {"guided_regex": "("}, "structured_outputs"),
    ("completions", {"guided_json": {"type": "nonsense"}}, "structured_outputs"),
    ("completions", {"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ("completions", {"guided_decoding_backend": "outlines", "guided_regex": "a"}, "guided_decoding_backend"),
    ("chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    ("chat/completions", {"tools": [WEATHER], "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ("chat/completions", {"audio": {"voice": "alloy"}}, "audio"),
])
def test_unsupported_or_invalid_fields_are_400_naming_them(server, endpoint, body, param):
    base = {"prompt": "x"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{server.base_url}/v1/{endpoint}", json={**base, **body, "max_tokens": 4}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    ok = httpx.post(f"{server.base_url}/v1/{endpoint}", json={**base, "suffix": None, "best_of": 1, "max_tokens": 2},
                    timeout=30)
    assert ok.status_code == 200, ok.text                     # null / no-op values ask for nothing


def test_auto_tool_choice_needs_the_server_flags(tiny_model):
    with running_server(str(tiny_model), "--max-model-len", "64") as proc:
        r = httpx.post(f"{proc.base_url}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]})
        assert r.status_code == 400 and "--enable-auto-tool-choice" in r.json()["error"]["message"]


def test_an_error_mid_stream_ends_with_an_error_event_and_done():
    from fp8lm.entrypoints.openai.serving import with_error_event
    from fp8lm.errors import EngineDeadError

    async def events():
        yield "data: {}\n\n"
        raise EngineDeadError("a model step failed")

    async def collect():
        return [e async for e in with_error_event(events())]

    out = asyncio.run(collect())
    assert out[0] == "data: {}\n\n" and out[-1] == "data: [DONE]\n\n"
    error = json.loads(out[1].removeprefix("data: "))["error"]
    assert error["code"] == 503 and "a model step failed" in error["message"]


@pytest.mark.slow
def test_smollm2_structured_replies_and_tool_calls(smollm2):
    """The real model: the openai client's own parsing of a json_schema reply into a pydantic model
    (strict schema, as `parse` sends it), and a required tool choice. SmolLM2's chat template does not
    render tools, so the model never sees them; with parallel calls allowed it measured calling `now`
    until max_tokens ran out — a model that knows no better, which the grammar keeps valid. One call."""
    from pydantic import BaseModel

    class Capital(BaseModel):
        country: str
        capital: str
        in_europe: bool

    with running_server(str(smollm2), "--max-model-len", "1024", "--served-model-name", "smol") as proc:
        client = openai.OpenAI(base_url=f"{proc.base_url}/v1", api_key="x", max_retries=0, timeout=300)
        ask = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
        parsed = client.chat.completions.parse(model="smol", messages=ask, response_format=Capital, temperature=0,
                                               max_tokens=60)
        answer = parsed.choices[0].message.parsed
        assert isinstance(answer, Capital) and "Paris" in answer.capital, parsed.choices[0].message.content
        weather = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]
        r = client.chat.completions.create(model="smol", messages=weather, tools=[WEATHER, CLOCK],
                                           tool_choice="required", parallel_tool_calls=False, temperature=0,
                                           max_tokens=120)
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls
        for call in calls:
            assert call.function.name in ("get_weather", "now")
            params = (WEATHER if call.function.name == "get_weather" else CLOCK)["function"]["parameters"]
            jsonschema.validate(json.loads(call.function.arguments), params)
        print("calls:", [(c.function.name, c.function.arguments) for c in calls])
