"""A GGUF's SentencePiece-BPE vocabulary (llama.cpp tokenizer model `llama` with per-piece scores, as
Gemma's) as a transformers fast tokenizer.

SentencePiece BPE merges the adjacent pair whose joined piece scores highest, and falls back to
<0xXX> byte pieces for characters outside the vocabulary. A `tokenizers` BPE gives the same result
when every split of a piece into two pieces is a merge ranked by the joined piece's score.
(transformers' own GGUF reader builds a Unigram model from these scores, which splits 'world' into
'▁w' 'or' 'ld'.) Control pieces are special tokens; user-defined ones ('\\n', runs of spaces or
tabs) are matched whole, as SentencePiece matches them, and never merged.
"""
from __future__ import annotations

from pathlib import Path

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6
SPACE = "\u2581"      # SentencePiece's escaped space

# Gemma's turn format: roles user and model, a system message prefixed to the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + ns.system + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% set ns.system = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def bpe_merges(pieces: list[str], scores: list[float], mergeable: set[str]) -> list[tuple[str, str]]:
    """Every split of a mergeable piece into two mergeable pieces, best-scoring joined piece first."""
    ranked = []
    for piece, score in zip(pieces, scores):
        if piece not in mergeable:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, left, right in ranked]


def sentencepiece_bpe_tokenizer(pieces: list[str], scores: list[float], types: list[int], *, bos_id: int | None,
                                eos_id: int | None, unk_id: int | None, pad_id: int | None, add_bos: bool,
                                chat_template: str | None):
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    pieces = [p.replace(" ", SPACE) for p in pieces]
    vocab = {p: i for i, p in reversed(list(enumerate(pieces)))}       # a repeated piece keeps its first id
    mergeable = {p for p, t in zip(pieces, types) if t == NORMAL}
    name = (lambda i: None if i is None else pieces[i])
    tok = Tokenizer(BPE(vocab, bpe_merges(pieces, scores, mergeable), unk_token=name(unk_id), fuse_unk=True,
                        byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p, special=False, normalized=True) for p, t in zip(pieces, types) if t == USER_DEFINED])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, t in zip(pieces, types) if t == CONTROL])
    if add_bos and bos_id is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{pieces[bos_id]} $A", pair=f"{pieces[bos_id]} $A $B",
                                                           special_tokens=[(pieces[bos_id], bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=name(bos_id), eos_token=name(eos_id),
                                   unk_token=name(unk_id), pad_token=name(pad_id), chat_template=chat_template)


def save_sentencepiece_bpe(reader, field, dest: Path, default_chat_template: str | None) -> None:
    """The GGUF's vocabulary as dest/tokenizer.json + tokenizer_config.json. `field(reader, key)`
    reads one metadata value."""
    tok = sentencepiece_bpe_tokenizer(
        list(field(reader, "tokenizer.ggml.tokens")), [float(s) for s in field(reader, "tokenizer.ggml.scores")],
        [int(t) for t in field(reader, "tokenizer.ggml.token_type")],
        bos_id=field(reader, "tokenizer.ggml.bos_token_id"), eos_id=field(reader, "tokenizer.ggml.eos_token_id"),
        unk_id=field(reader, "tokenizer.ggml.unknown_token_id"), pad_id=field(reader, "tokenizer.ggml.padding_token_id"),
        add_bos=bool(field(reader, "tokenizer.ggml.add_bos_token", True)),
        chat_template=field(reader, "tokenizer.chat_template") or default_chat_template)
    tok.save_pretrained(str(dest))
