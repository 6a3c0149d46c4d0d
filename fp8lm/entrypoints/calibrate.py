"""`fp8lm calibrate`: MEASURE over a dataset, then a ready QUANTIZE config pointing at the files."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fp8lm.engine.sampling_params import SamplingParams
from fp8lm.entrypoints.llm import LLM
from fp8lm.errors import FP8LMError
from fp8lm.fp8.formats import profile_for
from fp8lm.engine.config import resolve_device
from fp8lm.model.config import ModelConfig
from fp8lm.model.registry import resolve_model
from fp8lm.quant.dataset import load_samples

log = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    measurement_files: list[Path]
    quant_config: Path
    measure_config: Path
    num_samples: int
    num_truncated: int
    blocklist: list[str]


def write_json_atomic(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=4)
    os.chmod(tmp, 0o644)   # mkstemp makes it private
    os.replace(tmp, path)


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise FP8LMError(f"--output {folder}: not writable ({e.strerror or e})") from None


def calibrate(model: str, dataset: str, output: Path, num_samples: int = 512, max_seq_len: int = 1024,
              batch_size: int = 32, max_tokens: int = 32, device: str = "auto", dtype: str = "auto",
              use_tqdm: bool = True, quant_overrides: dict | None = None,
              max_ppl_increase: float | None = None, tensor_parallel_size: int = 1) -> CalibrationResult:
    """MEASURE over the dataset; with `max_ppl_increase` (%), also a per-layer sensitivity pass on
    the calibration samples whose blocklist goes into the generated QUANTIZE config."""
    if num_samples < 1:
        raise FP8LMError(f"--num-samples {num_samples}: must be at least 1")
    samples = load_samples(dataset, num_samples)           # dataset errors before the model loads
    output = Path(output).expanduser().resolve()
    check_writable(output)
    tag = profile_for(resolve_device(device)).name
    limit = ModelConfig.from_folder(resolve_model(model)).max_position_embeddings - max_tokens
    if max_seq_len > limit:
        log.info("--max-seq-len %d lowered to %d: the model holds %d positions", max_seq_len, limit, limit + max_tokens)
        max_seq_len = limit
    prefix = output / "inc_output"
    measure_cfg = {"method": "HOOKS", "mode": "MEASURE", "observer": "maxabs", "dump_stats_path": str(prefix)}
    quant_cfg = {"mode": "QUANTIZE", "observer": "maxabs", "scale_method": "maxabs_hw",
                 "allowlist": {"types": [], "names": []}, "blocklist": {"types": [], "names": []},
                 "dump_stats_path": str(prefix), **(quant_overrides or {})}

    llm = LLM(model, device=device, dtype=dtype, quantization="inc", quant_config=measure_cfg,
              max_model_len=max_seq_len + max_tokens, max_num_seqs=batch_size,
              tensor_parallel_size=tensor_parallel_size)
    try:
        prompts, truncated = _tokenize(llm, samples, max_seq_len)
        if truncated:
            log.warning("%d of %d samples were longer than --max-seq-len %d tokens and were truncated",
                        truncated, len(samples), max_seq_len)
        llm.generate([{"prompt_token_ids": p} for p in prompts],
                     SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=use_tqdm)
        files = llm.finalize_calibration()
    except BaseException:
        llm.engine.discard_measurement()   # an interrupted calibration writes nothing
        raise
    finally:
        llm.engine.shutdown()
    del llm
    blocklist: list[str] = []
    if max_ppl_increase is not None:
        blocklist = suggest_blocklist(model, quant_cfg, prompts, max_ppl_increase, device, dtype)
        quant_cfg["blocklist"]["names"] = list(quant_cfg["blocklist"]["names"]) + blocklist
    measure_path, quant_path = output / f"maxabs_measure_{tag}.json", output / f"maxabs_quant_{tag}.json"
    write_json_atomic(measure_path, measure_cfg)
    write_json_atomic(quant_path, quant_cfg)
    return CalibrationResult(files, quant_path, measure_path, len(prompts), truncated, blocklist)


def suggest_blocklist(model: str, quant_cfg: dict, prompts: list[list[int]], max_increase_pct: float,
                      device: str, dtype: str, max_windows: int = 16) -> list[str]:
    from fp8lm.eval.report import sensitivity

    windows = [p for p in prompts if len(p) >= 2][:max_windows]
    longest = max(len(w) for w in windows)
    common = dict(device=device, dtype=dtype, max_model_len=longest, max_num_seqs=1, skip_warmup=True,
                  num_kv_blocks=-(-longest // 16))
    reference = LLM(model, **common)
    candidate = LLM(model, quantization="inc", quant_config=quant_cfg, **common)
    result = sensitivity(reference.engine, candidate.engine, windows, max_increase_pct)
    log.info("sensitivity: all FP8 %+.2f%%, keeping %s in high precision %+.2f%% (calibration samples)",
             result.all_fp8_pct, ", ".join(result.blocklist) or "nothing", result.with_blocklist_pct)
    return result.blocklist_names()


def _tokenize(llm: LLM, samples, max_seq_len: int) -> tuple[list[list[int]], int]:
    tok = llm.get_tokenizer()
    if tok is None:
        raise FP8LMError("calibration needs a model with a tokenizer")
    prompts, truncated = [], 0
    for sample in samples:
        if isinstance(sample, str):
            ids = tok.encode(sample)
        else:
            ids = tok.encode(tok.apply_chat_template(sample), add_special_tokens=False)
        if len(ids) > max_seq_len:
            ids, truncated = ids[:max_seq_len], truncated + 1
        prompts.append(ids)
    return prompts, truncated
