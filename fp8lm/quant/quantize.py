"""QUANTIZE mode: measurements -> scales -> FP8 modules swapped into the (not yet loaded) model.

`Quantizer` reads and checks the measurement before the model loads; `patch` runs on the model
built on the meta device, so that weights arriving from the checkpoint are quantized one tensor
at a time on the CPU; `finish` chooses each module's backend and writes the scale cache.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fp8lm.errors import FP8LMError
from fp8lm.fp8.formats import DeviceProfile, device_tag, profile_for
from fp8lm.fp8.scale_methods import MethodSpec
from fp8lm.fp8.scales import activation_scale, maxabs_scale, weight_scale
from fp8lm.quant.config import QuantConfig
from fp8lm.quant.fp8_linear import is_fp8, quantize_linear
from fp8lm.quant.fp8_modules import FP8Format, FP8KVCache, FP8Matmul, FP8Softmax
from fp8lm.quant.measure_files import (METADATA_KEY, file_payload, find_measurement, measurement_base, rank_suffix,
                                      read_files, write_files)
from fp8lm.model.attention import PagedAttention
from fp8lm.quant.post_load import PostLoad, finish_quantized_model
from fp8lm.quant.modules import KV_CACHE, LINEAR, MATMUL, SOFTMAX, quantizable_modules, replace_module
from fp8lm.quant.statistics import load_statistics, stats_path

log = logging.getLogger(__name__)

def _is_fixed(spec) -> bool:
    return spec.value_type in ("FIXED_VALUE", "DUMMY_SCALES")


def fp8_format(config: QuantConfig, profile: DeviceProfile) -> FP8Format:
    return FP8Format(config.fp8_dtype, profile.fullscale(config.fp8_dtype), config.scale_format)


def planned_linears(model: nn.Module, config: QuantConfig, device: torch.device) -> dict[str, FP8Format]:
    """The Linears of a high-precision `model` that QUANTIZE under `config` makes FP8 with a static
    input scale, each with its format: what a statistics pass before quantizing observes."""
    fmt = fp8_format(config, profile_for(device, config.device_for_scales))
    return {name: fmt for name, _, types, kind in quantizable_modules(model)
            if kind is LINEAR and config.should_quantize(name, types)
            and not config.scale_method.for_node(name, types).activation.dynamic}


class Quantizer:
    def __init__(self, config: QuantConfig, device: torch.device, dtype: torch.dtype, model_fingerprint: dict | None,
                 kv_cache_fp8: bool, rank: int = 0, world_size: int = 1):
        self.config, self.device, self.dtype = config, device, dtype
        self.kv_cache_fp8, self.rank, self.world_size = kv_cache_fp8, rank, world_size
        self.profile: DeviceProfile = profile_for(device, config.device_for_scales)
        self.fmt = fp8_format(config, self.profile)
        self.nodes, self.measurement_path = self._read_measurement(model_fingerprint)
        self.stats = self._read_statistics(model_fingerprint) if config.fp8lm.uses_statistics else {}
        self.quantized: dict[str, dict] = {}
        self.kept_high_precision: list[str] = []

    # ---- before the model loads --------------------------------------------------------------
    def _read_measurement(self, fingerprint: dict | None) -> tuple[dict, Path | None]:
        cfg = self.config
        base = find_measurement(cfg.stats_prefix, cfg.observer, self.rank, self.world_size)
        if base is None:
            if cfg.scale_method.name == "unit_scale":
                return {}, None            # unit scales need no calibration
            expected = measurement_base(cfg.stats_prefix, cfg.observer, self.rank, self.world_size)
            raise FP8LMError(f"{cfg.source}: no measurement file {expected}.json "
                             f"(dump_stats_path); run calibration first (fp8lm calibrate)")
        payload = read_files(base)
        self._check_provenance(payload.get(METADATA_KEY), base, fingerprint)
        nodes = payload["Nodes"]
        if self.world_size > 1:
            nodes = _max_over_ranks(nodes)
        return nodes, base

    def _read_statistics(self, fingerprint: dict | None) -> dict[str, torch.Tensor]:
        path = stats_path(self.config.stats_prefix)
        tensors, meta = load_statistics(path)
        if fingerprint and meta.get("weights_checksum") not in (None, fingerprint.get("weights_checksum")) \
                and not self.config.flag("allow_measurement_mismatch"):
            raise FP8LMError(f"{path} was computed on another model ({meta.get('model')}); run fp8lm calibrate "
                             f"again, or set \"allow_measurement_mismatch\": true in QUANT_CONFIG ({self.config.source})")
        if self.config.fp8lm.searched_scales and not any(k.endswith(".input_scale_factor") for k in tensors):
            raise FP8LMError(f"{path} holds no searched input scales (its calibration ran without searched_scales); "
                             f"run fp8lm calibrate with it on, or turn fp8lm.searched_scales off ({self.config.source})")
        return tensors

    def _check_provenance(self, meta: dict | None, base: Path, fingerprint: dict | None) -> None:
        if meta is None:
            log.warning("%s.json has no fp8lm metadata (written by INC?): device, dtype and model cannot be "
                        "checked", base)
            return
        here = {"device": device_tag(self.device).split(":")[0], "compute_dtype": str(self.dtype).replace("torch.", "")}
        there = {"device": str(meta.get("device", "")).split(":")[0], "compute_dtype": meta.get("compute_dtype")}
        problems = [f"{k} {there[k]} (measured) vs {here[k]} (now)" for k in here if there[k] != here[k]]
        if fingerprint and meta.get("model") and any(meta["model"].get(k) != fingerprint.get(k)
                                                       for k in ("config_sha256", "weights_checksum")):
            problems.append(f"model {meta['model'].get('name')} (measured) vs {fingerprint.get('name')} (now): "
                            "different weights or config")
        if problems and not self.config.flag("allow_measurement_mismatch"):
            raise FP8LMError(f"{base}.json was measured differently: {'; '.join(problems)}. Measure again on this "
                             f"device/dtype/model, or set \"allow_measurement_mismatch\": true in QUANT_CONFIG "
                             f"({self.config.source}) to use it anyway")
        if problems:
            log.warning("using measurements that differ: %s (allow_measurement_mismatch)", "; ".join(problems))

    # ---- on the meta model ---------------------------------------------------------------------
    def patch(self, model: nn.Module) -> None:
        missing = []
        cached = self._cached_weight_scales()
        for name, module, types, kind in list(quantizable_modules(model)):
            if not self.config.should_quantize(name, types) or (kind is KV_CACHE and not self.kv_cache_fp8):
                self.kept_high_precision.append(name)
                continue
            spec = self.config.scale_method.for_node(name, types)
            node = self.nodes.get(name)
            needs_measurement = not _is_fixed(spec.activation) and not (kind is LINEAR and spec.activation.dynamic)
            if node is None and needs_measurement:
                missing.append(name)
                continue
            if kind is LINEAR:
                self._quantize_linear(name, module, spec, node or {}, cached.get(name))
            else:
                replace_module(model, name, self._fp8_module(name, kind, spec, node or {}))
        if missing and not self.config.flag("ignore_modules_wo_measures"):
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise FP8LMError(f"{shown}: allowlisted but not measured in {self.measurement_path}.json; measure "
                             f"them, blocklist them, or set \"ignore_modules_wo_measures\": true")
        if missing:
            log.warning("kept %d unmeasured modules in high precision (ignore_modules_wo_measures): %s",
                        len(missing), ", ".join(missing[:5]))
            self.kept_high_precision.extend(missing)
        log.info("FP8: %d modules quantized (%s, profile %s), %d kept in %s", len(self.quantized),
                 self.config.scale_method.name, self.profile.name, len(self.kept_high_precision),
                 str(self.dtype).replace("torch.", ""))

    def _act(self, spec: MethodSpec, node: dict, group: str, index: int) -> float:
        if _is_fixed(spec.activation):
            return activation_scale(None, spec.activation, self.profile, self.fmt.dtype)
        values = node.get(group) or []
        if index >= len(values):
            raise FP8LMError(f"measurement {self.measurement_path}.json lacks {group}[{index}] for a module "
                             "that needs it (was it measured with measure_exclude?)")
        return activation_scale(values[index], spec.activation, self.profile, self.fmt.dtype)

    def _quantize_linear(self, name: str, linear: nn.Module, spec: MethodSpec, node: dict, cached_weight_scale) -> None:
        """Gives the Linear an FP8 format; records its scales for the scale file (weights once loaded)."""
        s_in = None if spec.activation.dynamic else self._act(spec, node, "inputs", 0) * self._input_factor(name, spec)
        fits = cached_weight_scale is not None and (cached_weight_scale.numel() > 1) == (spec.weight.granularity == "PCS")
        rounded = self._rounded_weight(name, spec)
        w_scale = rounded[1] if rounded else cached_weight_scale if fits else self._weight_scale(spec, node)
        quantize_linear(linear, self.fmt, s_in, w_scale, spec.weight, spec.activation if spec.activation.dynamic else None,
                        self.profile, rounded[0] if rounded else None)
        self.quantized[name] = {"inputs": [] if s_in is None else [s_in], "linear": linear}   # dynamic: none

    def _fp8_module(self, name: str, kind, spec: MethodSpec, node: dict) -> nn.Module:
        """The FP8 replacement of a Matmul, Softmax or KVCache; records its scales for the scale file."""
        if kind is MATMUL:
            attn, op = name.rpartition(".")[::2]
            heads = self._head_scales(attn, "query", spec) if op == "matmul_qk" else None
            a = heads if heads is not None else self._act(spec, node, "inputs", 0)
            b = self._matmul_b_scale(name, spec, node)
            fp8 = FP8Matmul(self.fmt, a, b)
            self.quantized[name] = {"inputs": [a, b], "outputs": [a * b]}
        elif kind is SOFTMAX:
            bound = self.config.fp8lm.softmax_scale == "bound"
            s = 1.0 / self.fmt.limit if bound else self._act(spec, node, "outputs", 0)   # probabilities <= 1
            fp8 = FP8Softmax(self.fmt, s)
            self.quantized[name] = {"inputs": [1.0], "outputs": [s]}
        else:
            s = self._cache_scale(name.rpartition(".")[0], name.rpartition(".")[2])
            fp8 = FP8KVCache(self.fmt, s)
            self.quantized[name] = {"inputs": [s], "outputs": [s]}
        return fp8

    # ---- fp8lm's recipe options (QUANT_CONFIG "fp8lm") ----------------------------------------------
    def _input_factor(self, name: str, spec: MethodSpec) -> float:
        """The searched factor on the max-abs input scale (exact scales only; 1 otherwise)."""
        factor = self.stats.get(f"{name}.input_scale_factor")
        if not self.config.fp8lm.searched_scales or factor is None or spec.activation.rounding != "IDENTITY":
            return 1.0
        return float(factor)

    def _rounded_weight(self, name: str, spec: MethodSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The statistics file's error-compensated FP8 weight and its scale, for exact per-tensor specs."""
        weight = self.stats.get(f"{name}.weight")
        if not self.config.fp8lm.rounded_weights or weight is None:
            return None
        if (spec.weight.granularity, spec.weight.rounding, spec.weight.value_type) != ("PTS", "IDENTITY", "MAXABS") \
                or weight.dtype != self.fmt.dtype:
            log.warning("%s: the rounded FP8 weight is for exact per-tensor %s scales; rounding to nearest instead",
                        name, self.config.fp8_config)
            return None
        return weight, self.stats[f"{name}.weight_scale"]

    def _key_maxabs(self, attn: str) -> float | None:
        """K's maximum after smoothing, where K smoothing is on and calibrated for this layer."""
        value = self.stats.get(f"{attn}.key_maxabs")
        return float(value) if self.config.fp8lm.k_smoothing and value is not None else None

    def _cache_scale(self, attn: str, which: str) -> float | None:
        """The scale of `attn`'s FP8 k_cache / v_cache; None where that cache is not FP8."""
        name, types = f"{attn}.{which}", ("KVCache", "VLLMKVCache")
        if not (self.kv_cache_fp8 and self.config.should_quantize(name, types)):
            return None
        spec = self.config.scale_method.for_node(name, types)
        heads = self._head_scales(attn, "key" if which == "k_cache" else "value", spec)
        if heads is not None:
            return heads
        smoothed = self._smoothed_key_scale(attn, spec) if which == "k_cache" else None
        return smoothed if smoothed is not None else self._act(spec, self.nodes.get(name) or {}, "inputs", 0)

    def _head_scales(self, attn: str, which: str, spec: MethodSpec) -> torch.Tensor | None:
        """[this rank's KV heads] scales of `attn`'s queries / keys / values, where per-head attention
        scales are on and calibrated (keys: after smoothing where K smoothing applies); else None."""
        smoothed = which == "key" and self._key_maxabs(attn) is not None
        maxabs = self.stats.get(f"{attn}.{'smoothed_' if smoothed else ''}{which}_maxabs_per_head")
        if not self.config.fp8lm.per_head_attention_scales or maxabs is None or _is_fixed(spec.activation):
            return None
        n = maxabs.numel() // self.world_size
        return maxabs_scale(maxabs[self.rank * n:(self.rank + 1) * n].float(), spec.activation, self.profile, self.fmt.dtype)

    def _smoothed_key_scale(self, attn: str, spec: MethodSpec) -> float | None:
        """The scale of `attn`'s keys after smoothing, where K smoothing applies; else None."""
        smoothed = self._key_maxabs(attn)
        if smoothed is None or _is_fixed(spec.activation):
            return None
        return activation_scale(smoothed, spec.activation, self.profile, self.fmt.dtype)

    def _matmul_b_scale(self, name: str, spec: MethodSpec, node: dict) -> float:
        """q·k reads K and p·v reads V: with the cache's own scale where it is FP8 and the recipe says
        so (no second rounding), from K's smoothed maximum where K is smoothed, else as measured."""
        attn, which = name.rpartition(".")[0], {"matmul_qk": "k_cache", "matmul_av": "v_cache"}.get(name.rpartition(".")[2])
        if which is None:
            return self._act(spec, node, "inputs", 1)
        cache = self._cache_scale(attn, which) if self.config.fp8lm.attention_scales_from_cache else None
        if cache is not None:
            return cache
        smoothed = self._smoothed_key_scale(attn, spec) if which == "k_cache" else None
        return smoothed if smoothed is not None else self._act(spec, node, "inputs", 1)

    def post_load(self, model: nn.Module) -> PostLoad:
        """What the recipe adds once weights are loaded: key offsets (k_smoothing); the attention
        sink's K/V out of FP8 in layers whose attention or cache is FP8 (exact_first_token; not in
        windowed layers, whose first key column is not the sequence's first token); an LM head kept
        out of FP8 with bfloat16 values (lm_head_bfloat16: on the CPU kernels' panels a bfloat16 head
        then gives float32 logits)."""
        plan = PostLoad()
        for name, module in model.named_modules():
            if not isinstance(module, PagedAttention):
                continue
            if self._key_maxabs(name) is not None:
                n = module.num_kv_heads
                plan.key_offsets[name] = self.stats[f"{name}.key_offset"][self.rank * n:(self.rank + 1) * n]
            fp8 = any(isinstance(m, (FP8KVCache, FP8Matmul)) for m in (module.k_cache, module.v_cache,
                                                                       module.matmul_qk, module.matmul_av))
            if self.config.fp8lm.exact_first_token and fp8 and module.sliding_window is None:
                plan.exact_first_token.add(name)
        head = model.lm_head
        if self.config.fp8lm.lm_head_bfloat16 and not is_fp8(head) and head.weight.dtype in (torch.float32, torch.bfloat16):
            plan.bfloat16_values.append("lm_head")
        return plan

    def _weight_scale(self, spec: MethodSpec, node: dict) -> torch.Tensor | None:
        """From the measured weight maximum; None when it must come from the weight itself (OPT)."""
        measured = node.get("params", {}).get("weight")
        if measured is not None and spec.weight.granularity == "PCS" and torch.as_tensor(measured).numel() == 1:
            measured = None   # a per-tensor measurement cannot give per-channel scales: use the weight
        if self.world_size > 1:
            # A rank measured only its shard; the scale must be the same on every rank (per tensor:
            # the maximum over shards), so it comes from the full checkpoint tensor at load time.
            measured = None
        if spec.weight.value_type == "OPT" or (measured is None and not _is_fixed(spec.weight)):
            return None
        return weight_scale(None, None if measured is None else torch.as_tensor(measured), spec.weight,
                            self.profile, self.fmt.dtype)

    def _cached_weight_scales(self) -> dict:
        """Weight scales from an up-to-date scale file (they can be costly: OPT searches)."""
        base = self.scale_file_base()
        path = Path(f"{base}.json")
        if (self.measurement_path is None or self.config.flag("recalc_scales") or not path.is_file()
                or path.stat().st_mtime < Path(f"{self.measurement_path}.json").stat().st_mtime):
            return {}
        try:
            nodes = read_files(base)["Nodes"]
        except FP8LMError as e:
            log.warning("ignoring the scale cache: %s", e)
            return {}
        log.info("reusing weight scales from %s", path)
        return {k: torch.as_tensor(v["params"]["weight"]) for k, v in nodes.items() if "weight" in v.get("params", {})}

    def rename(self, name: str) -> str:
        return name

    # ---- after loading -----------------------------------------------------------------------
    def finish(self, model: nn.Module) -> None:
        finish_quantized_model(model, self.post_load(model), self.device, self.dtype)
        if self.measurement_path is not None:
            self._write_scale_file()

    def scale_file_base(self) -> Path:
        """<prefix>_hooks_<observer>_<METHOD>_<PROFILE>[_rank_world]: INC's name plus the device profile."""
        cfg = self.config
        return Path(f"{cfg.stats_prefix}_hooks_{cfg.observer}_{cfg.scale_method.file_tag}_"
                    f"{self.profile.name.upper()}{rank_suffix(self.rank, self.world_size)}")

    def _write_scale_file(self) -> None:
        nodes = {}
        for name, entry in self.quantized.items():
            # per-head attention scales are written as lists (one per KV head)
            node = {k: [x.tolist() if torch.is_tensor(x) else x for x in v] for k, v in entry.items() if k != "linear"}
            linear = entry.get("linear")
            if linear is not None:
                w = torch.as_tensor(linear.weight_scale, dtype=torch.float32)
                node["params"] = {"weight": w.reshape(-1, 1).tolist() if w.numel() > 1 else float(w)}
                if linear.input_scale is not None and w.numel() == 1:
                    node["outputs"] = [node["inputs"][0] * float(w)]
            nodes[name] = node
        meta = {"scale_method": self.config.scale_method.name, "profile": self.profile.name,
                "device": device_tag(self.device), "measurement": str(self.measurement_path)}
        try:
            write_files(self.scale_file_base(), file_payload(nodes, "Scale", self.rank, self.world_size, 0, meta),
                        backup=False)
        except FP8LMError as e:
            log.warning("scale cache not written: %s", e)


def _max_over_ranks(nodes: dict) -> dict:
    """Each rank measured its own shard; the ranks agree on one per-tensor activation maximum per
    module (the largest), so that TP=N and the unified TP=1 quantize every activation alike."""
    import numpy as np

    slots = [(n, g, i) for n in sorted(nodes) for g in ("inputs", "outputs")
             for i, v in enumerate(nodes[n].get(g, [])) if np.size(v) == 1]
    flat = torch.tensor([float(np.max(nodes[n][g][i])) for n, g, i in slots], dtype=torch.float64)
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX)
    merged = {n: {k: (list(v) if k in ("inputs", "outputs") else v) for k, v in node.items()}
              for n, node in nodes.items()}
    for (n, g, i), value in zip(slots, flat.tolist()):
        merged[n][g][i] = np.full_like(nodes[n][g][i], value)
    return merged
