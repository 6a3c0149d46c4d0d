"""The sampler's transformations against values written by hand from their definitions."""
import math

import torch

from fp8lm import SamplingParams
from fp8lm.engine.sampler import Sampler
from fp8lm.engine.sequence import Sequence


def seq(prompt, output, **params):
    s = Sequence(0, "r", 0, prompt, SamplingParams(**params), torch.Generator().manual_seed(0))
    s.token_ids.extend(output)
    return s


def filtered(logits, seqs) -> torch.Tensor:
    """The sampler's distribution of each row over the whole vocabulary (its columns scattered back)."""
    probs, ids = Sampler(())._filtered_probs(logits, seqs)
    return probs if ids is None else torch.zeros_like(logits, dtype=probs.dtype).scatter_(1, ids, probs)


def test_penalties_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    s = seq([0], [1, 1, 2], repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = Sampler((4,))._apply_penalties(logits, [s])[0]
    # token 0: in prompt, positive -> 2/2 = 1; no output occurrences.
    # token 1: in output twice, negative -> -1*2 = -2, then -0.5*2 - 0.25 = -3.25
    # token 2: once -> 0.5/2 = 0.25, then -0.5 - 0.25 = -0.5
    # tokens 3, 4: untouched
    assert torch.allclose(out, torch.tensor([1.0, -3.25, -0.5, 3.0, 0.0]))
    assert logits[0, 0] == 2.0  # input not modified


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.zeros(1, 6)
    s = seq([0], [1], min_tokens=3, stop_token_ids=[5])
    out = Sampler((4,))._mask_stops_before_min_tokens(logits, [s])[0]
    assert out[4] == float("-inf") and out[5] == float("-inf") and out[:4].eq(0).all()


def test_top_k_top_p_min_p_filters_by_hand():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log()[None]
    def kept(**params):
        return (filtered(logits, [seq([0], [], **params)])[0] > 0).tolist()
    assert kept(top_k=2) == [True, True, False, False, False]
    # top_p 0.8: 0.4 + 0.3 = 0.7 < 0.8, so the third token (cumulative 0.85) is still needed.
    assert kept(top_p=0.8) == [True, True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False, False]
    # min_p 0.3: keep p >= 0.3 * 0.4 = 0.12
    assert kept(min_p=0.3) == [True, True, True, False, False]
    renorm = filtered(logits, [seq([0], [], top_k=2)])[0]
    assert torch.allclose(renorm[:2], torch.tensor([0.4, 0.3]) / 0.7)


def test_temperature_sampling_matches_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    temperature = 0.5
    expected = torch.softmax(logits[0] / temperature, 0)
    s = seq([0], [], temperature=temperature, seed=3)
    counts = torch.zeros(3)
    sampler = Sampler(())
    for _ in range(4000):
        counts[sampler(logits, [s])[0]] += 1
    freq = counts / counts.sum()
    # 4000 draws: standard error <= sqrt(0.25/4000) = 0.008; allow 4 sigma.
    assert (freq - expected).abs().max() < 0.032
    assert math.isclose(float(expected.sum()), 1.0, rel_tol=1e-6)


def _kept_by_definition(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Written from the definitions over the whole row: the top_k most likely; the fewest most likely
    whose mass reaches top_p; those at least min_p times the most likely."""
    ranked = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept, mass = set(), 0.0
    for rank, i in enumerate(ranked):
        if rank >= top_k or mass > top_p or float(probs[i]) < min_p * float(probs[ranked[0]]):
            break
        kept.add(i)
        mass += float(probs[i])
    return kept


def test_large_vocabularies_rank_only_tokens_that_can_be_kept():
    """A 16,384-token vocabulary, peaked to flat rows: each rule keeps exactly what its definition
    keeps, while the sampler ranks only the tokens at or above each row's floor under top_p 0.95."""
    from fp8lm.engine.sampler import _ranked

    gen = torch.Generator().manual_seed(0)
    vocab = 16384
    peaked = torch.randn(2, vocab, generator=gen, dtype=torch.float64) * 4
    medium = torch.randn(2, vocab, generator=gen, dtype=torch.float64) * 2.5
    flat = torch.randn(2, vocab, generator=gen, dtype=torch.float64) * 0.1
    for logits in (peaked, medium, flat):
        for params in (dict(top_p=0.95), dict(top_k=50), dict(min_p=0.05), dict(top_k=3000, top_p=0.99),
                       dict(top_p=0.9, min_p=0.001), dict(top_k=20000, top_p=0.5)):
            rows = filtered(logits, [seq([0], [], **params) for _ in logits])
            for row, probs in zip(rows, torch.softmax(logits, dim=-1)):
                expected = _kept_by_definition(probs, params.get("top_k") or vocab, params.get("top_p", 1.0),
                                               params.get("min_p", 0.0))
                assert set(torch.nonzero(row).flatten().tolist()) == expected, params
    for logits in (peaked, medium):
        probs = torch.softmax(logits, dim=-1)
        ranked = _ranked(probs, torch.full((2,), vocab), torch.full((2,), 0.95, dtype=torch.float64),
                         torch.zeros(2, dtype=torch.float64))[0].shape[1]
        kept = max(len(_kept_by_definition(p, vocab, 0.95, 0.0)) for p in probs)
        assert kept <= ranked < vocab // 2, (kept, ranked)


def test_equal_probabilities_rank_the_lower_token_id_first():
    """Ties are ranked by token id, for top-k and for top-p alike: the candidates' order decides
    which token a seeded draw lands on, so it must not depend on how the ranking was computed."""
    logits = torch.tensor([[0.5, 2.0, 2.0, 2.0, 1.0, 2.0]])               # four ties at p = 0.218
    for params, expected in ((dict(top_k=2), [1, 2]), (dict(top_p=0.5), [1, 2, 3]), (dict(top_k=3, top_p=0.99), [1, 2, 3])):
        row = filtered(logits, [seq([0], [], **params)])[0]
        assert torch.nonzero(row).flatten().tolist() == expected, params
    from fp8lm.engine.sampler import _candidates

    for top_k, top_p in ((2, 1.0), (6, 0.5)):
        _, ids = _candidates(logits, torch.tensor([top_k]), torch.tensor([top_p]), torch.tensor([0.0]))
        assert ids[0, :2].tolist() == [1, 2], (top_k, top_p, ids)


def test_sampling_from_candidates_draws_their_tokens():
    """top_k 2 over shuffled tokens: draws land on the two most likely ids at their renormalized rates."""
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    s = seq([0], [], top_k=2, seed=5)
    sampler, counts = Sampler(()), torch.zeros(5)
    for _ in range(4000):
        counts[sampler(probs.log()[None], [s])[0]] += 1
    # 4000 draws: standard error <= sqrt(0.25/4000) = 0.008; allow 4 sigma.
    expected = torch.tensor([0.0, 0.4, 0.0, 0.3, 0.0]) / 0.7
    assert (counts / counts.sum() - expected).abs().max() < 0.032
