"""Engine settings: one validated object, built from LLM(...) keywords or CLI flags."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields

import torch

from fp8lm.errors import FP8LMError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16,
          "float": torch.float32}
KV_CACHE_DTYPES = ("auto", "fp8_inc", "fp8", "fp8_e4m3")   # fp8 / fp8_e4m3: vLLM's names for an FP8 cache
QUANTIZATIONS = ("inc", "fp8")
DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30
DEFAULT_CHUNKED_BATCHED_TOKENS = 2048     # tokens per step (vLLM's default budget with chunked prefill)


def env_value(name: str, default: str | None = None) -> str | None:
    """FP8LM_<X>, or the seed's VLLM_<X> alias, so recipes written for vLLM work unchanged."""
    value = os.environ.get(f"FP8LM_{name}")
    if value is None:
        value = os.environ.get(f"VLLM_{name}")
    return default if value is None or value == "" else value


def env_flag(name: str) -> bool:
    return (env_value(name, "") or "").strip().lower() in ("1", "true", "yes", "on")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FP8LMError(f"device={device!r}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise FP8LMError(f"device={device!r}: allowed devices are cpu, cuda, cuda:N and auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise FP8LMError(f"dtype={dtype}: allowed dtypes are auto, float32, bfloat16, float16")
        return dtype
    if dtype == "auto":
        # float32 is the fast path on CPUs without AMX; bfloat16 on GPUs.
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise FP8LMError(f"dtype={dtype!r}: allowed dtypes are auto, float32, bfloat16, float16")
    return DTYPES[dtype]


def parse_memory(value: int | float | str | None, what: str) -> int | float | None:
    """Bytes (int or '4GiB'/'512MB') or a fraction in (0, 1]."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        if value is not None and value <= 0:
            raise FP8LMError(f"{what}={value!r}: must be positive (bytes, or a fraction in (0, 1])")
        return value
    text = str(value).strip().lower()
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        number = float(text)
    except ValueError:
        raise FP8LMError(f"{what}={value!r}: expected bytes (e.g. 4GiB, 512MB, 1000000) or a fraction in (0, 1]") from None
    return parse_memory(number if number <= 1 else int(number), what)


def option(default, help: str):
    """An engine option: one field with its default and its help, from which `LLM(**options)` and
    the CLI's flags are derived."""
    return field(default=default, metadata={"help": help})


@dataclass
class EngineConfig:
    """Every engine option, written once: `LLM(model, **options)` takes these fields, and the
    `generate`, `serve`, `eval` and `report` commands have one flag per field (--max-model-len, ...)."""
    model: str
    dtype: str | torch.dtype = option("auto", "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    device: str = option("auto", "auto, cpu, cuda, cuda:N")
    max_model_len: int | None = option(None, "the longest sequence (default: the model's max_position_embeddings)")
    block_size: int = option(16, "tokens per KV cache block")
    max_num_seqs: int = option(64, "sequences per step")
    max_num_batched_tokens: int | None = option(
        None, f"tokens per step (default: {DEFAULT_CHUNKED_BATCHED_TOKENS} with chunked prefill, else "
              f"max(max_model_len, {DEFAULT_CHUNKED_BATCHED_TOKENS}))")
    enable_chunked_prefill: bool = option(True, "split long prompts across steps, mixed with running decodes")
    prompt_tokens_while_decoding: int | None = option(
        None, "with chunked prefill: the most prompt tokens a step takes while sequences decode, so running streams "
              "keep moving during long prefills (default: `fp8lm serve` on the CPU 256, otherwise the whole step budget)")
    enable_prefix_caching: bool = option(True, "reuse the KV blocks of prompts' shared prefixes across requests")
    kv_cache_memory: int | float | str | None = option(
        None, f"bytes (e.g. 2GiB) or a fraction of free memory (default: {DEFAULT_CPU_KV_CACHE_BYTES >> 30} GiB on "
              "the CPU, 0.8 on CUDA)")
    num_kv_blocks: int | None = option(None, "the KV cache's size in blocks (instead of --kv-cache-memory)")
    kv_cache_dtype: str = option("auto", "auto (the model's dtype), or an FP8 cache: fp8_inc (scales from QUANT_CONFIG), "
                                         "fp8 / fp8_e4m3 (the same with inc; scale 1.0 with --quantization fp8)")
    quantization: str | None = option(None, "inc: FP8 with QUANT_CONFIG (calibrated); fp8: FP8 weights per tensor and "
                                            "inputs per token, computed at load and run time (no calibration)")
    quant_config: str | dict | None = option(None, "the QUANT_CONFIG file (default: the QUANT_CONFIG environment variable)")
    tensor_parallel_size: int = option(1, "ranks the model is sharded over (processes on this host, or torchrun's)")
    seed: int = option(0, "seed of sampling without a request seed")
    skip_warmup: bool | None = option(None, "skip the warm-up steps (default: FP8LM_SKIP_WARMUP)")
    iteration_timeout_s: float | None = option(
        None, "a step running longer fails the engine (default: FP8LM_ENGINE_ITERATION_TIMEOUT_S; offline none, "
              "`fp8lm serve` 60)")
    enforce_eager: bool = option(False, "CUDA: decode without CUDA graphs (default: graphs of batch sizes 1, 2, 4 and "
                                        "multiples of 8 up to max-num-seqs)")

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "tensor_parallel_size"):
            if int(getattr(self, name)) < 1:
                raise FP8LMError(f"{name}={getattr(self, name)!r}: must be at least 1")
        for name in ("max_model_len", "max_num_batched_tokens", "num_kv_blocks", "prompt_tokens_while_decoding"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise FP8LMError(f"{name}={value!r}: must be at least 1")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise FP8LMError(f"kv_cache_dtype={self.kv_cache_dtype!r}: allowed values are {', '.join(KV_CACHE_DTYPES)}")
        self.kv_cache_memory = parse_memory(self.kv_cache_memory, "kv_cache_memory")
        if self.skip_warmup is None:
            self.skip_warmup = env_flag("SKIP_WARMUP")
        if self.iteration_timeout_s is None:
            # Unset: no timeout offline (steps then run on the caller's thread); `fp8lm serve` uses 60 s.
            timeout = env_value("ENGINE_ITERATION_TIMEOUT_S")
            try:
                self.iteration_timeout_s = None if timeout is None else float(timeout)
            except ValueError:
                raise FP8LMError(f"FP8LM_ENGINE_ITERATION_TIMEOUT_S={timeout!r}: expected a number of seconds") from None
        self.quant = self._load_quant_config()

    @property
    def kv_cache_fp8(self) -> bool:
        return self.kv_cache_dtype != "auto"

    def _load_quant_config(self):
        if self.quantization not in (None, *QUANTIZATIONS):
            raise FP8LMError(f"quantization={self.quantization!r}: allowed values are {', '.join(QUANTIZATIONS)}")
        if self.quantization != "inc":
            if os.environ.get("QUANT_CONFIG"):
                log.warning("QUANT_CONFIG is set but quantization is not 'inc': it is not read")
            if self.kv_cache_dtype == "fp8_inc":
                raise FP8LMError("kv_cache_dtype='fp8_inc' needs quantization='inc' and a QUANT_CONFIG")
            return None
        from fp8lm.quant.config import check_stats_path_writable, load_quant_config

        quant = load_quant_config(self.quant_config)
        if quant.mode == "AUTO":
            from fp8lm.quant.measure_files import find_measurement

            # AUTO: quantize with the measurements if they exist, otherwise take them.
            found = find_measurement(quant.stats_prefix, quant.observer, 0, self.tensor_parallel_size)
            quant.mode = "QUANTIZE" if found else "MEASURE"
            log.info("QUANT_CONFIG mode AUTO -> %s", quant.mode)
        if quant.mode == "MEASURE":
            check_stats_path_writable(quant)   # before the model loads, not after a long calibration
        return quant

    def step_token_budget(self, max_model_len: int) -> int:
        """max_num_batched_tokens, or its default for a model of `max_model_len` tokens."""
        if self.max_num_batched_tokens:
            budget = self.max_num_batched_tokens
        elif self.enable_chunked_prefill:
            budget = DEFAULT_CHUNKED_BATCHED_TOKENS
        else:
            budget = max(max_model_len, DEFAULT_CHUNKED_BATCHED_TOKENS)
        if not self.enable_chunked_prefill and budget < max_model_len:
            raise FP8LMError(f"max_num_batched_tokens={budget} is smaller than max_model_len={max_model_len}: without "
                             "chunked prefill a full-length prompt could never be scheduled")
        return budget


ENGINE_OPTIONS = tuple(f.name for f in fields(EngineConfig) if f.name != "model")
