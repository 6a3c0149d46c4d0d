"""Turns one row of logits per sequence into the next token: penalties, logit_bias, min_tokens,
grammar masks (structured outputs), temperature, top-k / top-p / min-p, then greedy or seeded sampling. Each
sequence samples with its own generator, so a seeded request gives the same tokens whatever else is in the batch."""
from __future__ import annotations

import torch

from fp8lm.engine.sequence import Logprob, Sequence
from fp8lm.engine.structured_outputs import mask_disallowed


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...]):
        self.eos_token_ids = list(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], grammars: list | None = None) -> list[int]:
        """logits: [B, V] float32, one row per sequence; not modified. `grammars`: each sequence's
        grammar matcher or None (structured outputs)."""
        logits = self._apply_penalties(logits, seqs)
        logits = self._apply_logit_bias(logits, seqs)
        logits = self._mask_stops_before_min_tokens(logits, seqs)
        grammar_rows = [i for i, g in enumerate(grammars or []) if g is not None]
        if grammar_rows:
            logits = mask_disallowed(logits, grammar_rows, [grammars[i] for i in grammar_rows])
        greedy = [s.params.greedy for s in seqs]
        tokens = [0] * len(seqs)
        if any(greedy):
            argmax = logits.argmax(dim=-1).tolist()
            for i, g in enumerate(greedy):
                if g:
                    tokens[i] = argmax[i]
        if not all(greedy):
            rows = [i for i, g in enumerate(greedy) if not g]
            probs, ids = self._filtered_probs(logits[rows], [seqs[i] for i in rows])
            # Extreme settings (a vanishing repetition penalty, say) can leave no valid distribution:
            # such a row falls back to the most likely token rather than failing the batch.
            valid = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
            for row, i in enumerate(rows):
                if valid[row]:
                    # A row's own kept tokens only: trailing zeros (other rows keeping more) change draws.
                    own = probs[row] if ids is None else probs[row, :int((probs[row] > 0).sum())]
                    j = int(torch.multinomial(own, 1, generator=seqs[i].generator))
                    tokens[i] = j if ids is None else int(ids[row, j])
                else:
                    tokens[i] = int(logits[i].nan_to_num(nan=float("-inf")).argmax())
        return tokens

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i in rows:
            p, seq = seqs[i].params, seqs[i]
            out_counts = torch.bincount(torch.tensor(seq.output_token_ids, dtype=torch.long), minlength=vocab)[:vocab]
            row = logits[i]
            if p.repetition_penalty != 1.0:
                # Like HF/vLLM: applies to prompt and output tokens, dividing positive logits.
                seen = torch.zeros(vocab, dtype=torch.bool)
                seen[torch.tensor(seq.token_ids, dtype=torch.long)] = True
                penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row = torch.where(seen, penalized, row)
            row = row - p.frequency_penalty * out_counts - p.presence_penalty * (out_counts > 0).float()
            logits[i] = row
        return logits

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.params.logit_bias]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            bias = seqs[i].params.logit_bias
            logits[i, list(bias)] += torch.tensor(list(bias.values()), dtype=logits.dtype)
        return logits

    def _mask_stops_before_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            stops = list(seqs[i].params.stop_token_ids) + ([] if seqs[i].params.ignore_eos else self.eos_token_ids)
            if stops:
                logits[i, stops] = float("-inf")
        return logits

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's sampling distribution after temperature, top-k, top-p and min-p: probabilities
        [R, C] and the token id of each column [R, C], or None where the columns are the vocabulary."""
        temps = torch.tensor([s.params.temperature for s in seqs], dtype=logits.dtype)
        logits = logits / temps[:, None]
        vocab = logits.shape[1]
        top_k = torch.tensor([s.params.top_k or vocab for s in seqs])
        top_p = torch.tensor([s.params.top_p for s in seqs], dtype=logits.dtype)
        min_p = torch.tensor([s.params.min_p for s in seqs], dtype=logits.dtype)
        if (top_k < vocab).any() or (top_p < 1).any() or (min_p > 0).any():
            kept, ids = _candidates(logits, top_k, top_p, min_p)
            # Each row normalized over its own kept tokens (a prefix of its ranking), zeros after them:
            # its numbers then never depend on how many tokens other rows keep.
            probs = torch.zeros_like(kept)
            for r, width in enumerate((kept > float("-inf")).sum(dim=-1).tolist()):
                probs[r, :width] = torch.softmax(kept[r, :width], dim=-1)
            return probs, ids
        return torch.softmax(logits, dim=-1), None


# Tokens ranked per row before top-k / top-p / min-p, most likely first: sorting a whole 262k
# vocabulary costs ~1 s per step for 32 rows on two cores, the best 1,024 ~50 ms (SmolLM2's 49k: sort
# 57 ms, best 1,024 7 ms, best 8,192 15 ms). A larger rank, and then the whole row, only where the rule
# could keep a token past them.
CANDIDATES = (1024, 8192)


def _candidates(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [R, C], token ids [R, C]) of the C best-ranked tokens, those top-k, top-p (the first
    always kept) or min-p drops set to -inf; C covers every row's kept tokens."""
    vocab = logits.shape[1]
    probs = torch.softmax(logits, dim=-1)
    for rank in CANDIDATES:
        if rank >= vocab:
            break
        best, order = probs.topk(rank, dim=-1)
        # Every token past the candidates is dropped where the k-th rank is, the candidates' mass
        # already exceeds top_p, or the last candidate is already below min_p.
        past_dropped = (top_k <= rank) | (best.sum(dim=-1) > top_p) | (best[:, -1] < min_p * best[:, 0])
        if bool(past_dropped.all()):
            break
    else:
        rank = vocab
    if rank >= vocab:
        best, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(best.shape[1])[None, :]
    drop = ranks >= top_k[:, None]
    drop |= (best.cumsum(dim=-1) - best) > top_p[:, None]
    drop |= best < min_p[:, None] * best[:, :1]
    width = int((~drop).sum(dim=-1).max())
    order = order[:, :width]
    return logits.gather(1, order).masked_fill(drop[:, :width], float("-inf")), order


def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> dict[int, Logprob]:
    """vLLM's shape: the chosen token plus the top-k, each with its rank (1 = most likely)."""
    chosen = float(logprobs[token])
    result = {token: Logprob(chosen, int((logprobs > chosen).sum()) + 1)}
    if k > 0:
        values, ids = logprobs.topk(k)
        for rank, (v, t) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            result.setdefault(t, Logprob(v, rank))
    return result
