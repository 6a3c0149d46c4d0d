"""Results in vLLM's shape: RequestOutput.outputs[i].text / .token_ids / .finish_reason / .logprobs."""
from __future__ import annotations

from dataclasses import dataclass, field

from fp8lm.engine.sequence import Logprob


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None      # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict = field(default_factory=dict)

    def add(self, newer: RequestOutput) -> None:
        """Folds the request's next DELTA output into this one (for a consumer that fell behind, or
        one that wants the whole result): texts, tokens and logprobs are joined per choice."""
        mine = {o.index: o for o in self.outputs}
        for o in newer.outputs:
            old = mine.get(o.index)
            if old is None:
                self.outputs.append(o)
                continue
            old.text += o.text
            old.token_ids.extend(o.token_ids)            # a delta's lists are its own
            if old.logprobs is not None and o.logprobs is not None:
                old.logprobs.extend(o.logprobs)
            old.cumulative_logprob, old.finish_reason, old.stop_reason = (
                o.cumulative_logprob, o.finish_reason, o.stop_reason)
        self.outputs.sort(key=lambda o: o.index)
        self.prompt_logprobs = self.prompt_logprobs if newer.prompt_logprobs is None else newer.prompt_logprobs
        self.finished, self.metrics = newer.finished, newer.metrics
