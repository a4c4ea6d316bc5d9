"""Atomic writes: write to a temporary name in the same folder, then rename; a crash leaves nothing valid-looking."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path next to `path`; on success fsync and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success fsync every file in it and the folder itself, then
    rename it onto `path` (replacing an old one): after a power loss the folder is whole or absent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every folder (deepest first), so their entries are durable."""
    folders = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        folders += [Path(dirpath) / d for d in dirnames]
        for name in filenames:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
    for folder in reversed(folders):
        fsync_dir(folder)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(new: Path, directory: Path) -> None:
    """Put the finished folder `new` at `directory` (replacing an old one) with as few steps as possible.

    Readers that opened the old folder keep their memory-mapped files (unlinked files live while mapped).
    """
    if directory.exists():
        if _exchange(new, directory):
            shutil.rmtree(new)  # `new` now holds the old folder
        else:
            old = directory.parent / f".{directory.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(new, directory)
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, directory)
    fsync_dir(directory.parent)
