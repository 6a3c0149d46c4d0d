"""Outputs without O(length) work per step: the incremental detokenizer against a whole decode, and
DELTA / FINAL_ONLY outputs against the cumulative ones they must add up to."""
import random

import pytest
from tokenizers import Tokenizer as RawTokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fp8lm import LLM, SamplingParams
from fp8lm.engine.detokenizer import IncrementalDetokenizer
from fp8lm.engine.sampling_params import RequestOutputKind
from fp8lm.eval.perplexity import HELDOUT
from fp8lm.model.tokenizer import Tokenizer


def trained(kind: str) -> Tokenizer:
    """A small BPE trained on the held-out text: byte-level (GPT-2/SmolLM2 style) or Metaspace
    (SentencePiece/Llama style, which drops the space it prepends when decoding from the start)."""
    text = HELDOUT.read_text().splitlines()
    raw = RawTokenizer(models.BPE(unk_token=None if kind == "byte" else "<unk>", byte_fallback=kind != "byte"))
    special = ["<s>", "</s>", "<unk>"]
    if kind == "byte":
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        raw.normalizer = normalizers.Replace(" ", "\u2581")
        raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        alphabet = []
    raw.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                                      initial_alphabet=alphabet, show_progress=False))
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>"))


def samples(tok: Tokenizer, count: int) -> list[list[int]]:
    """Pieces of real text, and random ids (special tokens, split UTF-8 characters) in between."""
    rng = random.Random(0)
    text = HELDOUT.read_text() + " Grüße, naïve café — 東京 🙂"
    ids = tok.encode(text, add_special_tokens=False)
    vocab = len(tok.hf)
    out = []
    for i in range(count):
        if i % 2:
            start = rng.randrange(len(ids) - 100)
            out.append(ids[start:start + rng.randrange(2, 100)])
        else:
            out.append([rng.randrange(vocab) for _ in range(rng.randrange(2, 60))])
    return out


@pytest.mark.parametrize("kind", ["byte", "metaspace"])
def test_incremental_text_equals_a_whole_decode(kind):
    tok = trained(kind)
    prompt = tok.encode("The prompt.", add_special_tokens=True)
    for ids in samples(tok, 200):
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, skip, first=len(prompt))
            seq, text = list(prompt), ""
            for i, token in enumerate(ids):
                seq.append(token)
                text += detok.update(seq, finished=i == len(ids) - 1)
            assert text == tok.decode(ids, skip), (kind, skip, ids)


def test_each_step_decodes_a_short_window(tiny_model, monkeypatch):
    llm = LLM(str(tiny_model), max_model_len=256, skip_warmup=True)
    lengths = []
    decode = Tokenizer.decode
    monkeypatch.setattr(Tokenizer, "decode", lambda self, ids, skip=True: lengths.append(len(ids)) or decode(self, ids, skip))
    # Special tokens kept: every token adds text, so a window is the previous token and the new one.
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, skip_special_tokens=False)
    out = llm.generate(["Hello"], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 200
    assert len(lengths) >= 200 and max(lengths) <= 2          # not 1, 2, ... 200 tokens


def run_kind(llm, params: SamplingParams, kind: RequestOutputKind, prompts):
    """Every output the engine returns for `prompts` under `kind`, per request."""
    engine = llm.engine
    params = SamplingParams(**{**{f: getattr(params, f) for f in params.__dataclass_fields__ if f != "stop_strings"},
                               "output_kind": kind})
    for i, p in enumerate(prompts):
        engine.add_request(f"{kind.name}-{i}", p, params)
    got: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            got.setdefault(out.request_id, []).append(out)
    return [got[f"{kind.name}-{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("stops", [0, 1, 2])
def test_deltas_add_up_to_the_cumulative_output(tiny_model, stops):
    """With stop strings taken from a reply (so they do stop it), text held back as a possible stop
    string's start must still add up to the cut text."""
    llm = LLM(str(tiny_model), max_model_len=128, skip_warmup=True)
    prompts = ["Hello there", "Some other prompt", "x"]
    params = dict(temperature=0.8, seed=3, n=2, max_tokens=40, logprobs=2, prompt_logprobs=1)
    reply = llm.generate(prompts[:1], SamplingParams(**params), use_tqdm=False)[0].outputs[0].text
    stop = [reply[20:23], reply[30:32]][:stops] or None
    params = SamplingParams(**params, stop=stop)
    cumulative = run_kind(llm, params, RequestOutputKind.CUMULATIVE, prompts)
    deltas = run_kind(llm, params, RequestOutputKind.DELTA, prompts)
    finals = run_kind(llm, params, RequestOutputKind.FINAL_ONLY, prompts)
    for whole, parts, final in zip(cumulative, deltas, finals):
        assert len(final) == 1 and final[0].finished
        assert len(parts) == len(whole)                            # one delta per step that advanced it
        assert parts[0].prompt_logprobs == whole[-1].prompt_logprobs
        assert all(p.prompt_logprobs is None for p in parts[1:])
        joined = parts[0]
        for p in parts[1:]:
            joined.add(p)
        for expected in (whole[-1], final[0]):
            assert [(o.index, o.text, o.token_ids, o.finish_reason, o.stop_reason) for o in joined.outputs] == \
                   [(o.index, o.text, o.token_ids, o.finish_reason, o.stop_reason) for o in expected.outputs]
            assert [o.logprobs for o in joined.outputs] == [o.logprobs for o in expected.outputs]
            assert [o.cumulative_logprob for o in joined.outputs] == pytest.approx(
                [sum(e[t].logprob for e, t in zip(o.logprobs, o.token_ids)) for o in expected.outputs])
    if stop:
        assert any(o.stop_reason in stop for w in cumulative for o in w[-1].outputs)


def test_an_output_kind_that_is_not_one_is_refused():
    from fp8lm.engine.sampling_params import SamplingParamsError

    with pytest.raises(SamplingParamsError, match="output_kind: must be a RequestOutputKind"):
        SamplingParams(output_kind="delta")
