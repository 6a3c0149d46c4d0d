"""Shared fixtures. Tiny random Llama folders are built in-process (fast); SmolLM2 is converted
once per machine into the fp8lm cache and shared by every slow test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def write_char_tokenizer(folder: Path) -> int:
    """A character-level tokenizer (ids 3.. for printable ASCII); returns its vocabulary size."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE}))
    return len(vocab)


def make_tiny_llama(folder: Path, seed: int = 0, tokenizer: bool = True, max_shard_size: str | None = None,
                    **overrides) -> Path:
    """Saves a random transformers LlamaForCausalLM (and a char tokenizer) into `folder`."""
    return make_tiny(folder, "llama", seed, tokenizer, max_shard_size, **overrides)


def make_tiny(folder: Path, model_type: str, seed: int = 0, tokenizer: bool = True,
              max_shard_size: str | None = None, **overrides) -> Path:
    """Saves a random transformers model of `model_type` (llama, qwen2, qwen3, mistral, phi3) and a
    char tokenizer into `folder`. Norms and biases are random too, so that a wrong or missing one
    cannot hide behind all-ones or zeros."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_char_tokenizer(folder) if tokenizer else 128
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               initializer_range=0.1)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:       # effective scales 0.5..1.5 (Gemma's norms scale by 1 + weight)
                p.uniform_(0.5, 1.5).sub_(1.0 if model_type.startswith("gemma") else 0.0)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def measure_tiny(model_dir: Path, prefix: Path, prompts) -> Path:
    """MEASURE the tiny model over `prompts` (token id lists); returns the dump_stats_path prefix."""
    from fp8lm import LLM, SamplingParams

    llm = LLM(str(model_dir), quantization="inc", max_model_len=64,
              quant_config={"mode": "MEASURE", "dump_stats_path": str(prefix)})
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    llm.finalize_calibration()
    return prefix


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from fp8lm.model.registry import pull

    return pull("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """transformers' own model of the converted folder (float32), the independent reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


# SmolLM2 calibrated with fp8lm's default recipe once per run: 32 builtin samples continued to the
# recipe's default 16,384 tokens (max_seq_len 512 and 16 generated leave room for them). Every test
# that needs an FP8 SmolLM2 and does not test calibration itself shares these two.
SMOLLM2_CALIBRATION = dict(num_samples=32, max_seq_len=512, max_tokens=16)


@dataclass
class CliCalibration:
    quant_config: Path      # <folder>/maxabs_quant_cpu.json
    stdout: str


def run_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)` once per test run, its folder shared by every pytest-xdist worker: the first
    worker to get here builds it under a file lock, the others wait for it and reuse it."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base   # the run's folder, not the worker's
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def smollm2_fp8(smollm2, tmp_path_factory) -> Path:
    """The float32 calibration through the Python API; returns its QUANT_CONFIG path."""
    from fp8lm.entrypoints.calibrate import calibrate

    def build(folder):
        calibrate(str(smollm2), "builtin", folder, dtype="float32", use_tqdm=False, **SMOLLM2_CALIBRATION)

    return run_once(tmp_path_factory, "cal-float32", build) / "maxabs_quant_cpu.json"


@pytest.fixture(scope="session")
def smollm2_fp8_bfloat16(smollm2, tmp_path_factory) -> CliCalibration:
    """The bfloat16 calibration through the CLI (`fp8lm calibrate ... --dtype bfloat16`)."""
    def build(folder):
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMOLLM2_CALIBRATION.items()]
        result = subprocess.run([sys.executable, "-m", "fp8lm", "calibrate", str(smollm2), "--output", str(folder),
                                 "--dtype", "bfloat16", *flags], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr
        folder.with_name(f"{folder.name}.stdout").write_text(result.stdout)

    folder = run_once(tmp_path_factory, "cal-bfloat16", build)
    return CliCalibration(folder / "maxabs_quant_cpu.json", folder.with_name(f"{folder.name}.stdout").read_text())


def shared_calibration_of(item) -> str | None:
    """The shared calibration fixture a test needs (tests/test_smollm2_fp8.py picks one by its
    `calibration` parameter), or None."""
    callspec = getattr(item, "callspec", None)
    param = callspec.params.get("calibration") if callspec is not None else None
    if "smollm2_fp8" in item.fixturenames or param == "float32":
        return "smollm2_fp8"
    if "smollm2_fp8_bfloat16" in item.fixturenames or param == "bfloat16":
        return "smollm2_fp8_bfloat16"
    return None


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's load scheduling each worker first gets a batch of consecutive tests
    (a quarter of its share). One user of each shared calibration heads a worker's first batch, so
    the two calibrations build at once, one per worker; the other users run last, when both are
    built, instead of a worker waiting for the other's calibration."""
    users = [item for item in items if shared_calibration_of(item) is not None]
    firsts = {}
    for item in users:
        firsts.setdefault(shared_calibration_of(item), item)
    ordered = [item for item in items if shared_calibration_of(item) is None]
    workers = config.workerinput["workercount"] if hasattr(config, "workerinput") else 1
    batch = max(len(items) // workers // 4, 2)
    for k, first in enumerate(firsts.values()):
        ordered.insert(min(k * batch, len(ordered)) if k < workers else 0, first)
    items[:] = ordered + [item for item in users if item not in firsts.values()]
