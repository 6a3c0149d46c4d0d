"""`fp8lm quantize`: QUANTIZE with the measurements, then write a compressed-tensors FP8 folder that
`LLM(folder)` (and vLLM, SGLang, transformers) load with neither QUANT_CONFIG nor measurements."""
from __future__ import annotations

from pathlib import Path

from fp8lm.entrypoints.llm import LLM
from fp8lm.errors import FP8LMError
from fp8lm.quant.checkpoint import save_quantized
from fp8lm.quant.measure_files import METADATA_KEY, read_files


def quantize_to_folder(model: str, output: Path, quant_config: str | dict | None = None,
                       kv_cache_dtype: str = "fp8_inc", dtype: str = "auto") -> Path:
    output = Path(output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FP8LMError(f"--output {output}: exists and is not an empty folder")
    llm = LLM(model, quantization="inc", quant_config=quant_config, kv_cache_dtype=kv_cache_dtype, dtype=dtype,
              device="cpu", max_model_len=64, max_num_seqs=1, skip_warmup=True)
    engine = llm.engine
    if engine.host.quantizer is None or engine.config.quant.mode != "QUANTIZE":
        raise FP8LMError("fp8lm quantize needs a QUANTIZE (or AUTO with measurements) QUANT_CONFIG")
    q = engine.host.quantizer
    measurement = {}
    if q.measurement_path is not None:
        measurement = read_files(q.measurement_path).get(METADATA_KEY) or {}
    provenance = {"scale_method": engine.config.quant.scale_method.name, "device_profile": q.profile.name,
                  "fp8_config": engine.config.quant.fp8_config, "compute_dtype": str(engine.host.dtype).replace("torch.", ""),
                  "measurement": measurement, "quant_config_source": engine.config.quant.source}
    return save_quantized(engine.host.model, engine.host.model_path, output, provenance)
