"""Files: reading the JSON users hand us (one clear error naming the file and the problem), the
cache fp8lm keeps (trusted only if it is the user's own), and writes that survive a crash."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from fp8lm.errors import FP8LMError


def read_json(path: Path, label: str, error: type[FP8LMError] = FP8LMError):
    """`label` says what the file is to the user (e.g. "QUANT_CONFIG"); `error` is the type raised."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{label} {path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{label} {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def cache_dir() -> Path:
    """Where fp8lm keeps what it builds or downloads once per machine (FP8LM_CACHE, default ~/.cache/fp8lm)."""
    return Path(os.environ.get("FP8LM_CACHE") or Path.home() / ".cache" / "fp8lm")


def make_dirs(path: Path) -> None:
    """mkdir -p, the folders it creates readable by all and writable by this user only (whatever the
    umask: `check_private` trusts nothing others can write)."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for folder in missing:
        os.chmod(folder, 0o755)


def check_private(path: Path, what: str) -> None:
    """Refuses to use `path` (a cached model folder, built code) unless this user owns it and nobody
    else may write to it: fp8lm would otherwise load code or weights that another user planted."""
    st = Path(path).stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise FP8LMError(f"{what} {path}: owned by uid {st.st_uid} with mode {oct(st.st_mode & 0o777)}; fp8lm "
                         f"uses only a cache of its own user that others cannot write (fix its owner and mode, or "
                         f"set FP8LM_CACHE to another folder)")


def fsync(path: Path) -> None:
    """Flushes a file's contents (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(moves: list[tuple[Path, Path]]) -> None:
    """Moves each written temporary file over its target: the contents reach the disk before any
    name changes, the names after; a crash leaves the old files or the new ones. The last move is
    the commit point (put the file readers look at last)."""
    for temp, _ in moves:
        fsync(temp)
    for temp, target in moves:
        os.replace(temp, target)
    for folder in {target.parent for _, target in moves}:
        fsync(folder)


@contextlib.contextmanager
def undone_on_failure(folder: Path, prefixes: tuple[str, ...]):
    """When the block raises (an interrupt too), the files in `folder` whose names start with one of
    `prefixes` (after any leading dots: temporaries) are as they were before it: new ones removed, the
    earlier ones put back. The block must write by replacing files, never in place: the earlier ones
    are kept as hard links (copies where the filesystem has none)."""
    def ours(p: Path) -> bool:
        return p.is_file() and p.name.lstrip(".").startswith(prefixes)

    kept = Path(tempfile.mkdtemp(prefix=".fp8lm-before-", dir=folder))
    try:
        before = {p.name for p in folder.iterdir() if ours(p)}
        for name in before:
            try:
                os.link(folder / name, kept / name)
            except OSError:
                shutil.copy2(folder / name, kept / name)
        try:
            yield
        except BaseException:
            for p in folder.iterdir():
                if ours(p) and p.name not in before:
                    p.unlink(missing_ok=True)
            for name in before:
                os.replace(kept / name, folder / name)
            raise
    finally:
        shutil.rmtree(kept, ignore_errors=True)
