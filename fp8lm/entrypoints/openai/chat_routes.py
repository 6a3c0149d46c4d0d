"""/v1/chat/completions: the chat template, tool calling (parsed or grammar-forced), streaming."""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request

from fp8lm.engine.sampling_params import StructuredOutputsParams
from fp8lm.entrypoints.openai.completion_routes import vllm_prompt_logprobs
from fp8lm.entrypoints.openai.protocol import ChatCompletionRequest, NamedToolChoice
from fp8lm.entrypoints.openai.serving import (APIError, ServingState, Usage, chunk, merge, sse, token_text,
                                              unless_disconnected, usage)
from fp8lm.entrypoints.openai.tool_parsers import (TOOL_PARSERS, Extraction, forced_named, forced_required,
                                                   required_schema)


MAX_TOOLS_CHARS = 65_536


@dataclass
class ToolSettings:
    """The server's `--enable-auto-tool-choice` and `--tool-call-parser`."""
    auto: bool = False
    parser: str | None = None


async def chat(state: ServingState, tools_cfg: ToolSettings, body: ChatCompletionRequest, request: Request):
    state.check_request(body)
    tok = state.engine.engine.tokenizer
    if tok is None:
        raise APIError(400, "this model has no tokenizer, so it has no chat template", param="messages")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    tools = [t.function.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    if tools and len(json.dumps(tools)) > MAX_TOOLS_CHARS:
        raise APIError(400, f"tools: their definitions hold more than {MAX_TOOLS_CHARS} characters", param="tools")
    parser, constraint = _tool_mode(body, tools, tools_cfg, state.constraint(body))
    text, ids = await render_chat(state, tok, [m.for_template() for m in body.messages], body.add_generation_prompt,
                                  tools)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = state.sampling_params(body, body.max_completion_tokens or body.max_tokens, logprobs,
                                   body.prompt_logprobs, constraint)
    base_id = f"chatcmpl-{uuid.uuid4().hex}"
    started = await unless_disconnected(request, state.start([ids], params, base_id, prompt_text=text))
    if body.stream:
        return sse(_stream(state, started, body, base_id, tok, parser))
    out = (await state.finish(started, request))[0]
    choices = []
    for o in out.outputs:
        message, finish = {"role": "assistant", "content": o.text}, o.finish_reason
        if parser is not None:
            found = parser(o.text, True)
            if found.calls:
                message = {"role": "assistant", "content": found.content or None,
                           "tool_calls": [_tool_call(name, args) for name, args in found.calls]}
                finish = "tool_calls" if finish == "stop" else finish
        choices.append({"index": o.index, "message": message, "finish_reason": finish, "stop_reason": o.stop_reason,
                        "logprobs": _chat_logprobs(o.logprobs, o.token_ids, tok, body.top_logprobs or 0)
                        if body.logprobs else None})
    response = {"id": base_id, "object": "chat.completion", "created": int(time.time()), "model": state.model_name,
                "choices": choices, "usage": usage([out])}
    if body.prompt_logprobs is not None:
        response["prompt_logprobs"] = vllm_prompt_logprobs(out.prompt_logprobs)
    return response


async def render_chat(state: ServingState, tok, messages: list[dict], add_generation_prompt: bool,
                      tools: list[dict] | None = None) -> tuple[str, list[int]]:
    """The conversation through the chat template, and its token ids, off the event loop."""
    try:
        return await state.engine.off_loop(tok.encode_chat, messages, add_generation_prompt, tools,
                                           state.limits.chat_special_tokens)
    except (UnicodeError, ValueError, TypeError) as e:
        raise APIError(400, f"messages: cannot be tokenized ({type(e).__name__})", param="messages") from None
    except Exception as e:  # jinja errors (e.g. roles that must alternate) are the client's
        raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages") from None


def _tool_mode(body: ChatCompletionRequest, tools: list[dict] | None, cfg: ToolSettings,
               constraint: StructuredOutputsParams | None) -> tuple[Callable | None, StructuredOutputsParams | None]:
    """(the parser that reads calls out of the reply, the output constraint) for the request's tool choice."""
    choice = body.tool_choice or ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    forced = None
    if isinstance(choice, NamedToolChoice):
        offered = {t["name"]: t for t in tools}
        if choice.function.name not in offered:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools "
                                f"({', '.join(offered)})", param="tool_choice")
        parameters = offered[choice.function.name].get("parameters") or {"type": "object"}
        forced = forced_named(choice.function.name), StructuredOutputsParams(json=parameters)
    elif choice == "required":
        forced = forced_required, StructuredOutputsParams(json=required_schema(tools, body.parallel_tool_calls))
    if forced is not None:
        if constraint is not None:
            raise APIError(400, "a forced tool choice cannot be combined with another output constraint",
                           param="tool_choice")
        return forced
    if choice == "auto":
        if not (cfg.auto and cfg.parser):
            raise APIError(400, '"auto" tool choice requires the server to run with --enable-auto-tool-choice and '
                                '--tool-call-parser', param="tool_choice")
        return TOOL_PARSERS[cfg.parser], constraint
    return None, constraint


