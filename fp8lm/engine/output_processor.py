"""From sampled tokens to what a request's caller sees: text grown incrementally, logprobs, stop
conditions, and outputs that are cumulative, deltas, or final only (SamplingParams.output_kind)."""
from __future__ import annotations

import logging

import torch

from fp8lm.engine.detokenizer import IncrementalDetokenizer
from fp8lm.engine.outputs import CompletionOutput, RequestOutput
from fp8lm.engine.sampler import top_logprobs
from fp8lm.engine.sampling_params import RequestOutputKind
from fp8lm.engine.sequence import Logprob, Request, Sequence
from fp8lm.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: tuple[int, ...], max_model_len: int):
        self.tokenizer, self.eos_token_ids, self.max_model_len = tokenizer, eos_token_ids, max_model_len

    def start(self, seq: Sequence) -> None:
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.params.skip_special_tokens,
                                                     seq.num_prompt_tokens)

    def append_token(self, seq: Sequence, token: int, logits: torch.Tensor) -> bool:
        """Adds a sampled token; True when it finished the sequence."""
        seq.token_ids.append(token)
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            # Only a row the sampler could not constrain (min_tokens hiding the one allowed stop) gets here.
            log.warning("request %s: token %d does not fit its grammar; finishing it", seq.request_id, token)
            seq.grammar = None
            self._detokenize(seq, final=True)
            seq.finish("stop")
            return True
        if seq.logprobs is not None:
            entry = top_logprobs(torch.log_softmax(logits, dim=-1), token, seq.params.logprobs)
            self._decode_logprob_tokens(entry)
            seq.logprobs.append(entry)
            seq.cumulative_logprob += entry[token].logprob
        added_from = len(seq.text)
        self._detokenize(seq, final=self._stop_reason(seq, None) is not None)
        reason = self._stop_reason(seq, added_from)
        if reason is not None:
            seq.finish(*reason)
        return reason is not None

    def _detokenize(self, seq: Sequence, final: bool) -> None:
        if seq.detokenizer is not None:
            seq.text += seq.detokenizer.update(seq.token_ids, final)

    def _stop_reason(self, seq: Sequence, text_from: int | None) -> tuple[str, int | str | None] | None:
        """Why the sequence ends now, if it does. Stop strings are looked for in the text added from
        `text_from` on (None: not looked for)."""
        p, token = seq.params, seq.token_ids[-1]
        if seq.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                return "stop", token
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if p.stop_strings and text_from is not None:
                hit = self._find_stop_string(seq, text_from)
                if hit is not None:
                    return "stop", hit
        if seq.grammar is not None and seq.grammar.is_terminated():
            return "stop", None                         # the grammar is complete (ignore_eos or not)
        max_tokens = p.max_tokens or self.max_model_len
        if seq.num_output_tokens >= max_tokens or seq.num_tokens >= self.max_model_len:
            return "length", None
        return None

    @staticmethod
    def _find_stop_string(seq: Sequence, text_from: int) -> str | None:
        """The first stop string that ends in the text added from `text_from`; cuts the text there."""
        start = max(0, text_from - max(len(s) for s in seq.params.stop_strings) + 1)
        best = None
        for stop in seq.params.stop_strings:
            at = seq.text.find(stop, start)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        at, stop = best
        seq.text = seq.text[: at + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:at]
        return stop

    def _decode_logprob_tokens(self, entry: dict[int, Logprob]) -> None:
        if self.tokenizer is not None:
            for token, lp in entry.items():
                lp.decoded_token = self.tokenizer.decode([token], skip_special_tokens=False)

    def prompt_logprobs(self, request: Request, logits: torch.Tensor) -> list[dict[int, Logprob] | None]:
        lps = torch.log_softmax(logits, dim=-1)
        k = request.params.prompt_logprobs
        result: list[dict[int, Logprob] | None] = [None]
        for row, token in enumerate(request.prompt_token_ids[1:]):
            entry = top_logprobs(lps[row], token, k)
            self._decode_logprob_tokens(entry)
            result.append(entry)
        return result

    def request_output(self, request: Request) -> RequestOutput | None:
        """The request's output after a step that advanced it; None when its kind has nothing to say
        (FINAL_ONLY before the end)."""
        kind = request.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not request.finished:
            return None
        if kind is RequestOutputKind.DELTA:
            first_output = all(seq.num_sent_tokens == 0 for seq in request.seqs)
            prompt_logprobs = request.prompt_logprobs if first_output else None
            outputs = [self._delta(seq) for seq in request.seqs if seq.num_output_tokens > seq.num_sent_tokens]
        else:
            outputs = [self._whole(seq) for seq in request.seqs]
            prompt_logprobs = request.prompt_logprobs
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, prompt_logprobs,
                             outputs, request.finished, {"arrival_time": request.arrival_time,
                                                         "first_scheduled_time": request.first_scheduled_time})

    @staticmethod
    def _whole(seq: Sequence) -> CompletionOutput:
        return CompletionOutput(seq.index, seq.text, seq.output_token_ids,
                                None if seq.logprobs is None else seq.cumulative_logprob, seq.logprobs,
                                seq.finish_reason, seq.stop_reason)

    @staticmethod
    def _delta(seq: Sequence) -> CompletionOutput:
        """What is new since the sequence's previous output. Text that may still turn out to be the
        start of a stop string stays back until it cannot (or the sequence ends)."""
        upto = len(seq.text)
        if not seq.is_finished and seq.params.stop_strings:
            upto = max(seq.num_sent_chars, upto - max(len(s) for s in seq.params.stop_strings) + 1)
        first = seq.num_prompt_tokens + seq.num_sent_tokens
        output = CompletionOutput(seq.index, seq.text[seq.num_sent_chars:upto], seq.token_ids[first:],
                                  None if seq.logprobs is None else seq.cumulative_logprob,
                                  None if seq.logprobs is None else seq.logprobs[seq.num_sent_tokens:],
                                  seq.finish_reason, seq.stop_reason)
        seq.num_sent_tokens, seq.num_sent_chars = seq.num_output_tokens, upto
        return output
