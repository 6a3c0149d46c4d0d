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
from fp8lm.files import replace_durably, undone_on_failure
from fp8lm.fp8.cpu_kernels import requested_isa
from fp8lm.fp8.formats import profile_for
from fp8lm.engine.config import resolve_device
from fp8lm.model.config import ModelConfig
from fp8lm.model.fingerprint import model_fingerprint
from fp8lm.model.registry import resolve_model
from fp8lm.model.tokenizer import Tokenizer
from fp8lm.quant.config import load_quant_config
from fp8lm.quant.dataset import load_samples
from fp8lm.quant.quantize import planned_linears
from fp8lm.quant.recipe import RECIPES, fp8lm_recipe, inc_recipe, statistics_tensors
from fp8lm.quant.statistics import StatisticsCollector, save_statistics, stats_path

log = logging.getLogger(__name__)
STATISTICS_TOKENS = 16384
PREFILL = SamplingParams(temperature=0, max_tokens=1)    # a pass over the prompts: the one token is not used


@dataclass
class CalibrationResult:
    measurement_files: list[Path]
    quant_config: Path
    measure_config: Path
    num_samples: int
    num_truncated: int
    blocklist: list[str]
    texts: list[list[int]]          # the token ids the statistics pass and the budget saw (prompts, continued)


# What a calibration writes into --output (hidden temporaries too): measurement files and their
# backups, fp8lm's statistics, the MEASURE / QUANTIZE configs. A failed run leaves them as they were.
CALIBRATION_FILES = ("inc_output", "backup_", "maxabs_")


def write_json_atomic(path: Path, data) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=4)
    os.chmod(tmp, 0o644)   # mkstemp makes it private
    replace_durably([(Path(tmp), path)])


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
              max_ppl_increase: float | None = None, tensor_parallel_size: int = 1,
              recipe: str = "fp8lm", max_weight_share: float = 0.15, max_attention_share: float = 0.3,
              exact_first_token: bool | None = None, statistics_tokens: int | None = None) -> CalibrationResult:
    """MEASURE over the dataset, then the QUANTIZE config of `recipe`: "inc" (INC's maxabs_hw) or
    "fp8lm" (accuracy-first; also a statistics pass that writes <prefix>_fp8lm_stats.safetensors).
    With `max_ppl_increase` (%), a sensitivity pass on the calibration samples chooses what stays in
    high precision (the config's blocklist). `exact_first_token`: the fp8lm recipe's option of that
    name (on by default; the budget is measured with it); None keeps the recipe's default.
    `statistics_tokens`: the fewest tokens the fp8lm recipe measures on (see `continuation_params`;
    None: STATISTICS_TOKENS)."""
    if num_samples < 1:
        raise FP8LMError(f"--num-samples {num_samples}: must be at least 1")
    if recipe not in RECIPES:
        raise FP8LMError(f"--recipe {recipe!r}: allowed: {', '.join(RECIPES)}")
    if max_ppl_increase is not None and not max_ppl_increase >= 0:
        raise FP8LMError(f"--max-ppl-increase {max_ppl_increase}: a perplexity increase in percent, >= 0")
    statistics_tokens = STATISTICS_TOKENS if statistics_tokens is None else statistics_tokens
    if statistics_tokens < 0:
        raise FP8LMError(f"--statistics-tokens {statistics_tokens}: a number of tokens, >= 0")
    if not 0 <= max_weight_share <= 1:
        raise FP8LMError(f"max_weight_share {max_weight_share}: a share of the decoder's weights, 0..1")
    if not 0 <= max_attention_share <= 1:
        raise FP8LMError(f"max_attention_share {max_attention_share}: a share of the decoder's layers, 0..1")
    samples = load_samples(dataset, num_samples)           # dataset errors before the model loads
    tag = profile_for(resolve_device(device)).name
    if tag.startswith("gaudi") or (quant_overrides or {}).get("device_for_scales", "").lower().startswith("gaudi"):
        recipe = "inc"       # Gaudi applies only its hardware's power-of-two scales
    if exact_first_token and recipe != "fp8lm":
        raise FP8LMError(f"--exact-first-token is an option of fp8lm's recipe; this calibration writes INC's "
                         f"(--recipe {recipe}, profile {tag})")
    output = Path(output).expanduser().resolve()
    check_writable(output)
    requested_isa()            # a bad FP8LM_CPU_KERNELS, before the model loads
    with undone_on_failure(output, CALIBRATION_FILES):
        limit = ModelConfig.from_folder(resolve_model(model)).max_position_embeddings - max_tokens
        if max_seq_len > limit:
            log.info("--max-seq-len %d lowered to %d: the model holds %d positions", max_seq_len, limit,
                     limit + max_tokens)
            max_seq_len = limit
        prefix = output / "inc_output"
        measure_cfg = {"method": "HOOKS", "mode": "MEASURE", "observer": "maxabs", "dump_stats_path": str(prefix)}
        quant_cfg = {**(fp8lm_recipe(prefix) if recipe == "fp8lm" else inc_recipe(prefix)), **(quant_overrides or {})}
        if exact_first_token is not None and recipe == "fp8lm":
            quant_cfg["fp8lm"] = {**quant_cfg["fp8lm"], "exact_first_token": exact_first_token}

        prompts, truncated = tokenize_samples(resolve_model(model), samples, max_seq_len)
        if truncated:
            log.warning("%d of %d samples were longer than --max-seq-len %d tokens and were truncated",
                        truncated, len(samples), max_seq_len)
        engine = dict(device=device, dtype=dtype, max_model_len=max_seq_len + max_tokens, max_num_seqs=batch_size,
                      tensor_parallel_size=tensor_parallel_size, skip_warmup=True)
        if recipe == "fp8lm":
            params = continuation_params(prompts, statistics_tokens, max_tokens, max_seq_len + max_tokens)
            texts = continue_texts(LLM(model, **engine), prompts, params, use_tqdm)
            # What generating them ran through the model: all but each text's last token.
            ran = [t[:-1] if len(t) > len(p) else t for t, p in zip(texts, prompts)]
            measuring = LLM(model, quantization="inc", quant_config=measure_cfg, **engine)
            if tensor_parallel_size > 1:
                log.warning("the statistics pass runs on one rank; measured on %d, the config uses exact scales, K/V "
                            "and softmax options only (no rounded weights, searched scales or K smoothing)",
                            tensor_parallel_size)
                quant_cfg["fp8lm"] = {**quant_cfg["fp8lm"], **fp8lm_recipe(prefix, False)["fp8lm"]}
                files = measure(measuring, ran, PREFILL, use_tqdm)
            elif quant_cfg["fp8lm"].get("searched_scales", False):
                files = measure(measuring, ran, PREFILL, use_tqdm)      # the search needs the input scales it sets
                collect_statistics(model, quant_cfg, ran, device, dtype, batch_size, use_tqdm)
            else:
                # One pass: the statistics of the high-precision model, observed in MEASURE's own prefill.
                planned = planned_linears(measuring.engine.host.model, load_quant_config(quant_cfg),
                                          measuring.engine.host.device)
                collector = StatisticsCollector(measuring.engine.host.model, search_scales=False, planned=planned)
                try:
                    files = measure(measuring, ran, PREFILL, use_tqdm)
                finally:
                    collector.detach()
                write_statistics(model, quant_cfg, collector)
            log.info("measured on %d tokens: the calibration prompts' %d and the model's continuations",
                     sum(map(len, texts)), sum(map(len, prompts)))
        else:
            texts = prompts
            files = measure(LLM(model, quantization="inc", quant_config=measure_cfg, **engine), prompts,
                            SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm)
        blocklist: list[str] = []
        if max_ppl_increase is not None:
            blocklist = suggest_blocklist(model, quant_cfg, texts, max_ppl_increase, device, dtype, max_weight_share,
                                          max_attention_share)
            quant_cfg["blocklist"]["names"] = list(dict.fromkeys([*quant_cfg["blocklist"]["names"], *blocklist]))
        measure_path, quant_path = output / f"maxabs_measure_{tag}.json", output / f"maxabs_quant_{tag}.json"
        write_json_atomic(measure_path, measure_cfg)
        write_json_atomic(quant_path, quant_cfg)
        return CalibrationResult(files, quant_path, measure_path, len(prompts), truncated, blocklist, texts)


