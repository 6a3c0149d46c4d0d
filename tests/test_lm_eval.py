"""lm-eval, unmodified, against the real server: its `local-completions` model (loglikelihood_rolling
over fp8lm's held-out text, and a multiple-choice loglikelihood task written here) and its
`local-chat-completions` model (a generate_until task), compared with lm-eval's own `hf` backend
on the same model, and for FP8 with fp8lm's own scoring of the same windows."""
import json
import math
import os

import pytest
import torch

from fp8lm import LLM
from fp8lm.eval.perplexity import read_text
from server_util import running_server

pytestmark = pytest.mark.slow
MAX_LENGTH = 1024             # lm-eval's rolling windows (two over the held-out text)
MC = [("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
      ("How many legs does a spider have?", ["six", "eight", "four", "ten"], 1),
      ("Which planet is closest to the sun?", ["Venus", "Mars", "Mercury", "Earth"], 2),
      ("What do bees make?", ["milk", "silk", "wax paper", "honey"], 3),
      ("What color is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
      ("Water freezes at what temperature in Celsius?", ["100 degrees", "0 degrees", "50 degrees", "-40 degrees"], 1)]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo")]


def write_tasks(folder):
    """Three local tasks (no hub): jsonl data beside lm-eval task YAMLs."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"heldout": [{"text": read_text(None)}],
            "mc": [{"question": q, "choices": c, "gold": g} for q, c, g in MC],
            "capitals": [{"country": c, "capital": a} for c, a in CAPITALS]}
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def task(name, body):
        (folder / f"{name}.yaml").write_text(
            f"task: fp8lm_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / name}.jsonl\n"
            f"test_split: test\n{body}")
    task("heldout", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                    "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    task("mc", 'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
               "doc_to_choice: choices\ndoc_to_target: gold\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    task("capitals", 'output_type: generate_until\ndoc_to_text: "What is the capital of {{country}}? Answer with one '
                     'word."\ndoc_to_target: "{{capital}}"\ngeneration_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 12\n'
                     "  do_sample: false\nmetric_list:\n  - metric: exact_match\n    ignore_case: true\n"
                     "    ignore_punctuation: true\n")
    return folder


def evaluate(folder, model, model_args, tasks, chat=False):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=1, log_samples=True,
                          task_manager=TaskManager(include_path=str(folder)), apply_chat_template=chat,
                          random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    return out["results"], out["samples"]


def api_args(proc, smollm2, endpoint):
    return (f"model=smol,base_url={proc.base_url}/v1/{endpoint},tokenizer={smollm2},num_concurrent=1,"
            f"max_retries=1,max_length={MAX_LENGTH},timeout=600")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def hf_results(smollm2, tasks):
    return evaluate(tasks, "hf", f"pretrained={smollm2},dtype=float32,max_length={MAX_LENGTH},device=cpu",
                    ["fp8lm_heldout", "fp8lm_mc"])


@pytest.fixture(scope="module")
def server(smollm2):
    """SmolLM2 unquantized, float32, served once for this module's tests."""
    with running_server(str(smollm2), "--max-model-len", "2048", "--served-model-name", "smol") as proc:
        yield proc


def test_local_completions_equal_the_hf_backend(smollm2, tasks, hf_results, server):
    results, samples = evaluate(tasks, "local-completions", api_args(server, smollm2, "completions"),
                                ["fp8lm_heldout", "fp8lm_mc"])
    ref, ref_samples = hf_results
    bpb, ref_bpb = results["fp8lm_heldout"]["bits_per_byte,none"], ref["fp8lm_heldout"]["bits_per_byte,none"]
    print(f"bits/byte: server {bpb:.6f}, lm-eval hf {ref_bpb:.6f}")
    # Measured 0.901895 vs 0.901269 (0.07%): lm-eval's API models cut rolling windows two tokens
    # shorter than its hf backend does, so the two score slightly different contexts.
    assert 0.3 < ref_bpb < 3 and abs(bpb / ref_bpb - 1) < 0.005
    assert results["fp8lm_mc"]["acc,none"] == ref["fp8lm_mc"]["acc,none"]
    assert results["fp8lm_mc"]["acc_norm,none"] == ref["fp8lm_mc"]["acc_norm,none"]
    for ours, theirs in zip(samples["fp8lm_mc"], ref_samples["fp8lm_mc"]):
        for (ll, _), (ref_ll, _) in zip(ours["filtered_resps"], theirs["filtered_resps"]):
            assert abs(ll - ref_ll) < 1e-3 * max(1.0, abs(ref_ll)), (ll, ref_ll)


def test_local_chat_completions_equal_the_hf_backend(smollm2, tasks, server):
    ref, ref_samples = evaluate(tasks, "hf", f"pretrained={smollm2},dtype=float32,device=cpu", ["fp8lm_capitals"],
                                chat=True)
    results, samples = evaluate(tasks, "local-chat-completions", api_args(server, smollm2, "chat/completions"),
                                ["fp8lm_capitals"], chat=True)
    ours = [s["resps"][0][0] for s in samples["fp8lm_capitals"]]
    theirs = [s["resps"][0][0] for s in ref_samples["fp8lm_capitals"]]
    print("replies:", ours)
    assert ours == theirs
    assert results["fp8lm_capitals"]["exact_match,none"] == ref["fp8lm_capitals"]["exact_match,none"]


def test_fp8_server_bits_per_byte_equal_fp8lm_scoring(smollm2, smollm2_fp8, tasks):
    """The FP8 model (default recipe, FP8 KV cache) served and scored by lm-eval gives the bits/byte
    fp8lm's own perplexity() gives on lm-eval's windows: the same engine, the same tokens."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    from transformers import AutoTokenizer

    fp8 = {"quantization": "inc", "quant_config": str(smollm2_fp8), "kv_cache_dtype": "fp8_inc"}
    env = {"QUANT_CONFIG": str(smollm2_fp8)}
    with running_server(str(smollm2), "--max-model-len", "2048", "--served-model-name", "smol", "--quantization",
                        "inc", "--kv-cache-dtype", "fp8_inc", env=env, timeout=600) as proc:
        results, _ = evaluate(tasks, "local-completions", api_args(proc, smollm2, "completions"), ["fp8lm_heldout"])
    text = read_text(None)
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    ids = tok.encode(text, add_special_tokens=False)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        ids, prefix_token=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
        max_seq_len=MAX_LENGTH - 2, context_len=1)]
    # ^ as lm-eval's API models cut them: they keep one token for generation (max_length - 1) and
    # make rolling windows one shorter again (its api_models.py)
    llm = LLM(str(smollm2), max_model_len=2048, skip_warmup=True, **fp8)
    nll, scored = 0.0, 0
    for context, continuation in windows:            # fp8lm's scoring (engine.score, as `fp8lm eval` uses)
        logprobs = torch.log_softmax(llm.engine.score(context + continuation).float(), -1)[len(context) - 1:]
        nll -= float(logprobs.gather(1, torch.tensor(continuation)[:, None]).sum())
        scored += len(continuation)
    assert scored == len(ids)
    ours = nll / math.log(2) / len(text.encode("utf-8"))
    served = results["fp8lm_heldout"]["bits_per_byte,none"]
    print(f"FP8 bits/byte: server via lm-eval {served:.6f}, fp8lm perplexity() {ours:.6f}")
    assert abs(served / ours - 1) < 1e-5
