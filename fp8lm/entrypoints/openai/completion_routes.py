"""/v1/completions: text and token-id prompts, echo and scoring (lm-eval's loglikelihood), streaming."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request

from fp8lm.engine.outputs import RequestOutput
from fp8lm.entrypoints.openai.protocol import CompletionRequest
from fp8lm.entrypoints.openai.serving import (APIError, ServingState, Usage, chunk, merge, sse, token_text,
                                              unless_disconnected, usage)


async def completions(state: ServingState, body: CompletionRequest, request: Request):
    state.check_request(body)
    prompts = _prompt_list(body.prompt)
    scoring = body.max_tokens == 0      # echo's prompt logprobs only: one token is run and dropped
    if scoring and not body.echo:
        raise APIError(400, "max_tokens: 0 is only allowed with echo (scoring the prompt)", param="max_tokens")
    if scoring and body.stream:
        raise APIError(400, "max_tokens: 0 is not supported with stream", param="max_tokens")
    echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
    wanted = [k for k in (echo_lp, body.prompt_logprobs) if k is not None]
    params = state.sampling_params(body, 1 if scoring else body.max_tokens, body.logprobs,
                                   max(wanted) if wanted else None, state.constraint(body))
    base_id = f"cmpl-{uuid.uuid4().hex}"
    started = await unless_disconnected(request, state.start(prompts, params, base_id,
                                                             add_special_tokens=body.add_special_tokens))
    tok = state.engine.engine.tokenizer
    if body.stream:
        return sse(_stream(state, started, body, base_id, tok))
    finals = await state.finish(started, request)
    choices = []
    for p_index, out in enumerate(finals):
        for o in out.outputs:
            prefix = (out.prompt or "") if body.echo else ""
            entries, token_ids = _echoed(out, o, scoring) if body.echo else (o.logprobs, o.token_ids)
            choice = {"index": p_index * body.n + o.index, "text": prefix + ("" if scoring else o.text),
                      "logprobs": completion_logprobs(entries, token_ids, tok) if body.logprobs is not None else None,
                      "finish_reason": "length" if scoring else o.finish_reason,
                      "stop_reason": None if scoring else o.stop_reason}
            if body.prompt_logprobs is not None:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(out.prompt_logprobs)
            choices.append(choice)
    return {"id": base_id, "object": "text_completion", "created": int(time.time()), "model": state.model_name,
            "choices": choices, "usage": usage(finals)}


async def _stream(state: ServingState, started, body, base_id: str, tok) -> AsyncIterator[str]:
    """Each delta becomes a chunk: text, the new tokens' logprobs (a token may add no text yet),
    the finish reason; the prompt goes out with a choice's first chunk (echo)."""
    created = int(time.time())
    echoed: set[int] = set()
    counts = Usage()
    async for p_index, out in merge(started):
        counts.add(out)
        for o in out.outputs:
            index = p_index * body.n + o.index
            echo_now = body.echo and index not in echoed
            echoed.add(index)
            lp = None
            if body.logprobs is not None and o.logprobs is not None:
                entries, tokens = o.logprobs, o.token_ids
                if echo_now:
                    entries, tokens = (out.prompt_logprobs or []) + entries, out.prompt_token_ids + tokens
                lp = completion_logprobs(entries, tokens, tok)
            if not (o.text or echo_now or o.finish_reason or lp):
                continue
            text = ((out.prompt or "") if echo_now else "") + o.text
            yield chunk({"id": base_id, "object": "text_completion", "created": created,
                         "model": state.model_name,
                         "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": o.finish_reason}]})
    if body.stream_options and body.stream_options.include_usage:
        yield chunk({"id": base_id, "object": "text_completion", "created": created,
                     "model": state.model_name, "choices": [], "usage": counts.as_dict()})
    yield "data: [DONE]\n\n"


def _prompt_list(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    if any(isinstance(p, list) and not p for p in prompt):
        raise APIError(400, "prompt: token lists must not be empty", param="prompt")
    return list(prompt)


def completion_logprobs(entries, token_ids, tok) -> dict:
    """OpenAI's completion logprobs; an entry None (the first prompt token, which nothing predicts)
    gives null logprobs, as OpenAI and vLLM answer for echo."""
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    for token, entry in zip(token_ids, entries or []):
        text = token_text(tok, token)
        tokens.append(text)
        token_lps.append(None if entry is None else entry[token].logprob)
        tops.append(None if entry is None else {token_text(tok, t): lp.logprob for t, lp in entry.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def vllm_prompt_logprobs(entries) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token, null (the first) or {token id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in entries]


def _echoed(out: RequestOutput, o, scoring_only: bool) -> tuple[list, list[int]]:
    """Logprob entries and token ids of the prompt followed by the completion (echo); with
    max_tokens 0 (scoring) the prompt alone."""
    generated = ([], []) if scoring_only else (o.logprobs or [], o.token_ids)
    return (out.prompt_logprobs or []) + generated[0], out.prompt_token_ids + generated[1]
