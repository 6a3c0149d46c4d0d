"""Quantized checkpoints in the compressed-tensors format (what llm-compressor writes and vLLM,
SGLang and transformers read), plus what only fp8lm needs in a sidecar file.

    config.json  quantization_config: {quant_method: compressed-tensors, format: float-quantized,
                 config_groups, ignore, kv_cache_scheme}
    <linear>.weight (F8_E4M3), <linear>.weight_scale, <linear>.input_scale (static only),
    model.layers.N.self_attn.k_scale / v_scale; convention value ≈ fp8 * scale.
    fp8lm_quant.json  attention matmul / softmax scales (other loaders ignore the file) and the
                 measurement's provenance (device, dtype, model fingerprint, scale method).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fp8lm.errors import FP8LMError, ModelLoadError
from fp8lm.files import fsync
from fp8lm.fp8.formats import CPU, DeviceProfile
from fp8lm.fp8.scale_methods import ScaleSpec
from fp8lm.model.attention import PagedAttention
from fp8lm.model.families import FUSED_MODULES, fused_module_name
from fp8lm.model.linear import ParallelLinear
from fp8lm.quant.fp8_linear import is_fp8, quantize_linear
from fp8lm.quant.fp8_modules import FP8Format, FP8KVCache, FP8Matmul, FP8Softmax, set_scale
from fp8lm.quant.post_load import PostLoad, finish_quantized_model
from fp8lm.quant.modules import KV_CACHE, LINEAR, MATMUL, SOFTMAX, quantizable_modules, replace_module
from fp8lm.quant.online_fp8 import unit_kv_cache

SIDECAR = "fp8lm_quant.json"
_KV_RE = re.compile(r"^(model\.layers\.\d+\.self_attn)\.attn\.([kv])_cache$")
_DYNAMIC_TOKEN = ScaleSpec(granularity="PCS", rounding="IDENTITY", dynamic=True)


def _float_args(strategy: str, dynamic: bool) -> dict:
    return {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None, "observer": None if dynamic else "minmax",
            "observer_kwargs": {}}


# ---- writing ------------------------------------------------------------------------------------

def quantization_config(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict:
    """`tensors`: what checkpoint_tensors wrote (names as in the checkpoint, fused for Phi-3)."""
    checkpoint_name = fused_module_name if model.config.family.fused_checkpoint else (lambda n: n)
    groups: dict[tuple[str, bool], list[str]] = {}
    ignore = set()
    for name, module, _, kind in quantizable_modules(model):
        if kind is not LINEAR:
            continue
        name = checkpoint_name(name)
        if not is_fp8(module):
            ignore.add(name)
            continue
        strategy, dynamic = "channel" if tensors[name + ".weight_scale"].numel() > 1 else "tensor", module.input_scale is None
        if name not in groups.setdefault((strategy, dynamic), []):
            groups[(strategy, dynamic)].append(name)
    config_groups = {}
    single = len(groups) == 1
    for i, ((strategy, dynamic), names) in enumerate(sorted(groups.items())):
        config_groups[f"group_{i}"] = {
            "targets": ["Linear"] if single else [f"re:^{re.escape(n)}$" for n in names],
            "weights": _float_args(strategy, False),
            "input_activations": _float_args("token" if dynamic else "tensor", dynamic),
            "output_activations": None,
        }
    kv = any(isinstance(m, FP8KVCache) for m in model.modules())
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "global_compression_ratio": None, "config_groups": config_groups, "ignore": sorted(ignore),
            "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                "symmetric": True} if kv else None}


def _check_writable_attention(model: nn.Module) -> None:
    """What a compressed-tensors folder cannot hold: per-head scales."""
    for name, module in model.named_modules():
        scales = [getattr(module, n, None) for n in ("scale", "scale_a", "scale_b")]
        if isinstance(module, (FP8KVCache, FP8Matmul)) and any(torch.is_tensor(s) and s.numel() > 1 for s in scales):
            raise FP8LMError(f"{name}: per-head attention scales (QUANT_CONFIG fp8lm.per_head_attention_scales) "
                             "cannot be written: compressed-tensors folders hold one KV scale per tensor; "
                             "turn the option off to write a folder, or serve with the QUANT_CONFIG")


def checkpoint_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors under their checkpoint names, and the sidecar's attention scales."""
    _check_writable_attention(model)
    tensors: dict[str, torch.Tensor] = {}
    attention: dict[str, dict] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if is_fp8(module):
            tensors[prefix + "weight"] = module.format.fp8_weight(module).cpu()
            ws = torch.as_tensor(module.weight_scale, dtype=torch.float32).cpu()
            tensors[prefix + "weight_scale"] = ws.reshape(-1, 1) if ws.numel() > 1 else ws.reshape(1)
            if module.input_scale is not None:
                tensors[prefix + "input_scale"] = torch.tensor([float(module.input_scale)])
            if module.bias is not None:
                tensors[prefix + "bias"] = module.bias.detach().cpu()
        elif isinstance(module, FP8KVCache):
            attn, which = _KV_RE.match(name).groups()
            offset = model.get_submodule(name.rpartition(".")[0]).key_offset if which == "k" else None
            scale = float(module.scale)
            if offset is not None:
                # fp8lm caches K minus the offset (sidecar); other loaders cache K itself, which the
                # offset's size bounds: |k| <= |k - c| + |c|, so that scale never clips.
                attention.setdefault(name.rpartition(".")[0], {})["k_scale"] = scale
                scale += float(offset.abs().max()) / module.fmt.limit
            tensors[f"{attn}.{which}_scale"] = torch.tensor(scale)
        elif isinstance(module, PagedAttention):
            # Both are fp8lm's runtime choices, in the sidecar: other loaders run the same weights and
            # scales with plain FP8 attention.
            if module.key_offset is not None:
                attention.setdefault(name, {})["key_offset"] = module.key_offset.float().cpu().tolist()
            if module.exact_first_token:
                attention.setdefault(name, {})["exact_first_token"] = True
        elif isinstance(module, ParallelLinear):
            weight = module.dense_weight()
            tensors[prefix + "weight"] = (weight.bfloat16() if module.format.bfloat16_values else weight).cpu()
            if module.bias is not None:
                tensors[prefix + "bias"] = module.bias.detach().cpu()
        elif isinstance(module, FP8Matmul):
            attention[name] = {"scale_a": float(module.scale_a), "scale_b": float(module.scale_b)}
        elif isinstance(module, FP8Softmax):
            attention[name] = {"output_scale": float(module.output_scale)}
        else:
            for pname, p in module.named_parameters(recurse=False):
                if p.device.type != "meta":
                    tensors.setdefault(prefix + pname, p.detach().cpu())
    return {k: v.contiguous() for k, v in tensors.items()}, attention


