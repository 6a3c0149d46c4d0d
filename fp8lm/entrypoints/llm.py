"""The offline API, shaped like vLLM's: LLM(model, ...).generate(prompts, sampling_params)."""
from __future__ import annotations

import atexit
import dataclasses
import itertools
import logging
import weakref
from collections.abc import Sequence as Seq

from tqdm import tqdm

from fp8lm.engine.config import ENGINE_OPTIONS, EngineConfig
from fp8lm.engine.llm_engine import LLMEngine
from fp8lm.engine.outputs import RequestOutput
from fp8lm.engine.sampling_params import RequestOutputKind, SamplingParams

Prompt = str | list[int] | dict


class LLM:
    def __init__(self, model: str, **options):
        """`options`: the engine's, as EngineConfig defines them (dtype, max_model_len, quantization,
        kv_cache_dtype, tensor_parallel_size, ...), as vLLM's LLM takes its engine arguments."""
        unsupported = sorted(set(options) - set(ENGINE_OPTIONS))
        if unsupported:
            raise TypeError(f"LLM() got unsupported options: {', '.join(unsupported)}")
        self.engine = LLMEngine(EngineConfig(model=model, **options))
        self._request_ids = itertools.count()
        if self.engine.host.measurement is not None:
            # INC writes its measurements at interpreter exit too; so does fp8lm.
            atexit.register(_finalize_at_exit, weakref.ref(self))

    def finalize_calibration(self) -> list:
        """Writes the MEASURE-mode files now (also done at interpreter exit); returns their paths."""
        return self.engine.finalize_calibration()

    def get_tokenizer(self):
        """The transformers tokenizer of the model folder (None without tokenizer files), as vLLM returns."""
        return None if self.engine.tokenizer is None else self.engine.tokenizer.hf

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, {"prompt_token_ids": [...]}, or a list of those."""
        prompts = _as_prompt_list(prompts)
        # Only the final outputs are returned, so the engine builds no others (as vLLM's LLM does).
        params = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
                  for p in _as_params_list(sampling_params, len(prompts))]
        ids = []
        try:
            for (text, prompt), p in zip(prompts, params):
                request_id = str(next(self._request_ids))
                self.engine.add_request(request_id, prompt, p, prompt_text=text)
                ids.append(request_id)
            return self._run(ids, use_tqdm)
        finally:
            for request_id in ids:
                self.engine.abort_request(request_id)  # no-op for finished ones; frees blocks on error

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        rendered = [tokenizer.encode_chat(c, add_generation_prompt) for c in conversations]
        prompts = [{"prompt_token_ids": ids, "prompt": text} for text, ids in rendered]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        with tqdm(total=len(request_ids), desc="generating", disable=not use_tqdm) as bar:
            while len(done) < len(request_ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[r] for r in request_ids]


def _finalize_at_exit(ref) -> None:
    llm = ref()
    if llm is not None and llm.engine.host.measurement is not None:
        try:
            llm.finalize_calibration()
        except Exception as e:  # at exit there is no caller left to raise to
            logging.getLogger(__name__).error("could not write measurements at exit: %s", e)


def _as_prompt_list(prompts) -> list[tuple[str | None, str | list[int]]]:
    """(text shown in the output or None, what is tokenized or the token ids) per prompt."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    result = []
    for p in prompts:
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                result.append((p.get("prompt"), list(p["prompt_token_ids"])))
            elif "prompt" in p:
                result.append((None, p["prompt"]))
            else:
                raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        else:
            result.append((None, p))
    return result


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling_params for {n} prompts")
    return params
