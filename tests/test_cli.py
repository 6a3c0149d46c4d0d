"""The `fp8lm` command: bad input gives one clear line on stderr and exit status 2."""
import json
import os
import subprocess
import sys

import pytest

from fp8lm.model.gguf_convert import convert_gguf
from fp8lm.errors import ModelLoadError


def fp8lm(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fp8lm", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fp8lm: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in errors[0]


def test_missing_path(tmp_path):
    assert_one_line_error(fp8lm("generate", str(tmp_path / "nope"), "--prompt", "x"), "nope", "no such model")


def test_folder_without_config(tmp_path):
    assert_one_line_error(fp8lm("generate", str(tmp_path), "--prompt", "x"), str(tmp_path), "no config.json")


def test_gpt2_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert_one_line_error(fp8lm("generate", str(tmp_path), "--prompt", "x"), "config.json", "GPT2LMHeadModel")


def test_truncated_safetensors(tmp_path, tiny_model):
    folder = tmp_path / "broken"
    folder.mkdir()
    for f in tiny_model.iterdir():
        data = f.read_bytes()
        (folder / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    assert_one_line_error(fp8lm("generate", str(folder), "--prompt", "x"), "model.safetensors", "corrupt or truncated")


def test_corrupt_gguf_leaves_no_folder(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    cache = tmp_path / "cache"
    assert_one_line_error(fp8lm("generate", str(bad), "--prompt", "x", env={"FP8LM_CACHE": str(cache)}),
                          "bad.gguf", "GGUF")
    leftovers = list(cache.rglob("*")) if cache.exists() else []
    assert not [p for p in leftovers if p.is_file()]


def test_bad_flag_value(tiny_model):
    assert_one_line_error(fp8lm("generate", str(tiny_model), "--prompt", "x", "--dtype", "int3"), "int3", "float32")


def test_debug_shows_traceback(tmp_path):
    result = fp8lm("--debug", "generate", str(tmp_path / "nope"), "--prompt", "x")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_generate_prints_completion(tiny_model):
    result = fp8lm("generate", str(tiny_model), "--prompt", "ab", "--max-tokens", "5",
                   env={"FP8LM_SKIP_WARMUP": "1"})
    assert result.returncode == 0, result.stderr
    from fp8lm import LLM, SamplingParams

    expected = LLM(str(tiny_model), skip_warmup=True).generate("ab", SamplingParams(temperature=0, max_tokens=5),
                                                                use_tqdm=False)[0].outputs[0].text
    assert result.stdout == expected + "\n"


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    """A failure after the weights are written leaves neither the destination nor a temp folder."""
    import fp8lm.model.gguf_convert as conv

    monkeypatch.setattr(conv, "open_gguf", lambda path: object())
    monkeypatch.setattr(conv, "gguf_config", lambda reader, path: {"bos_token_id": 1, "eos_token_id": 2})
    monkeypatch.setattr(conv, "gguf_tensors", lambda reader, cfg, path: {})

    def boom(reader, cfg, path, dest):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "save_gguf_tokenizer", boom)
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"x")
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(fake, tmp_path / "cache" / "m")
    assert list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(ModelLoadError, match="no such GGUF"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "cache" / "n")


def test_enforce_eager_reaches_the_engine_config():
    import argparse

    from fp8lm.engine.config import EngineConfig
    from fp8lm.entrypoints.cli import add_engine_args, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    for argv, expected in ((["m"], False), (["m", "--enforce-eager"], True)):
        args = parser.parse_args(argv)
        assert EngineConfig(model="m", **engine_kwargs(args)).enforce_eager is expected


def test_an_interrupted_assembly_leaves_no_gguf(tmp_path, monkeypatch):
    """A chunked GGUF (gemma3-270m's packages) is joined under a temporary name: a failure midway
    leaves neither the file nor the temporary one, and the next call assembles again."""
    import sys
    import types

    import fp8lm.model.registry as registry

    calls = []

    def assemble(path, overwrite=False):
        calls.append(path)
        path.write_bytes(b"half")
        if len(calls) == 1:
            raise KeyboardInterrupt
        path.write_bytes(b"whole")
        return path

    monkeypatch.setitem(sys.modules, "fake_chunks", types.SimpleNamespace(assemble=assemble))
    monkeypatch.setitem(registry.KNOWN_MODELS, "fake", registry.KnownModel(("fake-chunks",), "fake_chunks"))
    monkeypatch.setattr(registry, "_package_dir", lambda module: tmp_path)
    monkeypatch.setattr(registry, "_distribution_installed", lambda name: True)
    monkeypatch.setenv("FP8LM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):
        registry.gguf_file("fake")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
    assert registry.gguf_file("fake").read_bytes() == b"whole" and len(calls) == 2