def continuation_params(prompts: list[list[int]], min_tokens: int, max_tokens: int,
                        max_model_len: int) -> list[SamplingParams]:
    """How the fp8lm recipe's calibration text is generated: each prompt continued by the unquantized model
    (sampled at temperature 1, top-p 0.95, seed = its index, through end-of-sequence tokens: what
    follows one is the model's text too) by at least `max_tokens` and until together they hold about
    `min_tokens`, each within `max_model_len`. Both MEASURE (the maxima, hence the scales) and the
    statistics pass then run over that text in prefills. From few tokens the scales miss the larger activations of other text (clipped there),
    and GPTQ, fitting each Linear's output error on its inputs' second moments, fits those tokens'
    noise where they are fewer than its input channels (the builtin set: ~1,300 tokens; down_proj:
    1,536 inputs)."""
    each = max(max_tokens, -(-(min_tokens - sum(map(len, prompts))) // len(prompts)))
    return [SamplingParams(temperature=1.0, top_p=0.95, seed=i, ignore_eos=True,
                           max_tokens=min(each, max_model_len - len(p))) for i, p in enumerate(prompts)]


def continue_texts(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], use_tqdm: bool) -> list[list[int]]:
    """Each prompt followed by the model's continuation, generated by the plain engine (no observer
    runs while it generates: MEASURE and the statistics pass see the finished text in prefills)."""
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=use_tqdm)
    finally:
        llm.engine.shutdown()
    return [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outputs)]


def measure(llm: LLM, prompts: list[list[int]], params: SamplingParams, use_tqdm: bool) -> list[Path]:
    """MEASURE mode over `prompts` generated with `params`; the measurement files (none if interrupted)."""
    try:
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=use_tqdm)
        return llm.finalize_calibration()
    except BaseException:
        llm.engine.discard_measurement()   # an interrupted calibration writes nothing
        raise
    finally:
        llm.engine.shutdown()


