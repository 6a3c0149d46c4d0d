"""Rank 0 -> every rank: the commands and step inputs of tensor parallelism, in a fixed schema of
integers and tensor bytes (no pickled objects: a rank runs nothing it is sent, it only reads numbers).

A message is three broadcasts over a gloo group of its own, whose timeout is IDLE_TIMEOUT (created
collectively: every rank builds one): a header [kind, argument, layout length, payload bytes], the
layout (int64: how the tensors nest and their dtypes and shapes), and the payload (their bytes).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fp8lm.engine.parallel import IDLE_TIMEOUT
from fp8lm.model.attention import AttentionMetadata, StepMetadata

KINDS = ("init", "step", "finalize", "discard", "shutdown")
DTYPES = (torch.int64, torch.int32, torch.float32, torch.bfloat16, torch.float16, torch.bool)
_TENSORS = ("slot_mapping", "block_tables", "query_index", "flat_index", "attn_bias")


class StepChannel:
    def __init__(self):
        self.group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def send(self, message: tuple) -> None:
        """("init", num_blocks), ("step", input_ids, positions, metadata), ("finalize",), ("discard",),
        ("shutdown",)."""
        kind, args = message[0], message[1:]
        layout, tensors, argument = [], [], 0
        if kind == "init":
            argument = int(args[0])
        elif kind == "step":
            input_ids, positions, meta = args
            _add_tensor(layout, tensors, input_ids)
            _add_tensor(layout, tensors, positions)
            _add_meta(layout, tensors, meta)
        payload = torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in tensors]) if tensors else \
            torch.empty(0, dtype=torch.uint8)
        header = torch.tensor([KINDS.index(kind), argument, len(layout), payload.numel()], dtype=torch.int64)
        for t in (header, torch.tensor(layout, dtype=torch.int64), payload):
            if t.numel():
                dist.broadcast(t, src=0, group=self.group)

    def receive(self) -> tuple:
        header = torch.empty(4, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.group)
        kind, argument, layout_len, payload_len = header.tolist()
        layout = torch.empty(layout_len, dtype=torch.int64)
        payload = torch.empty(payload_len, dtype=torch.uint8)
        for t in (layout, payload):
            if t.numel():
                dist.broadcast(t, src=0, group=self.group)
        name = KINDS[kind]
        if name == "init":
            return name, argument
        if name != "step":
            return (name,)
        reader = _Reader(layout.tolist(), payload)
        return name, reader.tensor(), reader.tensor(), reader.meta()


def _add_tensor(layout: list[int], tensors: list[torch.Tensor], t: torch.Tensor) -> None:
    layout += [DTYPES.index(t.dtype), t.dim(), *t.shape]
    tensors.append(t.cpu())


def _add_meta(layout: list[int], tensors: list[torch.Tensor], meta) -> None:
    if isinstance(meta, StepMetadata):
        layout += [1, len(meta.parts)]
        for part in meta.parts:
            _add_meta(layout, tensors, part)
        return
    layout += [0, meta.max_context_len, len(meta.windows)]
    for name in _TENSORS:
        _add_tensor(layout, tensors, getattr(meta, name))
    for window, view in meta.windows.items():
        layout.append(window)
        _add_meta(layout, tensors, view)


class _Reader:
    def __init__(self, layout: list[int], payload: torch.Tensor):
        self.layout, self.at, self.payload, self.offset = layout, 0, payload, 0

    def _int(self) -> int:
        self.at += 1
        return self.layout[self.at - 1]

    def tensor(self) -> torch.Tensor:
        dtype, ndim = DTYPES[self._int()], self._int()
        shape = [self._int() for _ in range(ndim)]
        n = torch.Size(shape).numel() * dtype.itemsize
        data = self.payload[self.offset:self.offset + n].clone()      # aligned for its dtype
        self.offset += n
        return data.view(dtype).reshape(shape)

    def meta(self):
        if self._int() == 1:
            return StepMetadata([self.meta() for _ in range(self._int())])
        max_context_len, num_windows = self._int(), self._int()
        fields = {name: self.tensor() for name in _TENSORS}
        windows = {}
        for _ in range(num_windows):
            window = self._int()
            windows[window] = self.meta()
        return AttentionMetadata(max_context_len=max_context_len, windows=windows, **fields)
