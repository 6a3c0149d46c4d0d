"""QUANT_CONFIG: the JSON file of the INC FP8 flow, loaded and validated before the model loads."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fp8lm.errors import FP8LMError
from fp8lm.files import read_json
from fp8lm.fp8.formats import FP8_DTYPES, PROFILES
from fp8lm.fp8.scale_methods import ScaleMethodConfig, parse_scale_method

log = logging.getLogger(__name__)

MODES = ("MEASURE", "QUANTIZE", "LOAD", "AUTO")
OBSERVERS = ("maxabs", "maxabs_per_channel")
HP_DTYPES = {"BF16": torch.bfloat16, "FP16": torch.float16, "FP32": torch.float32}
MEASURE_EXCLUDE = ("NONE", "INPUT", "OUTPUT", "PARAMS", "ALL")
SCALE_FORMATS = ("CONST", "SCALAR")
BOOL_KEYS = ("ignore_modules_wo_measures", "recalc_scales", "use_qdq", "fake_quant", "measure_on_hpu",
             "dynamic_quantization", "seperate_measure_files", "row_parallel_linear_allreduce_quantization",
             "allow_measurement_mismatch")   # the last one is fp8lm's: use measurements taken elsewhere
# Accepted for compatibility with existing files; they have no effect (as in INC itself).
LEGACY_KEYS = ("method", "quantize_weight", "measure_device")
KNOWN_KEYS = {"mode", "observer", "scale_method", "allowlist", "blocklist", "whitelist", "blacklist",
              "dump_stats_path", "fp8_config", "hp_dtype", "measure_exclude", "scale_format", "device_for_scales",
              "scale_params", "calibration_sample_interval", "fp8lm", *BOOL_KEYS, *LEGACY_KEYS}
SOFTMAX_SCALES = ("measured", "bound")


@dataclass(frozen=True)
class Fp8lmOptions:
    """fp8lm's own block of a QUANT_CONFIG ("fp8lm": {...}; INC warns that it does not know the key and
    ignores it). Statistics come from `<dump_stats_path>_fp8lm_stats.safetensors` (fp8lm calibrate)."""
    rounded_weights: bool = False           # error-compensating (GPTQ) FP8 weights and their scales
    searched_scales: bool = False           # input scales chosen by output error among a few candidates
    k_smoothing: bool = False               # keys minus a calibrated per-channel offset (softmax-exact)
    softmax_scale: str = "measured"         # "bound": probabilities <= 1 map onto the full FP8 range
    attention_scales_from_cache: bool = False   # q·k and p·v read K/V with the FP8 cache's own scale
    lm_head_bfloat16: bool = False          # a kept float32 LM head's weight rounded to bfloat16 values
    per_head_attention_scales: bool = False  # q·k's queries, K and V (and their caches): one scale per KV head
    exact_first_token: bool = False          # each sequence's first token's K/V, q·k and p·v in high precision

    @property
    def uses_statistics(self) -> bool:
        return any(getattr(self, name) for name in STATISTICS_OPTIONS)

    def without_statistics(self) -> Fp8lmOptions:
        return dataclasses.replace(self, **{name: False for name in STATISTICS_OPTIONS})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# The options that read the statistics file (`fp8lm calibrate`'s statistics pass computes it).
STATISTICS_OPTIONS = ("rounded_weights", "searched_scales", "k_smoothing", "per_head_attention_scales")


def _fp8lm_options(value, where: str) -> Fp8lmOptions:
    if value is None:
        return Fp8lmOptions()
    known = Fp8lmOptions.__dataclass_fields__
    if not isinstance(value, dict) or set(value) - set(known):
        unknown = sorted(set(value) - set(known)) if isinstance(value, dict) else value
        raise FP8LMError(f"{where}: key 'fp8lm': unknown options {unknown!r}; allowed: {', '.join(known)}")
    for key, v in value.items():
        if key == "softmax_scale":
            if v not in SOFTMAX_SCALES:
                raise FP8LMError(f"{where}: key 'fp8lm.softmax_scale': value {v!r} is not allowed; allowed: "
                                 f"{', '.join(SOFTMAX_SCALES)}")
        elif not isinstance(v, bool):
            raise FP8LMError(f"{where}: key 'fp8lm.{key}': value {v!r} is not allowed; allowed: true, false")
    return Fp8lmOptions(**value)


@dataclass(frozen=True)
class ModuleFilter:
    types: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.types and not self.names

    def matches(self, name: str, types: tuple[str, ...]) -> bool:
        return bool(set(types) & set(self.types)) or any(re.search(p, name) for p in self.names)


@dataclass
class QuantConfig:
    mode: str = "QUANTIZE"
    observer: str = "maxabs"
    scale_method: ScaleMethodConfig = field(default_factory=lambda: parse_scale_method("maxabs_hw", "default"))
    allowlist: ModuleFilter = field(default_factory=ModuleFilter)
    blocklist: ModuleFilter = field(default_factory=ModuleFilter)
    dump_stats_path: str = "./hqt_output/measure"
    fp8_config: str = "E4M3"
    hp_dtype: torch.dtype | None = None
    measure_exclude: str = "OUTPUT"
    scale_format: str = "SCALAR"
    device_for_scales: str | None = None
    scale_params: dict[str, Any] = field(default_factory=dict)
    calibration_sample_interval: int = 0
    flags: dict[str, bool] = field(default_factory=dict)
    fp8lm: Fp8lmOptions = field(default_factory=Fp8lmOptions)
    source: str = "<dict>"
    base_dir: Path = field(default_factory=Path.cwd)

    @property
    def fp8_dtype(self) -> torch.dtype:
        return FP8_DTYPES[self.fp8_config]

    def flag(self, key: str) -> bool:
        return self.flags.get(key, False)

    def should_quantize(self, name: str, types: tuple[str, ...]) -> bool:
        """INC's rule: allowed by an empty allowlist or a matching type/name, and not blocklisted."""
        allowed = self.allowlist.empty or self.allowlist.matches(name, types)
        return allowed and not self.blocklist.matches(name, types)

    @property
    def stats_prefix(self) -> Path:
        """dump_stats_path; a relative one resolves against the working directory at load, as in INC."""
        p = Path(self.dump_stats_path).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def measures_inputs(self) -> bool:
        return self.measure_exclude not in ("INPUT", "ALL")

    def measures_outputs(self) -> bool:
        return self.measure_exclude not in ("OUTPUT", "ALL")

    def measures_params(self) -> bool:
        return self.measure_exclude not in ("PARAMS", "ALL")


