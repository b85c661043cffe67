"""A file a command wrote, as it wrote it: its bytes (or, for a Core ML package, its files' bytes),
their SHA-256 and its sizes on disk and zipped. Each writer in ``flow/`` returns one, so that the
stages after it -- describing, measuring, reporting -- take these figures instead of reading the
file back."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .files import atomic_output


@dataclass(frozen=True)
class WrittenFile:
    """``path`` as written. ``content`` is a single file's bytes (empty for a folder), ``files`` a
    folder's files' bytes by their path inside it; ``spec`` the Core ML spec read once where the writer
    needed it."""

    path: Path
    sha256: str
    size_bytes: int
    zipped_bytes: int
    content: bytes = field(default=b"", repr=False)
    spec: Any = field(default=None, repr=False, compare=False)
    files: Mapping[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    #: A folder's empty folders, by their path inside it: a package's manifest may name one (an ML
    #: Program without a weight file keeps an empty ``weights/``), so a copy must have them too.
    folders: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def of_bytes(cls, path: Path | str, content: bytes, spec: Any = None) -> "WrittenFile":
        """A single file whose content is ``content`` (nothing is read)."""
        path = Path(path)
        return cls(path, hashlib.sha256(content).hexdigest(), len(content), _zipped({path.name: content}),
                   content, spec)

    @classmethod
    def of_folder(cls, path: Path | str, spec: Any = None) -> "WrittenFile":
        """A folder (an ``.mlpackage``), each of its files read once; the hash and sizes are those of
        ``core.files.sha256_file``, ``size_on_disk`` and ``zipped_size``."""
        path = Path(path)
        files = {str(f.relative_to(path)): f.read_bytes() for f in sorted(p for p in path.rglob("*") if p.is_file())}
        empty = tuple(str(d.relative_to(path)) for d in sorted(path.rglob("*")) if d.is_dir() and not any(d.iterdir()))
        return dataclasses.replace(cls.of_files(path, files, spec), folders=empty)

    @classmethod
    def of_file(cls, path: Path | str, spec: Any = None) -> "WrittenFile":
        """A file or a folder on disk, read once."""
        path = Path(path)
        return cls.of_folder(path, spec) if path.is_dir() else cls.of_bytes(path, path.read_bytes(), spec)

    @classmethod
    def of_files(cls, path: Path | str, files: Mapping[str, bytes], spec: Any = None) -> "WrittenFile":
        """A folder whose files (by their path inside it) hold ``files`` (nothing is read)."""
        path = Path(path)
        files = dict(sorted(files.items(), key=lambda kv: Path(kv[0])))  # the order of core.files.sha256_file
        h = hashlib.sha256()
        for name, data in files.items():
            h.update(name.encode())
            h.update(b"\0")
            h.update(data)
        return cls(path, h.hexdigest(), sum(len(d) for d in files.values()),
                   _zipped({f"{path.name}/{name}": data for name, data in files.items()}), b"", spec, files)

    @property
    def is_folder(self) -> bool:
        return bool(self.files)

    def write_to(self, path: Path | str) -> None:
        """Write these bytes at ``path`` (a temporary place the caller renames into position)."""
        path = Path(path)
        if not self.is_folder:
            path.write_bytes(self.content)
            return
        for name, data in self.files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
        for name in self.folders:
            (path / name).mkdir(parents=True, exist_ok=True)

    def moved_to(self, path: Path | str) -> "WrittenFile":
        """The same file under the name it was renamed to (written as a temporary file first)."""
        return dataclasses.replace(self, path=Path(path))


def write_file(path: Path | str, content: bytes, *, force: bool = False) -> WrittenFile:
    """Write ``content`` to ``path`` atomically (an existing file is replaced only with ``force``)."""
    with atomic_output(Path(path), force=force) as tmp:
        tmp.write_bytes(content)
    return WrittenFile.of_bytes(path, content)


def _zipped(files: Mapping[str, bytes]) -> int:
    """Bytes after DEFLATE at level 9 (as ``core.files.zipped_size``), of contents held in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getbuffer().nbytes
