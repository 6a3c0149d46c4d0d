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


# Tokens ranked per row before top-k / top-p / min-p, most likely first. Ranking a whole vocabulary
# is the expensive part (SmolLM2's 49k x 32 rows, one thread: sort ~120 ms, topk of 8,192 ~30 ms), so
# only the tokens at or above a floor each rule sets are ranked. Top-p's floor: each row's
# probabilities bucketed by their binary exponent, the lower edge of the buckets from the top that
# first hold more than top_p's mass (plus a margin for summation order) -- a token below it has more
# than top_p ranked before it. The floors are found in float32 (a row in float64 is rounded for it).
EXPONENT_BUCKETS = 150              # p in [2^-(b+1), 2^-b) for b < 149; the last bucket holds the rest
TOP_P_MARGIN = 1e-4
MIN_P_SLACK = 1.0 - 2.0 ** -20      # float32 rounding of a float64 row's ratios


def _candidates(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [R, C], token ids [R, C]) of the C best-ranked tokens (equal probabilities: the lower
    id first), those top-k, top-p (the first always kept) or min-p drops set to -inf; C covers every
    row's kept tokens."""
    probs = torch.softmax(logits, dim=-1)
    best, order, counts = _ranked(probs, top_k, top_p, min_p)
    ranks = torch.arange(best.shape[1])[None, :]
    drop = (ranks >= top_k[:, None]) | (ranks >= counts[:, None])
    drop |= (best.cumsum(dim=-1) - best) > top_p[:, None]
    drop |= best < min_p[:, None] * best[:, :1]
    width = int((~drop).sum(dim=-1).max())
    order = order[:, :width]
    return logits.gather(1, order).masked_fill(drop[:, :width], float("-inf")), order


def _ranked(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
            min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities [R, W], token ids [R, W], ranked count [R]) of each row's tokens at or above its
    floor, most likely first (ties: the lower id first); W is the largest count, shorter rows padded
    with zeros."""
    filtering = probs.float()
    floor = _floor(filtering, top_p, min_p)
    keep = filtering >= floor[:, None]
    counts = keep.sum(dim=-1)
    binding = top_k < counts
    if bool(binding.any()):                        # top-k's floor: the k-th probability (its ties pass)
        k = int(top_k[binding].max())
        kth = filtering.topk(k, dim=-1).values.gather(1, (top_k.clamp(max=k) - 1)[:, None])[:, 0]
        keep = filtering >= torch.where(binding, torch.maximum(floor, kth), floor)[:, None]
        counts = keep.sum(dim=-1)
    rows, ids = keep.nonzero(as_tuple=True)        # row by row, ids ascending
    slot = torch.arange(rows.shape[0]) - (counts.cumsum(0) - counts).repeat_interleave(counts)
    width = int(counts.max())
    values, order = probs.new_zeros(probs.shape[0], width), ids.new_zeros(probs.shape[0], width)
    values[rows, slot], order[rows, slot] = probs[rows, ids], ids
    best, by_prob = values.sort(dim=-1, descending=True, stable=True)
    return best, order.gather(1, by_prob), counts


def _floor(probs: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Per row of float32 probabilities, one that every token top-p and min-p keep reaches."""
    exponent = probs.view(torch.int32) >> 23                          # IEEE biased exponent (p >= 0)
    bucket = (126 - exponent).clamp_(0, EXPONENT_BUCKETS - 1).long()  # 126: p in [1/2, 1)
    mass = probs.new_zeros(probs.shape[0], EXPONENT_BUCKETS).scatter_add_(1, bucket, probs)
    enough = mass.cumsum(dim=-1) > (top_p.float() + TOP_P_MARGIN)[:, None]
    first = torch.where(enough.any(dim=-1), enough.int().argmax(dim=-1), EXPONENT_BUCKETS)
    floor = torch.exp2(-(first + 1).float()).masked_fill_(first >= EXPONENT_BUCKETS - 1, 0.0)
    return torch.maximum(floor, min_p.float() * MIN_P_SLACK * probs.amax(dim=-1))


def top_logprobs(logprobs: torch.Tensor, token: int, k: int) -> dict[int, Logprob]:
    """vLLM's shape: the chosen token plus the top-k, each with its rank (1 = most likely)."""
    chosen = float(logprobs[token])
    result = {token: Logprob(chosen, int((logprobs > chosen).sum()) + 1)}
    if k > 0:
        values, ids = logprobs.topk(k)
        for rank, (v, t) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            result.setdefault(t, Logprob(v, rank))
    return result
