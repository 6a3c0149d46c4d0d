"""vLLM's /tokenize and /detokenize: the server's own tokenizer (and chat template) on demand."""
from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from fp8lm.engine.sampling_params import SamplingParamsError
from fp8lm.entrypoints.openai.chat_routes import render_chat
from fp8lm.entrypoints.openai.protocol import ChatMessage
from fp8lm.entrypoints.openai.serving import APIError, ServingState


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def add_tokenize_routes(app: FastAPI, state: ServingState) -> None:
    def tokenizer(model: str | None):
        state.check_model(model)
        tok = state.engine.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer")
        return tok

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        tokenizer(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            _, ids = await render_chat(state, state.engine.engine.tokenizer, [m.for_template() for m in body.messages],
                                       body.add_generation_prompt)
        else:
            try:
                ids = await state.engine.off_loop(state.engine.engine.tokenize, body.prompt, body.add_special_tokens)
            except SamplingParamsError as e:
                raise APIError(400, str(e), param="prompt") from None
        return {"count": len(ids), "max_model_len": state.engine.engine.max_model_len, "tokens": ids,
                "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        tok = tokenizer(body.model)
        vocab = state.engine.engine.host.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": tok.decode(body.tokens, skip_special_tokens=False)}
