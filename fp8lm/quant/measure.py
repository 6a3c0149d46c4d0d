"""MEASURE mode: observers on every allowlisted module, and the files they produce."""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from fp8lm.quant.config import QuantConfig
from fp8lm.quant.measure_files import file_payload, measurement_base, write_files
from fp8lm.quant.modules import quantizable_modules
from fp8lm.quant.observers import MaxAbsObserver, make_observer
from fp8lm.version import __version__

log = logging.getLogger(__name__)


@dataclass
class NodeObservers:
    inputs: list[MaxAbsObserver]
    outputs: list[MaxAbsObserver]
    params: dict[str, MaxAbsObserver] = field(default_factory=dict)

    def as_node(self) -> dict:
        node = {"inputs": [o.result() for o in self.inputs]}
        if self.outputs:
            node["outputs"] = [o.result() for o in self.outputs]
        if self.params:
            node["params"] = {k: o.result() for k, o in self.params.items()}
        return node


class Measurement:
    """Attaches observers to `model` now (weights are measured at once) and collects until `write`."""

    def __init__(self, model: nn.Module, config: QuantConfig, metadata: dict, rank: int = 0, world_size: int = 1):
        self.config, self.metadata = config, metadata
        self.rank, self.world_size = rank, world_size
        self.nodes: dict[str, NodeObservers] = {}
        self.num_samples = 0
        self.num_tokens = 0
        self._handles = []
        for name, module, types, kind in quantizable_modules(model):
            if config.should_quantize(name, types):
                self._attach(name, module, kind)
        log.info("measuring %d modules (observer %s)", len(self.nodes), config.observer)

    def _attach(self, name: str, module: nn.Module, kind) -> None:
        cfg = self.config
        finite_only = kind.name == "softmax"
        inputs = [make_observer(cfg.observer, "activation", finite_only) for _ in range(kind.num_inputs)] \
            if cfg.measures_inputs() else []
        outputs = [make_observer(cfg.observer, "activation")] \
            if kind.output_required or cfg.measures_outputs() else []
        node = NodeObservers(inputs, outputs)
        if cfg.measures_params():
            for pname in kind.params:
                obs = make_observer(cfg.observer, "weight")
                obs.update(getattr(module, pname).detach())
                node.params[pname] = obs
        self.nodes[name] = node

        def hook(mod, args, output):
            for obs, x in zip(node.inputs, args):
                obs.update(x)
            for obs in node.outputs:
                obs.update(output)

        self._handles.append(module.register_forward_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def base_path(self) -> Path:
        return measurement_base(self.config.stats_prefix, self.config.observer, self.rank, self.world_size)

    def write(self) -> list[Path]:
        metadata = {**self.metadata, "num_samples": self.num_samples, "num_tokens": self.num_tokens,
                    "observer": self.config.observer, "measure_exclude": self.config.measure_exclude,
                    "rank": self.rank, "world_size": self.world_size, "fp8lm_version": __version__,
                    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        nodes = {name: obs.as_node() for name, obs in self.nodes.items()}
        payload = file_payload(nodes, "DynamicRange", self.rank, self.world_size, self.num_samples, metadata)
        paths = write_files(self.base_path(), payload)
        log.info("wrote measurements of %d modules to %s", len(nodes), paths[0])
        return paths
