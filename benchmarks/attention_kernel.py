"""The CPU kernels' FP8 attention (`paged_attention`) alone, at SmolLM2's shapes (9 query heads, 3 KV
heads, head_dim 64, 16-token blocks): causal prompt chunks and batched decode steps over random FP8
caches, with the scales of fp8lm's default recipe (K/V read at their caches' own scales) or with
scales that make the kernel cast K/V onto the matmuls' grids again (--requantize). Prints ms per layer
call and GFLOP/s of the causal q·k and p·v (4 x visible keys x head_dim x heads).

    python benchmarks/attention_kernel.py [--requantize] [--save out.pt | --compare out.pt]

--save / --compare write or check the outputs, for a bit-for-bit comparison between two revisions
(run one from a git worktree via PYTHONPATH).
"""
from __future__ import annotations

import argparse

import torch

from fp8lm.eval.throughput import best_seconds
from fp8lm.fp8.cpu_kernels import cpu_kernels

E4M3 = torch.float8_e4m3fn
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16
CASES = ((1, 512, 512), (1, 256, 2048), (4, 256, 512), (16, 1, 600), (1, 37, 200))   # sequences, queries, context
# A layer's scales from `fp8lm calibrate smollm2-135m-instruct` (the default recipe): 1/sqrt(d), q·k's
# inputs, the softmax output, p·v's inputs, the K and V caches.
RECIPE = [0.125, 0.0028935, 0.0152832, 1 / 448, 1 / 448, 0.0013423, 0.0152832, 0.0013423]
OTHER = [0.125, 0.0028935, 2 * 0.0152832, 1 / 448, 1 / 448, 3 * 0.0013423, 0.0152832, 0.0013423]


def case_inputs(batch: int, queries: int, context: int):
    g = torch.Generator().manual_seed(batch * 7919 + queries * 31 + context)
    blocks = -(-context // BLOCK)
    caches = [(torch.randn(KV_HEADS, batch * blocks, BLOCK, HEAD_DIM, generator=g) * 60).clamp(-448, 448).to(E4M3)
              for _ in range(2)]
    tables = torch.arange(batch * blocks).view(batch, blocks)
    q = torch.randn(batch, queries, HEADS, HEAD_DIM, generator=g) * 20
    positions = torch.arange(context - queries, context)
    visible = torch.arange(blocks * BLOCK)[None, :] <= positions[:, None]
    bias = torch.where(visible, 0.0, float("-inf")).expand(batch, queries, -1).contiguous()
    keys = int(visible.sum()) * batch
    return q, caches, tables, bias, keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requantize", action="store_true", help="matmul scales other than the caches'")
    parser.add_argument("--save", help="write the outputs to this file")
    parser.add_argument("--compare", help="check the outputs against this file, bit for bit")
    args = parser.parse_args()
    kernels = cpu_kernels()
    if kernels is None:
        raise SystemExit("the CPU kernels are not available here")
    scales = OTHER if args.requantize else RECIPE
    print(f"kernels: {kernels.isa}; torch threads {torch.get_num_threads()}; "
          f"{'K/V cast onto other scales' if args.requantize else 'the default recipe scales'}")
    outputs = []
    for batch, queries, context in CASES:
        q, (k, v), tables, bias, keys = case_inputs(batch, queries, context)
        call = lambda: kernels.paged_attention(q, k, v, tables, bias, scales, (True, True), k.dtype, 448.0)
        outputs.append(call())
        seconds = best_seconds(call, 7)
        print(f"{batch} x {queries} queries over {context} keys: {seconds * 1e3:7.2f} ms, "
              f"{4 * keys * HEAD_DIM * HEADS / seconds / 1e9:6.1f} GFLOP/s", flush=True)
    if args.save:
        torch.save(outputs, args.save)
    if args.compare:
        same = [torch.equal(a, b) for a, b in zip(outputs, torch.load(args.compare))]
        print("outputs bit for bit the same" if all(same) else f"outputs differ: {same}")


if __name__ == "__main__":
    main()