def collect_statistics(model: str, quant_cfg: dict, prompts: list[list[int]], device: str, dtype: str,
                       batch_size: int, use_tqdm: bool = False) -> Path:
    """The statistics pass: `prompts` (the tokens MEASURE ran; prefills, batched) through the model
    quantized with the recipe's plain scales, then rounded weights, searched scales and key offsets
    into the statistics file."""
    plain = {**quant_cfg, "fp8lm": {**quant_cfg["fp8lm"], **fp8lm_recipe(Path(), False)["fp8lm"]}}
    # No prefix caching: a prefix the prompts share is statistics of every one of them.
    llm = LLM(model, device=device, dtype=dtype, quantization="inc", quant_config=plain, kv_cache_dtype="fp8_inc",
              max_model_len=max(map(len, prompts)) + 1, max_num_seqs=batch_size, skip_warmup=True,
              enable_prefix_caching=False)
    collector = StatisticsCollector(llm.engine.host.model, search_scales=quant_cfg["fp8lm"].get("searched_scales", False))
    try:
        llm.generate([{"prompt_token_ids": p} for p in prompts], PREFILL, use_tqdm=use_tqdm)
    finally:
        collector.detach()
        llm.engine.shutdown()
    return write_statistics(model, quant_cfg, collector)


def write_statistics(model: str, quant_cfg: dict, collector: StatisticsCollector) -> Path:
    """The statistics file of a finished statistics pass (GPTQ's rounded weights among them)."""
    folder = resolve_model(model)
    tensors = statistics_tensors(collector, folder)
    fingerprint = model_fingerprint(folder)
    path = stats_path(Path(quant_cfg["dump_stats_path"]))
    save_statistics(path, tensors, {"model": str(fingerprint.get("name")),
                                    "weights_checksum": str(fingerprint.get("weights_checksum"))})
    log.info("wrote fp8lm statistics of %d modules to %s", len(collector.linears) + len(collector.keys), path)
    return path


def suggest_blocklist(model: str, quant_cfg: dict, prompts: list[list[int]], max_increase_pct: float,
                      device: str, dtype: str, max_weight_share: float, max_attention_share: float,
                      max_windows: int = 32) -> list[str]:
    """Units kept in high precision (Linears, and layers' FP8 attention with their K/V cache) until the
    calibration text's perplexity rises at most `max_increase_pct` (`sensitivity`: ranked on half
    the windows, checked on the other half)."""
    from fp8lm.eval.report import is_attention_unit, sensitivity

    windows = calibration_windows(prompts, window=256, max_windows=max_windows)
    longest = max(len(w) for w in windows)
    common = dict(device=device, dtype=dtype, max_model_len=longest, max_num_seqs=1, skip_warmup=True,
                  num_kv_blocks=-(-longest // 16))
    reference = LLM(model, **common)
    candidate = LLM(model, quantization="inc", quant_config=quant_cfg, kv_cache_dtype="fp8_inc", **common)
    result = sensitivity(reference.engine, candidate.engine, windows, max_increase_pct, max_weight_share,
                         max_attention_share)
    kept = ", ".join(f"{u} (KL -{result.unit_gain_kl[u]:.4f}, {100 * result.unit_share[u]:.1f}% of the "
                     f"{'layers' if is_attention_unit(u) else 'weights'})" for u in result.blocklist) or "nothing"
    log.info("mixed precision: all FP8 %+.2f%%; keeping %s in high precision: %+.2f%% (%+.2f%% at the "
             "one-sided 95%% bound) with %.1f%% of the decoder's Linear weights and %.0f%% of its layers' "
             "attention and K/V cache high (the calibration windows the units were not ranked on)",
             result.all_fp8_pct, kept, result.with_blocklist_pct, result.with_blocklist_bound_pct,
             100 * result.kept_share, 100 * result.kept_attention_share)
    if result.with_blocklist_bound_pct > max_increase_pct:
        log.warning("--max-ppl-increase %.2f not reached: the units kept are the best found within %.0f%% of the "
                    "decoder's Linear weights and %.0f%% of its layers' attention, at %+.2f%% (one-sided 95%% "
                    "bound, on calibration text)", max_increase_pct, 100 * max_weight_share,
                    100 * max_attention_share, result.with_blocklist_bound_pct)
    return result.blocklist_names()


def calibration_windows(prompts: list[list[int]], window: int, max_windows: int) -> list[list[int]]:
    """The prompts as one token stream cut into windows, as held-out text is scored (short prompts
    alone would weigh a sequence's first tokens, where attention sinks are, far above real use);
    at most `max_windows`, spread evenly over the stream."""
    from fp8lm.eval.perplexity import split_windows

    windows = split_windows([t for p in prompts for t in p], window)
    return windows[::max(1, -(-len(windows) // max_windows))]


def tokenize_samples(folder: Path, samples, max_seq_len: int) -> tuple[list[list[int]], int]:
    """The samples' token ids (chat samples through the chat template), each cut to max_seq_len;
    and how many were cut."""
    tok = Tokenizer.from_folder(folder)
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