def fuse_projections(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Phi-3's checkpoint layout: q/k/v as one qkv_proj and gate/up as one gate_up_proj. FP8 weight
    scales that differ between the members are written per output channel (each row keeps its
    member's scale: the same numbers); the members read one input, so they share its scale."""
    out = dict(tensors)
    for fused_local, members_local in FUSED_MODULES.items():
        for first in [n for n in tensors if n.endswith(f".{members_local[0]}.weight")]:
            head = first[:-len(f"{members_local[0]}.weight")]          # 'model.layers.3.'
            out.update(_fused(out, head + fused_local, [head + m for m in members_local]))
    return out


def _fused(tensors: dict[str, torch.Tensor], fused: str, members: list[str]) -> dict[str, torch.Tensor]:
    """Pops the members' tensors from `tensors`; returns the fused module's."""
    out = {}
    parts = {suffix: [tensors.pop(f"{m}.{suffix}") for m in members if f"{m}.{suffix}" in tensors]
             for suffix in ("weight", "bias", "weight_scale", "input_scale")}
    if len({w.dtype for w in parts["weight"]}) != 1 or len(parts["weight_scale"]) not in (0, len(members)):
        raise FP8LMError(f"{fused}: {', '.join(members)} must all be FP8 or all high precision in a fused "
                         "checkpoint; block or allow them together")
    out[f"{fused}.weight"] = torch.cat(parts["weight"])
    if parts["bias"]:
        out[f"{fused}.bias"] = torch.cat(parts["bias"])
    scales = parts["weight_scale"]
    if scales and all(s.numel() == 1 for s in scales) and len({float(s) for s in scales}) == 1:
        out[f"{fused}.weight_scale"] = scales[0]
    elif scales:
        out[f"{fused}.weight_scale"] = torch.cat([s.reshape(-1, 1).expand(w.shape[0], 1) if s.numel() == 1 else s
                                                 for s, w in zip(scales, parts["weight"])]).contiguous()
    if parts["input_scale"]:
        if len({float(s) for s in parts["input_scale"]}) != 1:
            raise FP8LMError(f"{fused}: its members' input scales differ "
                             f"({[float(s) for s in parts['input_scale']]}); a fused checkpoint has one")
        out[f"{fused}.input_scale"] = parts["input_scale"][0]
    return out


def save_quantized(model: nn.Module, source_folder: Path, output: Path, provenance: dict) -> Path:
    tensors, attention = checkpoint_tensors(model)
    if model.config.family.fused_checkpoint:
        tensors = fuse_projections(tensors)
    config = json.loads((Path(source_folder) / "config.json").read_text())
    if "lm_head.weight" in tensors and tensors["lm_head.weight"].dtype != tensors["model.embed_tokens.weight"].dtype:
        config["tie_word_embeddings"] = False       # an FP8 LM head is its own tensor
    elif config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    config["quantization_config"] = quantization_config(model, tensors)
    rounded = [n for n, m in model.named_modules() if isinstance(m, ParallelLinear) and m.format.bfloat16_values]
    sidecar = {"attention_scales": attention, "bfloat16_values": rounded, "provenance": provenance}
    return write_folder(source_folder, output, tensors, config, {SIDECAR: sidecar})


def write_folder(source_folder: Path, output: Path, tensors: dict[str, torch.Tensor], config: dict,
                 json_files: dict[str, dict]) -> Path:
    """A model folder (one safetensors file, config.json, `json_files`, the source's tokenizer files),
    written next to its destination and renamed into place: a failure leaves nothing behind."""
    output = Path(output).expanduser().resolve()
    if output.exists() and any(output.iterdir()):
        raise FP8LMError(f"--output {output}: exists and is not empty")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)
        for name, data in json_files.items():
            (tmp / name).write_text(json.dumps(data, indent=2))
        for name in os.listdir(source_folder):
            if name.startswith("tokenizer") or name in ("generation_config.json", "chat_template.jinja",
                                                         "special_tokens_map.json"):
                shutil.copy(Path(source_folder) / name, tmp / name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for written in tmp.iterdir():
            fsync(written)
        fsync(tmp)
        os.chmod(tmp, 0o755)
        if output.exists():
            output.rmdir()
        os.rename(tmp, output)
        fsync(output.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


# ---- reading ------------------------------------------------------------------------------------

class CheckpointQuantization:
    """Builds the FP8 modules a compressed-tensors folder describes; scales arrive with the weights."""

    def __init__(self, folder: Path, qconfig: dict, device: torch.device, dtype: torch.dtype,
                 kv_cache_fp8: bool = False, profile: DeviceProfile = CPU):
        self.folder, self.qconfig, self.profile = Path(folder), qconfig, profile
        self.device, self.dtype = device, dtype
        fmt = qconfig.get("format")
        if fmt not in ("float-quantized", "naive-quantized"):
            raise ModelLoadError(f"{folder}/config.json: format {fmt!r} is not supported; fp8lm reads "
                                 "float-quantized (FP8) checkpoints")
        self.groups = list((qconfig.get("config_groups") or {}).items())
        self.ignore = qconfig.get("ignore") or []
        self.kv_fp8 = qconfig.get("kv_cache_scheme") is not None
        if self.kv_fp8:
            _check_kv_scheme(folder, qconfig["kv_cache_scheme"])
        self.unit_kv_scales = kv_cache_fp8 and not self.kv_fp8
        sidecar = json.loads((self.folder / SIDECAR).read_text()) if (self.folder / SIDECAR).is_file() else {}
        self.attention = sidecar.get("attention_scales", {})
        self.bfloat16_values = sidecar.get("bfloat16_values", [])   # linears fp8lm ran with bfloat16 values
        self.fmt = FP8Format(torch.float8_e4m3fn, 448.0, "CONST")

    def _group_for(self, name: str, fused: bool) -> dict | None:
        if fused:
            name = fused_module_name(name)      # Phi-3 folders name qkv_proj / gate_up_proj
        if any(_matches(t, name, "Linear") for t in self.ignore):
            return None
        for _, group in self.groups:
            if any(_matches(t, name, "Linear") for t in group.get("targets", [])):
                return group
        return None

    def patch(self, model: nn.Module) -> None:
        for name, module, _, kind in list(quantizable_modules(model)):
            if kind is LINEAR:
                group = self._group_for(name, model.config.family.fused_checkpoint)
                if group is not None:
                    self._quantize_linear(name, module, group)
            elif kind is KV_CACHE and self.kv_fp8:
                replace_module(model, name, FP8KVCache(self.fmt, torch.empty((), device="meta")))
            elif kind is KV_CACHE and self.unit_kv_scales:
                replace_module(model, name, unit_kv_cache())
            elif kind is MATMUL and name in self.attention:
                s = self.attention[name]
                replace_module(model, name, FP8Matmul(self.fmt, s["scale_a"], s["scale_b"]))
            elif kind is SOFTMAX and name in self.attention:
                replace_module(model, name, FP8Softmax(self.fmt, self.attention[name]["output_scale"]))

    def _quantize_linear(self, name: str, module: ParallelLinear, group: dict) -> None:
        w, a = group.get("weights") or {}, group.get("input_activations")
        scheme = f"weights {w.get('type')}{w.get('num_bits')} {w.get('strategy')}"
        ok_weights = (w.get("type") == "float" and w.get("num_bits") == 8 and w.get("strategy") in ("tensor", "channel")
                      and w.get("symmetric", True) and not w.get("dynamic"))
        ok_acts = a is None or (a.get("type") == "float" and a.get("num_bits") == 8 and a.get("symmetric", True) and (
            (a.get("strategy") == "tensor" and not a.get("dynamic")) or (a.get("strategy") == "token" and a.get("dynamic"))))
        if not (ok_weights and ok_acts):
            acts = "none" if a is None else f"{a.get('type')}{a.get('num_bits')} {a.get('strategy')} " \
                                            f"{'dynamic' if a.get('dynamic') else 'static'}"
            raise ModelLoadError(f"{self.folder}: layer {name}: scheme ({scheme}; input activations {acts}) is not "
                                 "supported; fp8lm runs FP8 weights per tensor or channel with static per-tensor or "
                                 "dynamic per-token FP8 inputs")
        if a is None:
            raise ModelLoadError(f"{self.folder}: layer {name}: weight-only FP8 (no input_activations) is not supported")
        dynamic = bool(a.get("dynamic"))
        # Scales are placeholders on the meta device: the loader fills them from the checkpoint and
        # reports any it lacks.
        w_shape = (module.out_features, 1) if w.get("strategy") == "channel" else (1,)
        quantize_linear(module, self.fmt, None if dynamic else torch.empty((), device="meta"),
                        torch.empty(w_shape, device="meta"), ScaleSpec(), _DYNAMIC_TOKEN if dynamic else None,
                        self.profile)

    def rename(self, name: str) -> str:
        """Checkpoint tensor name -> model tensor name (KV scales live on the cache modules)."""
        m = re.match(r"^(model\.layers\.\d+\.self_attn)\.(?:[kv]_proj\.)?([kv])_scale$", name)
        if m:
            return f"{m.group(1)}.attn.{m.group(2)}_cache.scale"
        return name

    def finish(self, model: nn.Module) -> None:
        # Linears stored as bfloat16 (bfloat16_values) take the same path, and give the same sums, again.
        plan = PostLoad(bfloat16_values=list(self.bfloat16_values))
        for name, entry in self.attention.items():
            if entry.get("exact_first_token"):
                plan.exact_first_token.add(name)
            if "key_offset" in entry:
                plan.key_offsets[name] = torch.tensor(entry["key_offset"])
                k_cache = model.get_submodule(name).k_cache
                if "k_scale" in entry and isinstance(k_cache, FP8KVCache):
                    set_scale(k_cache, "scale", entry["k_scale"], self.fmt)
        finish_quantized_model(model, plan, self.device, self.dtype)


def _check_kv_scheme(folder: Path, scheme: dict) -> None:
    if not (scheme.get("type") == "float" and scheme.get("num_bits") == 8 and scheme.get("strategy") == "tensor"):
        raise ModelLoadError(f"{folder}: kv_cache_scheme {scheme} is not supported; fp8lm reads per-tensor FP8 KV scales")


def _matches(target: str, name: str, type_name: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target == type_name
