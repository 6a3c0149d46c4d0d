"""Compiling fp8lm's C++ extensions (csrc/) into the cache folder, once per source version, machine
and torch install, and loading them from there afterwards."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch


def build_extension(cache: Path, prefix: str, csrc: Path, sources: tuple[str, ...], what: str, log: logging.Logger,
                    extra_ldflags: tuple[str, ...] = ()):
    """Builds (or loads) the extension whose entry file is sources[0] (`what`: its owner, possessive,
    for `log`'s messages) -> (module, seconds it took to compile, or None when it was already built)."""
    from torch.utils import cpp_extension

    from fp8lm.files import check_private, make_dirs

    if shutil.which("ninja") is None:
        # cpp_extension runs `ninja` from PATH; the ninja wheel (a dependency) puts it next to this
        # interpreter, which is not on PATH when a venv's python runs without activation.
        os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

    digest = hashlib.sha256(b"".join((csrc / s).read_bytes() for s in sources)
                            + "\0".join(extra_ldflags).encode()).hexdigest()[:12]
    name = f"{prefix}_{digest}"
    # One folder per torch install too: ninja also rebuilds when torch's include path changes (another venv).
    where = hashlib.sha256(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:8]
    build_dir = cache / "kernels" / f"torch-{torch.__version__}-{where}" / name
    fresh = not any(build_dir.glob(f"{name}*.so"))
    if fresh:
        log.info("compiling %s extension into %s (once, about 30 s)", what, build_dir)
    make_dirs(build_dir)
    # Compiled from a copy inside the build folder: ninja rebuilds when a source's path changes, and
    # a checkout and an installed wheel (the same sources elsewhere) would rebuild each other's .so.
    copies = build_dir / "src"
    make_dirs(copies)
    for s in sources:
        if not (copies / s).is_file():
            tmp = copies / f".{s}.{os.getpid()}"
            shutil.copyfile(csrc / s, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, copies / s)
    start = time.perf_counter()
    for trusted in (cache, build_dir, *build_dir.glob("*.so")):
        check_private(trusted, f"{what} build folder" if trusted.is_dir() else f"{what} module")
    # -fopenmp makes at::parallel_for use torch's thread pool (the libgomp torch has loaded).
    module = cpp_extension.load(name, [str(copies / sources[0])], extra_cflags=["-O3", "-fopenmp"],
                                extra_ldflags=["-fopenmp", *extra_ldflags], extra_include_paths=[str(copies)],
                                build_directory=str(build_dir), verbose=False)
    for built in build_dir.glob("*.so"):
        os.chmod(built, 0o755)          # as the umask left it, a group could write it: checked next time
    return module, (time.perf_counter() - start if fresh else None)


def build_failure(e: Exception) -> str:
    """A failed build's reason in one line (a compiler's log runs to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
