"""oneDNN's prepacked bf16 x bf16 -> float32 matmul inside a torch process, against fp8lm's FP8 kernel on
the same FP8 values (issue #27): GFLOP/s of the kernel, of oneDNN behind torch ops for the activations'
FP8 cast, of oneDNN with the weight widened and reordered on every call (1 byte at rest), and of
oneDNN's matmul alone; and the largest difference between oneDNN's and the kernel's outputs.

Needs oneDNN's shared library from PyPI (CPU only, GNU OpenMP like torch; not a dependency):
    pip download --no-deps -d /tmp/onednn onednn-cpu-gomp==2023.2.0 && cd /tmp/onednn && unzip -q *.whl
    python benchmarks/onednn_in_process.py --lib /tmp/onednn/onednn_cpu_gomp-2023.2.0.data/data/lib
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from fp8lm.fp8.cpu_kernels import kernel_col_scale, kernels_for, pack_panels

E4M3 = torch.float8_e4m3fn
SHAPES = ((512, 576, 576), (2048, 576, 576), (512, 576, 1536), (2048, 576, 1536), (512, 1536, 576),
          (2048, 1536, 576), (16, 576, 1536))        # rows, K, N


def best(f, n=7) -> float:
    f()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", required=True, help="the folder holding libdnnl.so.3")
    args = parser.parse_args()
    lib = Path(args.lib)
    if not (lib / "libdnnl.so").exists():
        (lib / "libdnnl.so").symlink_to(lib / "libdnnl.so.3")
    ext = load("onednn_matmul_ext", [str(Path(__file__).with_name("onednn_matmul_ext.cpp"))],
               extra_ldflags=[f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}"], extra_cflags=["-O2"],
               build_directory=tempfile.mkdtemp())
    kernels = kernels_for(torch.device("cpu"))
    table = torch.arange(256, dtype=torch.uint8).view(E4M3).to(torch.bfloat16).view(torch.int16)
    print(f"torch threads {torch.get_num_threads()}; fp8lm kernels: {kernels.isa}")
    for m, k, n in SHAPES:
        g = torch.Generator().manual_seed(0)
        w8 = (torch.randn(n, k, generator=g) * 50).clamp(-448, 448).to(E4M3)
        x = torch.randn(m, k, generator=g)
        sx, sw = torch.tensor([x.abs().max().item() / 448]), torch.tensor([1.0])
        panels = pack_panels(w8)
        fp8lm = lambda: kernels.linear(x, panels, n, E4M3, kernel_col_scale(sw, n, E4M3), sx, 1 / sx, 448.0)
        plan = ext.plan(m, k, n)
        widened = ext.widen(w8.view(torch.uint8).reshape(-1), table).view(n, k)
        if not torch.equal(widened, w8.to(torch.bfloat16)):
            raise SystemExit("the widening table is wrong")
        packed = ext.pack(plan, widened)
        cast = lambda: (x / sx).clamp(-448, 448).to(E4M3).to(torch.bfloat16)
        prepacked = lambda: ext.matmul(plan, cast(), packed) * sx
        per_call = lambda: ext.matmul(plan, cast(), ext.pack(
            plan, ext.widen(w8.view(torch.uint8).reshape(-1), table).view(n, k))) * sx
        xb = cast()
        alone = lambda: ext.matmul(plan, xb, packed)
        reference = fp8lm()
        diff = float((prepacked() - reference).abs().max() / reference.abs().max())
        gflop = 2 * m * k * n / 1e9
        print(f"{m}x{k} @ {k}x{n}: fp8lm kernel {gflop / best(fp8lm):.0f} GFLOP/s; oneDNN prepacked + torch cast "
              f"{gflop / best(prepacked):.0f}, widened and reordered per call {gflop / best(per_call):.0f}, "
              f"matmul alone {gflop / best(alone):.0f}; torch's cast {best(cast) * 1e3:.2f} ms; "
              f"max difference {diff:.1e} of the largest output", flush=True)


if __name__ == "__main__":
    main()
