"""From sampled tokens to what a request's caller sees: text grown incrementally, logprobs, stop
conditions, and outputs that are cumulative, deltas, or final only (SamplingParams.output_kind).
Each sequence's output state (`SequenceOutput`) lives here, from `start` to `release`."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fp8lm.engine.detokenizer import IncrementalDetokenizer
from fp8lm.engine.outputs import CompletionOutput, RequestOutput
from fp8lm.engine.sampler import top_logprobs
from fp8lm.engine.sampling_params import RequestOutputKind
from fp8lm.engine.sequence import Logprob, Request, Sequence
from fp8lm.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class SequenceOutput:
    """What a sequence's outputs need beyond its tokens."""
    text: str = ""                                  # the output's text so far (cut at a stop string)
    detokenizer: IncrementalDetokenizer | None = None   # a model with a tokenizer
    logprobs: list[dict[int, Logprob]] | None = None    # SamplingParams.logprobs
    cumulative_logprob: float = 0.0
    grammar: object | None = None                   # its grammar matcher (structured outputs), fed every new token
    num_sent_tokens: int = 0                        # DELTA outputs: the tokens and text earlier outputs held
    num_sent_chars: int = 0
    prompt_logprobs: list[dict[int, Logprob]] = field(default_factory=list)   # of prompt tokens 1.., chunk by chunk


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer, self.eos_token_ids, self.max_model_len = tokenizer, eos_token_ids, max_model_len
        self.states: dict[int, SequenceOutput] = {}     # by seq_id

    def start(self, seq: Sequence, grammar=None) -> None:
        detokenizer = None if self.tokenizer is None else IncrementalDetokenizer(
            self.tokenizer, seq.params.skip_special_tokens, seq.num_prompt_tokens)
        self.states[seq.seq_id] = SequenceOutput(detokenizer=detokenizer, grammar=grammar,
                                                 logprobs=[] if seq.params.logprobs is not None else None)

    def release(self, request: Request) -> None:
        for seq in request.seqs:
            self.states.pop(seq.seq_id, None)

    def grammars(self, seqs: list[Sequence]) -> list:
        """Each sequence's grammar matcher, or None."""
        return [self.states[s.seq_id].grammar for s in seqs]

    def add_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, first: int) -> None:
        """Logits after prompt tokens first, first + 1, ..., reduced at once to the requested top-k
        logprobs of the prompt tokens they predict: no vocabulary-wide row is kept."""
        targets = seq.token_ids[first + 1:min(first + 1 + logits.shape[0], seq.num_prompt_tokens)]
        lps = torch.log_softmax(logits[:len(targets)], dim=-1)
        entries = self.states[seq.seq_id].prompt_logprobs
        for row, token in enumerate(targets):
            entry = top_logprobs(lps[row], token, seq.params.prompt_logprobs)
            self._decode_logprob_tokens(entry)
            entries.append(entry)

    def discard_prompt_logits(self, seq: Sequence) -> None:
        """A preempted sequence's prompt is computed again from the start."""
        if seq.seq_id in self.states:
            self.states[seq.seq_id].prompt_logprobs = []

    def prompt_logprobs(self, seq: Sequence) -> list[dict[int, Logprob] | None]:
        """The prompt's logprobs once all are computed (the first token has none)."""
        return [None] + self.states[seq.seq_id].prompt_logprobs

    def append_token(self, seq: Sequence, token: int, logits: torch.Tensor) -> bool:
        """Adds a sampled token; True when it finished the sequence."""
        state = self.states[seq.seq_id]
        seq.token_ids.append(token)
        if state.grammar is not None and not state.grammar.accept_token(token):
            # Only a row the sampler could not constrain (min_tokens hiding the one allowed stop) gets here.
            log.warning("request %s: token %d does not fit its grammar; finishing it", seq.request_id, token)
            state.grammar = None
            self._detokenize(seq, state, final=True)
            seq.finish("stop")
            return True
        if state.logprobs is not None:
            entry = top_logprobs(torch.log_softmax(logits, dim=-1), token, seq.params.logprobs)
            self._decode_logprob_tokens(entry)
            state.logprobs.append(entry)
            state.cumulative_logprob += entry[token].logprob
        added_from = len(state.text)
        self._detokenize(seq, state, final=self._stop_reason(seq, state, None) is not None)
        reason = self._stop_reason(seq, state, added_from)
        if reason is not None:
            seq.finish(*reason)
        return reason is not None

    @staticmethod
    def _detokenize(seq: Sequence, state: SequenceOutput, final: bool) -> None:
        if state.detokenizer is not None:
            state.text += state.detokenizer.update(seq.token_ids, final)

    def _stop_reason(self, seq: Sequence, state: SequenceOutput,
                     text_from: int | None) -> tuple[str, int | str | None] | None:
        """Why the sequence ends now, if it does. Stop strings are looked for in the text added from
        `text_from` on (None: not looked for)."""
        p, token = seq.params, seq.token_ids[-1]
        if seq.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                return "stop", token
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if p.stop_strings and text_from is not None:
                hit = self._find_stop_string(seq, state, text_from)
                if hit is not None:
                    return "stop", hit
        if state.grammar is not None and state.grammar.is_terminated():
            return "stop", None                         # the grammar is complete (ignore_eos or not)
        max_tokens = p.max_tokens or self.max_model_len
        if seq.num_output_tokens >= max_tokens or seq.num_tokens >= self.max_model_len:
            return "length", None
        return None

    @staticmethod
    def _find_stop_string(seq: Sequence, state: SequenceOutput, text_from: int) -> str | None:
        """The first stop string that ends in the text added from `text_from`; cuts the text there."""
        start = max(0, text_from - max(len(s) for s in seq.params.stop_strings) + 1)
        best = None
        for stop in seq.params.stop_strings:
            at = state.text.find(stop, start)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        state.text = state.text[: at + len(stop)] if seq.params.include_stop_str_in_output else state.text[:at]
        return stop

    def _decode_logprob_tokens(self, entry: dict[int, Logprob]) -> None:
        if self.tokenizer is not None:
            for token, lp in entry.items():
                lp.decoded_token = self.tokenizer.decode([token], skip_special_tokens=False)

    def request_output(self, request: Request) -> RequestOutput | None:
        """The request's output after a step that advanced it; None when its kind has nothing to say
        (FINAL_ONLY before the end)."""
        kind = request.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not request.finished:
            return None
        states = [self.states[seq.seq_id] for seq in request.seqs]
        if kind is RequestOutputKind.DELTA:
            first_output = all(state.num_sent_tokens == 0 for state in states)
            prompt_logprobs = request.prompt_logprobs if first_output else None
            outputs = [self._delta(seq, state) for seq, state in zip(request.seqs, states)
                       if seq.num_output_tokens > state.num_sent_tokens]
        else:
            outputs = [self._whole(seq, state) for seq, state in zip(request.seqs, states)]
            prompt_logprobs = request.prompt_logprobs
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, prompt_logprobs,
                             outputs, request.finished, {"arrival_time": request.arrival_time,
                                                         "first_scheduled_time": request.first_scheduled_time})

    @staticmethod
    def _whole(seq: Sequence, state: SequenceOutput) -> CompletionOutput:
        return CompletionOutput(seq.index, state.text, seq.output_token_ids,
                                None if state.logprobs is None else state.cumulative_logprob, state.logprobs,
                                seq.finish_reason, seq.stop_reason)

    @staticmethod
    def _delta(seq: Sequence, state: SequenceOutput) -> CompletionOutput:
        """What is new since the sequence's previous output. Text that may still turn out to be the
        start of a stop string stays back until it cannot (or the sequence ends)."""
        upto = len(state.text)
        if not seq.is_finished and seq.params.stop_strings:
            upto = max(state.num_sent_chars, upto - max(len(s) for s in seq.params.stop_strings) + 1)
        first = seq.num_prompt_tokens + state.num_sent_tokens
        output = CompletionOutput(seq.index, state.text[state.num_sent_chars:upto], seq.token_ids[first:],
                                  None if state.logprobs is None else state.cumulative_logprob,
                                  None if state.logprobs is None else state.logprobs[state.num_sent_tokens:],
                                  seq.finish_reason, seq.stop_reason)
        state.num_sent_tokens, state.num_sent_chars = seq.num_output_tokens, upto
        return output