def check_stats_path_writable(config: QuantConfig) -> None:
    folder = config.stats_prefix.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fp8lm-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FP8LMError(f"{config.source}: key 'dump_stats_path': {config.dump_stats_path!r} is not writable "
                         f"({e.strerror or e})") from None


def load_quant_config(source: str | os.PathLike | dict | None) -> QuantConfig:
    """From a path, a dict, or (source None) the QUANT_CONFIG environment variable."""
    if source is None:
        source = os.environ.get("QUANT_CONFIG")
        if not source:
            raise FP8LMError("quantization='inc' needs a QUANT_CONFIG: set the QUANT_CONFIG environment variable "
                             "to a JSON file, or pass quant_config=")
    if isinstance(source, dict):
        return parse_quant_config(source, "<quant_config dict>", Path.cwd())
    path = Path(source).expanduser()
    data = read_json(path, "QUANT_CONFIG")
    if not isinstance(data, dict):
        raise FP8LMError(f"QUANT_CONFIG {path}: expected a JSON object at the top level")
    return parse_quant_config(data, str(path), Path.cwd())


def _choice(data: dict, key: str, choices, where: str, default: str, upper: bool = True) -> str:
    value = data.get(key, default)
    norm = str(value).upper() if upper else str(value).lower()
    if not isinstance(value, str) or norm not in choices:
        raise FP8LMError(f"{where}: key {key!r}: value {value!r} is not allowed; allowed: {', '.join(choices)}")
    return norm


def _filter(data: dict, key: str, legacy: str, where: str) -> ModuleFilter:
    value = data.get(key, data.get(legacy, {})) or {}
    if not isinstance(value, dict) or set(value) - {"types", "names"}:
        raise FP8LMError(f"{where}: key {key!r}: expected {{\"types\": [...], \"names\": [...]}}, got {value!r}")
    for part in ("types", "names"):
        items = value.get(part, [])
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise FP8LMError(f"{where}: key '{key}.{part}': expected a list of strings, got {items!r}")
    for pattern in value.get("names", []):
        try:
            re.compile(pattern)
        except re.error as e:
            raise FP8LMError(f"{where}: key '{key}.names': {pattern!r} is not a regular expression ({e})") from None
    return ModuleFilter(tuple(value.get("types", [])), tuple(value.get("names", [])))


def parse_quant_config(data: dict, where: str, base_dir: Path) -> QuantConfig:
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        log.warning("%s: unknown keys ignored: %s", where, ", ".join(unknown))
    flags = {}
    for key in BOOL_KEYS:
        if key in data:
            value = data[key]
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise FP8LMError(f"{where}: key {key!r}: value {data[key]!r} is not allowed; allowed: true, false")
            flags[key] = value
    hp = data.get("hp_dtype")
    device_for_scales = data.get("device_for_scales")
    if device_for_scales is not None:
        device_for_scales = _choice(data, "device_for_scales", [p.upper() for p in PROFILES], where, "")
    interval = data.get("calibration_sample_interval", 0)
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 0:
        raise FP8LMError(f"{where}: key 'calibration_sample_interval': value {interval!r} must be an integer >= 0")
    dump = data.get("dump_stats_path", "./hqt_output/measure")
    if not isinstance(dump, str) or not dump:
        raise FP8LMError(f"{where}: key 'dump_stats_path': expected a non-empty path prefix, got {dump!r}")
    scale_params = data.get("scale_params", {}) or {}
    if not isinstance(scale_params, dict):
        raise FP8LMError(f"{where}: key 'scale_params': expected an object, got {scale_params!r}")
    return QuantConfig(
        mode=_choice(data, "mode", MODES, where, "QUANTIZE"),
        observer=_choice(data, "observer", OBSERVERS, where, "maxabs", upper=False),
        scale_method=parse_scale_method(data.get("scale_method", "maxabs_hw"), where),
        allowlist=_filter(data, "allowlist", "whitelist", where),
        blocklist=_filter(data, "blocklist", "blacklist", where),
        dump_stats_path=dump,
        fp8_config=_choice(data, "fp8_config", tuple(FP8_DTYPES), where, "E4M3"),
        hp_dtype=None if hp is None else HP_DTYPES[_choice(data, "hp_dtype", tuple(HP_DTYPES), where, "BF16")],
        measure_exclude=_choice(data, "measure_exclude", MEASURE_EXCLUDE, where, "OUTPUT"),
        scale_format=_choice(data, "scale_format", SCALE_FORMATS, where, "SCALAR"),
        device_for_scales=device_for_scales,
        scale_params=scale_params,
        calibration_sample_interval=interval,
        flags=flags,
        fp8lm=_fp8lm_options(data.get("fp8lm"), where),
        source=where,
        base_dir=base_dir,
    )