def _tool_call(name: str, arguments: str) -> dict:
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


@dataclass
class _ChoiceStream:
    text: str = ""                                             # the reply so far
    content_sent: int = 0
    calls: list = field(default_factory=list)                  # the tool calls sent, with their ids
    token_ids: list[int] = field(default_factory=list)         # tokens (and logprobs) not sent yet
    logprobs: list = field(default_factory=list)


async def _stream(state: ServingState, started, body, base_id, tok, parser) -> AsyncIterator[str]:
    head = {"id": base_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": state.model_name}
    streams: dict[int, _ChoiceStream] = {}
    counts = Usage()
    async for _, out in merge(started):
        counts.add(out)
        for o in out.outputs:
            if o.index not in streams:
                streams[o.index] = _ChoiceStream()
                yield chunk({**head, "choices": [{"index": o.index, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
            s = streams[o.index]
            s.token_ids += o.token_ids
            s.logprobs += o.logprobs or []
            done = o.finish_reason is not None
            delta = _delta(s, o.text, done, parser)
            if not delta and not done:
                continue
            lp = _chat_logprobs(s.logprobs, s.token_ids, tok, body.top_logprobs or 0) \
                if body.logprobs and o.logprobs is not None else None
            s.token_ids, s.logprobs = [], []
            finish = "tool_calls" if o.finish_reason == "stop" and s.calls else o.finish_reason
            yield chunk({**head, "choices": [{"index": o.index, "delta": delta, "logprobs": lp,
                                              "finish_reason": finish}]})
    if body.stream_options and body.stream_options.include_usage:
        yield chunk({**head, "choices": [], "usage": counts.as_dict()})
    yield "data: [DONE]\n\n"


def _delta(s: _ChoiceStream, new_text: str, done: bool, parser) -> dict:
    """What is new in this choice's reply: content, and (with a parser) each tool call once complete."""
    s.text += new_text
    found = parser(s.text, done) if parser is not None else Extraction(s.text)
    out: dict = {}
    if len(found.content) > s.content_sent:
        out["content"] = found.content[s.content_sent:]
        s.content_sent = len(found.content)
    new_calls = found.calls[len(s.calls):]
    if new_calls:
        out["tool_calls"] = []
        for name, args in new_calls:
            call = _tool_call(name, args)
            s.calls.append(call)
            out["tool_calls"].append({"index": len(s.calls) - 1, **call})
    return out


def _chat_logprobs(entries, token_ids, tok, top: int) -> dict:
    content = []
    for token, entry in zip(token_ids, entries or []):
        text = token_text(tok, token)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top]
        content.append({"token": text, "logprob": entry[token].logprob, "bytes": list(text.encode("utf-8", "replace")),
                        "top_logprobs": [{"token": token_text(tok, t), "logprob": lp.logprob,
                                          "bytes": list(token_text(tok, t).encode("utf-8", "replace"))}
                                         for t, lp in ranked]})
    return {"content": content}
