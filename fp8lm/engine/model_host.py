"""What every tensor-parallel rank holds: its shard of the model — measured or quantized as the
QUANT_CONFIG says — and, once told how big, its KV cache. Rank 0's LLMEngine holds one; the other
ranks' WorkerEngine holds one and runs the steps rank 0 broadcasts."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from fp8lm.engine.config import EngineConfig, resolve_device, resolve_dtype
from fp8lm.engine.memory import keep_freed_memory_for_reuse
from fp8lm.engine.model_runner import ModelRunner
from fp8lm.engine.step_channel import StepChannel
from fp8lm.engine.parallel import DistInfo, check_divisible, init_group, rank_device, backend_for
from fp8lm.errors import FP8LMError
from fp8lm.fp8.cpu_kernels import kernels_for
from fp8lm.fp8.formats import device_tag
from fp8lm.model.config import ModelConfig
from fp8lm.model.fingerprint import model_fingerprint
from fp8lm.model.linear import bfloat16_matmul_is_slow, pack_linears_for_cpu
from fp8lm.model.llama import TensorParallel
from fp8lm.model.loader import load_model
from fp8lm.model.registry import resolve_model
from fp8lm.quant.bfloat16_format import bfloat16_in_float32_sums
from fp8lm.quant.checkpoint_formats import checkpoint_quantization
from fp8lm.quant.fused_decode import fuse_decode_steps
from fp8lm.quant.fused_ops import fuse_plain_attention
from fp8lm.quant.online_fp8 import OnlineFP8
from fp8lm.quant.measure import Measurement
from fp8lm.quant.quantize import Quantizer

log = logging.getLogger(__name__)


class ModelHost:
    def __init__(self, config: EngineConfig, dist_info: DistInfo | None = None):
        self.config = config
        self.rank, self.world_size = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
        self.model_path: Path = resolve_model(config.model)
        self.model_config = ModelConfig.from_folder(self.model_path)
        self.device = rank_device(resolve_device(config.device), dist_info.local_rank if dist_info else 0)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu" and not keep_freed_memory_for_reuse():
            log.info("not glibc: steps' tensors are allocated by the system's default malloc settings")
        self.max_model_len = self._max_model_len()
        if self.world_size > 1:
            check_divisible(self.model_config, self.world_size)
        start = time.perf_counter()
        self.quantizer = self._make_quantizer()
        self.model = load_model(self.model_path, self.dtype, self.device, tp=TensorParallel(self.rank, self.world_size),
                                transform=self.quantizer.patch if self.quantizer else None,
                                rename=self.quantizer.rename if self.quantizer else None)
        if self.quantizer is not None:
            self.quantizer.finish(self.model)
        self.measurement = self._start_measurement()
        if self.device.type == "cpu":
            pack_linears_for_cpu(self.model, batch_hint=min(config.max_num_seqs, 32))
            kernels = kernels_for(self.device)
            if self.dtype == torch.bfloat16 and kernels is not None and bfloat16_matmul_is_slow():
                bfloat16_in_float32_sums(self.model, kernels)
            if kernels is not None:
                fuse_plain_attention(self.model, kernels)
                fuse_decode_steps(self.model, kernels)
        log.info("loaded %s in %.2f s (%s, %s%s)", self.model_path, time.perf_counter() - start, self.device,
                 self.dtype, f", rank {self.rank}/{self.world_size}" if self.world_size > 1 else "")

    def _max_model_len(self) -> int:
        limit = self.model_config.max_position_embeddings
        value = self.config.max_model_len or limit
        if value > limit:
            raise FP8LMError(f"max_model_len={value} exceeds the model's max_position_embeddings={limit} "
                             f"({self.model_path}/config.json)")
        return value

    def _make_quantizer(self):
        """A Quantizer (QUANT_CONFIG), a quantized checkpoint's reader, or None."""
        quant, kv_fp8 = self.config.quant, self.config.kv_cache_fp8
        saved = self.model_config.raw.get("quantization_config")
        if saved is not None:
            if self.config.quantization is not None:
                raise FP8LMError(f"{self.model_path} is already quantized ({saved.get('quant_method')}); run it "
                                 "without --quantization / QUANT_CONFIG")
            return checkpoint_quantization(self.model_path, saved, self.device, self.dtype, kv_fp8)
        if self.config.quantization == "fp8":
            return OnlineFP8(self.device, self.dtype, kv_fp8)
        if quant is None and kv_fp8:
            raise FP8LMError(f"kv_cache_dtype={self.config.kv_cache_dtype!r} needs quantization 'fp8' or 'inc', or an "
                             "FP8 checkpoint")
        if quant is None or quant.mode == "MEASURE":
            return None
        if quant.mode == "LOAD":
            raise FP8LMError(f"{quant.source}: mode LOAD reloads a checkpoint written by `fp8lm quantize`: pass its "
                             f"folder as the model (no QUANT_CONFIG needed)")
        return Quantizer(quant, self.device, self.dtype, model_fingerprint(self.model_path),
                         kv_cache_fp8=kv_fp8, rank=self.rank,
                         world_size=self.world_size)

    def _start_measurement(self) -> Measurement | None:
        quant = self.config.quant
        if quant is None or quant.mode != "MEASURE":
            return None
        metadata = {"device": device_tag(self.device), "compute_dtype": str(self.dtype).replace("torch.", ""),
                    "model": model_fingerprint(self.model_path)}
        return Measurement(self.model, quant, metadata, self.rank, self.world_size)

    def make_runner(self, num_blocks: int, channel: StepChannel | None = None,
                    decode_graph_buckets: list[int] | None = None) -> ModelRunner:
        return ModelRunner(self.model, num_blocks, self.config.block_size, self.max_model_len, self.device,
                           self.dtype, channel, decode_graph_buckets)

    def write_measurement(self) -> list[Path]:
        paths = self.measurement.write()
        self._stop_measuring()
        if self.world_size > 1:
            torch.distributed.barrier()     # every rank's file is complete when this returns
        return paths

    def discard_measurement(self) -> None:
        self._stop_measuring()

    def _stop_measuring(self) -> None:
        if self.measurement is not None:
            self.measurement.detach()
            self.measurement = None


class WorkerEngine:
    """A rank > 0: loads its shard (its model host), then runs whatever rank 0 broadcasts until told to stop."""

    def __init__(self, config: EngineConfig, dist_info: DistInfo, rendezvous: str | int):
        """`rendezvous`: "env://" or the port of rank 0's store on this host (see init_group)."""
        init_group(backend_for(resolve_device(config.device)), dist_info.rank, dist_info.world_size, rendezvous)
        self.host = ModelHost(config, dist_info)
        self.channel = StepChannel()
        self.runner: ModelRunner | None = None

    def serve(self) -> None:
        try:
            while True:
                message = self.channel.receive()
                kind = message[0]
                if kind == "init":
                    self.runner = self.host.make_runner(message[1])
                elif kind == "step":
                    self.runner.execute(*message[1:])
                elif kind == "finalize":
                    self.host.write_measurement()
                elif kind == "discard":
                    self.host.discard_measurement()
                elif kind == "shutdown":
                    return
        finally:
            torch.distributed.destroy_process_group()


def run_worker(config: EngineConfig, dist_info: DistInfo, port: int) -> None:
    """Entry point of a rank > 0 started by fp8lm itself (engine/parallel.py spawns it)."""
    WorkerEngine(config, dist_info, port).serve()
