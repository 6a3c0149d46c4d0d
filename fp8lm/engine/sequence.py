"""A sequence being generated, as the scheduler and the model runner see it: its tokens, its
blocks and how far they are computed. What its outputs need (text, logprobs, grammar) lives in
the output processor (engine/output_processor.py)."""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from fp8lm.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


class Sequence:
    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, generator: torch.Generator | None):
        self.seq_id, self.request_id, self.index = seq_id, request_id, index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0           # tokens whose K/V are in the cache
        self.num_cached_tokens = 0             # of those, found in the prefix cache at admission
        self.block_keys: list[bytes] = []      # prefix-cache keys of its first full blocks (BlockManager._keys)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason, self.stop_reason = reason, stop_reason


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    arrival_time: float = 0.0                      # time.monotonic() when added
    first_scheduled_time: float | None = None      # when a step first ran one of its sequences

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
