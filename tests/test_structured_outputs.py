"""Structured outputs in the engine: every constrained reply obeys its constraint (checked by re,
jsonschema and the choice list, not by the grammar engine), the mask allows exactly what the
grammar allows, and the unconstrained rows of a batch are untouched."""
import json
import re

import jsonschema
import pytest
import torch

from fp8lm import LLM, SamplingParams
from fp8lm.engine.sampling_params import SamplingParamsError, StructuredOutputsParams
from fp8lm.engine.structured_outputs import GrammarBackend, mask_disallowed

SCHEMA = {"type": "object", "properties": {"a": {"enum": ["x", "yz"]}, "b": {"type": "boolean"},
                                           "c": {"type": "string", "maxLength": 5}},
          "required": ["a", "b", "c"], "additionalProperties": False}
PROMPTS = ["hello", "abc", "The sky is"]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model), max_model_len=128, max_num_seqs=16, skip_warmup=True)


def constrained(llm, so, **kw):
    params = SamplingParams(temperature=1.0, seed=7, n=3, max_tokens=60, structured_outputs=so, **kw)
    return [c for out in llm.generate(PROMPTS, params, use_tqdm=False) for c in out.outputs]


@pytest.mark.parametrize("so,check,bounded", [
    (StructuredOutputsParams(choice=["yes", "no way", "maybe so"]), lambda t: t in ("yes", "no way", "maybe so"), True),
    (StructuredOutputsParams(regex=r"[a-c]{3}-[0-9]{1,4}"), lambda t: re.fullmatch(r"[a-c]{3}-[0-9]{1,4}", t), True),
    (StructuredOutputsParams(json=SCHEMA), lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None, True),
    (StructuredOutputsParams(grammar='root ::= "(" [0-9]{1,3} ")" | "none"'), lambda t: re.fullmatch(r"\(\d+\)|none", t),
     True),
    (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict), False),
], ids=["choice", "regex", "json_schema", "ebnf", "json_object"])
def test_random_model_replies_obey_their_constraint(llm, so, check, bounded):
    """A bounded constraint (every reply it allows is shorter than max_tokens) must end every reply
    with "stop"; any JSON object need not (a random model rambles inside it), but those that end obey."""
    outputs = constrained(llm, so)
    assert len(outputs) == 9
    finished = [o for o in outputs if o.finish_reason == "stop"]
    assert len(finished) == 9 if bounded else finished, [o.text for o in outputs]
    for o in finished:
        assert check(o.text), o.text


def test_the_mask_allows_exactly_the_grammar_s_next_characters(llm):
    """The char tokenizer (conftest) has one id per printable character: ' ' is 3, so c is ord(c) - 29."""
    hf = llm.get_tokenizer()
    backend = GrammarBackend(hf, llm.engine.host.model_config.vocab_size, [hf.eos_token_id])
    matchers = backend.matchers(backend.compile(StructuredOutputsParams(choice=["ab", "ba", "bb"])), 1)
    logits = torch.zeros(2, llm.engine.host.model_config.vocab_size)
    masked = mask_disallowed(logits, [1], matchers)
    assert torch.equal(masked[0], logits[0])                           # the unconstrained row
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [ord("a") - 29, ord("b") - 29]
    assert matchers[0].accept_token(ord("b") - 29)
    masked = mask_disallowed(logits, [0], matchers)
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [ord("a") - 29, ord("b") - 29]
    assert matchers[0].accept_token(ord("a") - 29)
    masked = mask_disallowed(logits, [0], matchers)
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [hf.eos_token_id]


def test_unconstrained_rows_of_a_batch_are_untouched(llm):
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    tied = SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(regex="[xyz]{4}"))
    alone = [llm.generate(p, free, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    mixed = llm.generate([{"prompt_token_ids": llm.get_tokenizer().encode(p)} for p in PROMPTS] * 2,
                         [free] * 3 + [tied] * 3, use_tqdm=False)
    assert [m.outputs[0].token_ids for m in mixed[:3]] == alone
    assert all(re.fullmatch("[xyz]{4}", m.outputs[0].text) for m in mixed[3:])


@pytest.mark.parametrize("so,message", [
    (dict(regex="(unclosed"), "invalid constraint"),
    (dict(json={"type": "nonsense"}), "invalid constraint"),
    (dict(grammar="root ::= ("), "invalid grammar"),
    (dict(regex="a", choice=["b"]), "exactly one"),
    (dict(), "exactly one"),
    (dict(choice=[]), "non-empty list"),
    (dict(json="{not json"), "not JSON"),
])
def test_invalid_constraints_are_refused_by_name(llm, so, message):
    with pytest.raises(SamplingParamsError, match=message) as e:
        llm.generate("x", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(**so)),
                     use_tqdm=False)
    assert e.value.param == "structured_outputs"
    assert not llm.engine.has_unfinished_requests()


def test_logit_bias_moves_the_choice(llm):
    z = ord("z") - 29
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logit_bias={z: 100}),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == "z" * 8
    plain = llm.generate("hello", SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0].outputs[0]
    banned = llm.generate("hello", SamplingParams(temperature=0, max_tokens=1, logit_bias={plain.token_ids[0]: -100}),
                          use_tqdm=False)[0].outputs[0]
    assert banned.token_ids != plain.token_ids
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        llm.generate("x", SamplingParams(logit_bias={10**9: 1.0}), use_tqdm=False)


def test_get_tokenizer_is_the_transformers_tokenizer(llm):
    from transformers import PreTrainedTokenizerBase

    tok = llm.get_tokenizer()
    assert isinstance(tok, PreTrainedTokenizerBase)
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        llm.engine.tokenizer.apply_chat_template(messages)
    assert tok("hi")["input_ids"] == tok.encode("hi")
