"""Files on disk: atomic outputs, hashes, sizes (on disk and zipped)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from .errors import InputError, OutputExistsError


def check_output(path: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work is done, an output that exists (without ``force``) or is an input."""
    path = Path(path)
    for src in inputs:
        if src is not None and path.resolve() == Path(src).resolve():
            raise InputError(f"output {path} is the input; inputs are never modified",
                             hint="choose another output path with -o")
    if path.exists() and not force:
        raise OutputExistsError(path)
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"cannot write {path}: {parent} is not a directory")


@contextlib.contextmanager
def atomic_output(path: Path, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place.

    The temporary file (or folder, for ``directory=True``, e.g. an ``.mlpackage``)
    lives in the target's folder so the final rename is atomic; if the body raises
    or is interrupted, it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = tmp_dir / path.name
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to the temporary output for {path}")
        if path.exists() and (path.is_dir() and not path.is_symlink()):
            # A folder cannot be replaced atomically: move the old one aside first.
            old = tmp_dir / (path.name + ".old")
            os.replace(path, old)
            os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, or of a folder's files (sorted relative paths and contents)."""
    h = hashlib.sha256()
    path = Path(path)
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            h.update(b"\0")
            h.update(f.read_bytes())
        return h.hexdigest()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or the sum of a folder's files (an ``.mlpackage``)."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def zipped_size(path: Path) -> int:
    """Bytes after DEFLATE compression at level 9, as an app bundle / download would be."""
    path = Path(path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                zf.write(f, str(f.relative_to(path.parent)))
        else:
            zf.write(path, path.name)
    return buf.getbuffer().nbytes


def zipped_size_of_bytes(data: bytes, name: str) -> int:
    """:func:`zipped_size` of a file's content held in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr(name, data)
    return buf.getbuffer().nbytes


def require_file(path: Path, what: str = "file") -> Path:
    """A readable, non-empty regular file, or a clear error naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path} is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise InputError(f"{what} {path} is empty (0 bytes)")
    return path
