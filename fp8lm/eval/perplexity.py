"""Perplexity of a model on a text, and FP8 against the unquantized model on the same tokens:
perplexity change, mean per-token KL divergence KL(reference || FP8), and top-1 agreement."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fp8lm.errors import FP8LMError

HELDOUT = Path(__file__).resolve().parent.parent / "data" / "heldout.txt"


def read_text(path: str | None) -> str:
    p = HELDOUT if path in (None, "builtin") else Path(path).expanduser()
    if not p.is_file():
        raise FP8LMError(f"--text {path}: no such file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise FP8LMError(f"--text {p}: the file is empty")
    return text


def token_windows(tokenizer, text: str, window: int, max_windows: int | None = None) -> list[list[int]]:
    """Consecutive, non-overlapping windows of the text, `window` tokens each (the last may be
    shorter), each one starting as the tokenizer starts a document (Gemma: with <bos>, without
    which the model is far off its trained distribution; SmolLM2 adds nothing)."""
    prefix = tokenizer.encode("", add_special_tokens=True)
    body = split_windows(tokenizer.encode(text, add_special_tokens=False), window - len(prefix), max_windows)
    return [prefix + w for w in body]


def split_windows(ids: list[int], window: int, max_windows: int | None = None) -> list[list[int]]:
    """`ids` cut into consecutive windows of `window` tokens (those of at least 2 tokens)."""
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    return windows[:max_windows] if max_windows else windows


@dataclass
class Perplexity:
    nll: float
    num_tokens: int

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.num_tokens)


def _nll(logits: torch.Tensor, targets: list[int]) -> float:
    lp = torch.log_softmax(logits.float(), dim=-1)
    return -float(lp.gather(1, torch.tensor(targets)[:, None]).sum())


def perplexity(engine, windows: list[list[int]]) -> Perplexity:
    nll, n = 0.0, 0
    for w in windows:
        nll += _nll(engine.score(w), w[1:])
        n += len(w) - 1
    return Perplexity(nll, n)


@dataclass
class Comparison:
    reference: Perplexity
    candidate: Perplexity
    kl_sum: float
    agree: int
    nll_diff_sq: float = 0.0      # sum over tokens of (candidate's NLL - reference's NLL)²

    @property
    def ppl_change_pct(self) -> float:
        return 100.0 * (self.candidate.value / self.reference.value - 1)

    def ppl_change_bound_pct(self, z: float) -> float:
        """The perplexity change at z standard errors of the mean per-token NLL difference above it
        (tokens taken as independent draws)."""
        n = self.reference.num_tokens
        mean = (self.candidate.nll - self.reference.nll) / n
        stderr = math.sqrt(max(self.nll_diff_sq / n - mean * mean, 0.0) / n)
        return 100.0 * math.expm1(mean + z * stderr)

    @property
    def mean_kl(self) -> float:
        return self.kl_sum / self.reference.num_tokens

    @property
    def top1_agreement(self) -> float:
        return self.agree / self.reference.num_tokens

    def summary(self) -> str:
        return (f"perplexity {self.reference.value:.4f} -> {self.candidate.value:.4f} ({self.ppl_change_pct:+.2f}%), "
                f"mean KL {self.mean_kl:.5f} nats/token, top-1 agreement {100 * self.top1_agreement:.2f}% "
                f"over {self.reference.num_tokens} tokens")


def reference_logprobs(engine, windows: list[list[int]]):
    """Log-probabilities of each window (lazily, one window at a time)."""
    return (torch.log_softmax(engine.score(w).float(), -1) for w in windows)


def compare(reference, candidate, windows: list[list[int]]) -> Comparison:
    """`reference`: an engine, or the windows' log-probabilities from `reference_logprobs` (kept to
    compare many candidates against one reference)."""
    ref_lps = reference_logprobs(reference, windows) if hasattr(reference, "score") else reference
    ref_nll = cand_nll = kl = diff_sq = 0.0
    agree = n = 0
    for w, la in zip(windows, ref_lps):
        lb = torch.log_softmax(candidate.score(w).float(), -1)
        targets = torch.tensor(w[1:])[:, None]
        ref_tokens, cand_tokens = -la.gather(1, targets), -lb.gather(1, targets)
        ref_nll += float(ref_tokens.sum())
        cand_nll += float(cand_tokens.sum())
        diff_sq += float(((cand_tokens - ref_tokens) ** 2).sum())
        kl += float((la.exp() * (la - lb)).sum())
        agree += int((la.argmax(-1) == lb.argmax(-1)).sum())
        n += len(w) - 1
    return Comparison(Perplexity(ref_nll, n), Perplexity(cand_nll, n), kl, agree, diff_sq)
