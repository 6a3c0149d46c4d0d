"""Scale methods: how a measured maximum becomes a scale, per tensor role (weight, activation).

A method is a pair of `ScaleSpec`s. The named methods of the INC flow map to fixed pairs; the
dict form of `scale_method` builds specs per node, layer index or layer type.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from fp8lm.errors import FP8LMError

GRANULARITIES = ("PTS", "PCS")                                   # per tensor / per channel
VALUE_TYPES = ("MAXABS", "FIXED_VALUE", "OPT", "DUMMY_SCALES")
ROUNDINGS = ("IDENTITY", "POW2", "HW_ALIGNED", "HW_ALIGNED_FIXED", "SCALE_UNIT")
WEIGHT_BACKOFF, ACTIVATION_BACKOFF = 0.5, 0.25


@dataclass(frozen=True)
class ScaleSpec:
    granularity: str = "PTS"
    value_type: str = "MAXABS"
    rounding: str = "IDENTITY"
    backoff: float = 1.0
    candidates: tuple[float, ...] | None = None   # OPT: scales searched (None: the profile's set)
    dynamic: bool = False


@dataclass(frozen=True)
class MethodSpec:
    weight: ScaleSpec
    activation: ScaleSpec


def _pair(w: dict, a: dict) -> MethodSpec:
    return MethodSpec(ScaleSpec(**w), ScaleSpec(**a))


_W, _A = {"backoff": WEIGHT_BACKOFF}, {"backoff": ACTIVATION_BACKOFF}
_POW2_RANGE = tuple(2.0 ** e for e in range(-10, 10))
_PCS_OPT_FACTORS = tuple(2.0 ** e for e in range(-3, 5))
NAMED_METHODS: dict[str, MethodSpec] = {
    "unit_scale": _pair({"value_type": "FIXED_VALUE", "rounding": "SCALE_UNIT"},
                        {"value_type": "FIXED_VALUE", "rounding": "SCALE_UNIT"}),
    "hw_aligned_single_scale": _pair({"value_type": "FIXED_VALUE", "rounding": "HW_ALIGNED_FIXED"},
                                     {"value_type": "FIXED_VALUE", "rounding": "HW_ALIGNED_FIXED"}),
    "maxabs_hw": _pair({**_W, "rounding": "HW_ALIGNED"}, {**_A, "rounding": "HW_ALIGNED"}),
    "maxabs_pow2": _pair({**_W, "rounding": "POW2"}, {**_A, "rounding": "POW2"}),
    "maxabs_arbitrary": _pair(_W, _A),
    "maxabs_hw_opt_weight": _pair({**_W, "value_type": "OPT", "rounding": "HW_ALIGNED"},
                                  {**_A, "rounding": "HW_ALIGNED"}),
    "maxabs_pow2_opt_weight": _pair({**_W, "value_type": "OPT", "rounding": "POW2", "candidates": _POW2_RANGE},
                                    {**_A, "rounding": "POW2"}),
    "act_maxabs_hw_weights_pcs_maxabs_pow2": _pair({**_W, "granularity": "PCS", "rounding": "POW2"},
                                                   {**_A, "rounding": "HW_ALIGNED"}),
    "act_maxabs_hw_weights_pcs_opt_pow2": _pair(
        {**_W, "granularity": "PCS", "value_type": "OPT", "rounding": "POW2", "candidates": _PCS_OPT_FACTORS},
        {**_A, "rounding": "HW_ALIGNED"}),
    "act_maxabs_pow2_weights_pcs_maxabs_pow2": _pair({**_W, "granularity": "PCS", "rounding": "POW2"},
                                                     {**_A, "rounding": "POW2"}),
    "act_maxabs_pow2_weights_pcs_opt_pow2": _pair(
        {**_W, "granularity": "PCS", "value_type": "OPT", "rounding": "POW2", "candidates": _PCS_OPT_FACTORS},
        {**_A, "rounding": "POW2"}),
    # Dynamic methods: activations scaled per token at run time (no backoff).
    "act_maxabs_pcs_pow2_weight_maxabs_pts_pow2_hw": _pair(
        {**_W, "rounding": "HW_ALIGNED"}, {"granularity": "PCS", "rounding": "POW2", "dynamic": True}),
    "maxabs_pcs_pow2": _pair({**_W, "granularity": "PCS", "rounding": "POW2"},
                             {"granularity": "PCS", "rounding": "POW2", "dynamic": True}),
}


@dataclass(frozen=True)
class ScaleMethodConfig:
    """The resolved `scale_method`: a default plus overrides by node name, layer index, layer type."""
    name: str                                       # the named method, or "custom" for the dict form
    default: MethodSpec
    nodes: dict[str, MethodSpec] = field(default_factory=dict)
    layers: dict[str, MethodSpec] = field(default_factory=dict)
    layer_types: dict[str, MethodSpec] = field(default_factory=dict)

    def for_node(self, node: str, layer_types: tuple[str, ...] = ()) -> MethodSpec:
        """Node name first, then its layer index (".layers.N."), then its type, then the default."""
        if node in self.nodes:
            return self.nodes[node]
        match = re.search(r"layers[./](\d+)", node)
        if match and match.group(1) in self.layers:
            return self.layers[match.group(1)]
        for t in layer_types:
            if t in self.layer_types:
                return self.layer_types[t]
        return self.default

    @property
    def file_tag(self) -> str:
        """The part of the scale-cache file name that names the method (INC: MAXABS_HW)."""
        return self.name.upper()


def parse_scale_method(value, where: str) -> ScaleMethodConfig:
    if isinstance(value, str):
        key = value.lower()
        if key not in NAMED_METHODS:
            raise FP8LMError(f"{where}: key 'scale_method': value {value!r} is not allowed; allowed: "
                             f"{', '.join(NAMED_METHODS)}, or the dict form")
        return ScaleMethodConfig(key, NAMED_METHODS[key])
    if not isinstance(value, dict):
        raise FP8LMError(f"{where}: key 'scale_method': expected a method name or a dict, got {type(value).__name__}")
    unknown = set(value) - {"default", "nodes", "layers", "layer_types"}
    if unknown:
        raise FP8LMError(f"{where}: key 'scale_method': unknown keys {sorted(unknown)}; "
                         "allowed: default, nodes, layers, layer_types")
    default = _method_from_dict(value.get("default", {}), NAMED_METHODS["maxabs_hw"], f"{where}: scale_method.default")
    groups = {}
    for group in ("nodes", "layers", "layer_types"):
        entries = value.get(group, {})
        if not isinstance(entries, dict):
            raise FP8LMError(f"{where}: key 'scale_method.{group}': expected a dict of name -> method")
        groups[group] = {str(k): _method_from_dict(v, default, f"{where}: scale_method.{group}.{k}")
                         for k, v in entries.items()}
    return ScaleMethodConfig("custom", default, **groups)


def _method_from_dict(value, base: MethodSpec, where: str) -> MethodSpec:
    if isinstance(value, str):
        return parse_scale_method(value, where).default
    if not isinstance(value, dict) or set(value) - {"weight", "activation"}:
        raise FP8LMError(f"{where}: expected a method name or {{'weight': {{...}}, 'activation': {{...}}}}")
    return MethodSpec(_spec_from_dict(value.get("weight", {}), base.weight, f"{where}.weight"),
                      _spec_from_dict(value.get("activation", {}), base.activation, f"{where}.activation"))


def _spec_from_dict(value: dict, base: ScaleSpec, where: str) -> ScaleSpec:
    if not isinstance(value, dict):
        raise FP8LMError(f"{where}: expected a dict")
    allowed = {"granularity": GRANULARITIES, "scale_value_type": VALUE_TYPES, "rounding_method": ROUNDINGS}
    unknown = set(value) - set(allowed) - {"backoff", "params"}
    if unknown:
        raise FP8LMError(f"{where}: unknown keys {sorted(unknown)}; allowed: "
                         "granularity, scale_value_type, rounding_method, backoff, params")
    changes = {}
    for key, choices in allowed.items():
        if key in value:
            v = str(value[key]).upper()
            if v not in choices:
                raise FP8LMError(f"{where}: key {key!r}: value {value[key]!r} is not allowed; allowed: {', '.join(choices)}")
            changes[{"scale_value_type": "value_type", "rounding_method": "rounding"}.get(key, key)] = v
    if "backoff" in value:
        backoff = value["backoff"]
        if not isinstance(backoff, (int, float)) or not 0 < backoff <= 1:
            raise FP8LMError(f"{where}: key 'backoff': value {backoff!r} must be a number in (0, 1]")
        changes["backoff"] = float(backoff)
    params = value.get("params") or {}
    if "weight_scales" in params:
        changes["candidates"] = tuple(float(s) for s in params["weight_scales"])
    return replace(base, **changes)
