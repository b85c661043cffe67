"""The search cache of ``tbopt optimize``: every finished evaluation (and the file or float model it
made) under ``--out/.tbopt-search/``, keyed by recipe and by everything the evaluation depends on,
so that ``--resume`` continues an interrupted search without redoing finished candidates.

Each entry is written atomically (the file first, its record last): an interrupt leaves either a
whole entry or none. A record holds the SHA-256 and size of its file, taken when it was stored;
an entry is trusted only when its record is whole (every field, of its type) and its file still has
those bytes. Any other entry is redone, with a note that names it and says why.

A file is read at most once per search: one found in the cache is checked on the bytes read then,
which the search goes on with (:meth:`SearchCache.file`); one made in this run is stored with the
bytes it was written from (a :class:`~tinybeauty_cli.core.written.WrittenFile`), never read back.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

from ..core.errors import OutputError
from ..core.files import atomic_output
from ..core.progress import Progress, SilentProgress
from ..core.written import WrittenFile

T = TypeVar("T")


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class SearchCache:
    """Records and files by recipe key, for one search context (checkpoint, images, settings)."""

    def __init__(self, root: Path, context: Mapping[str, Any], progress: Progress | None = None):
        self.root = Path(root)
        self.context = dict(context)
        self.progress = progress or SilentProgress()
        self._context_digest = digest(self.context)
        self._files: dict[str, WrittenFile] = {}  # by key: each file as written or read in this run

    def exists(self) -> bool:
        return self.root.is_dir() and any(self.root.iterdir())

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def same_context(self) -> bool:
        """True when the cache was made with the same checkpoint, images and settings."""
        path = self.root / "context.json"
        try:
            return json.loads(path.read_text()) == json.loads(json.dumps(self.context, default=str))
        except (OSError, ValueError):
            return False

    def start(self) -> None:
        with atomic_output(self.root / "context.json", force=True) as tmp:
            tmp.write_text(json.dumps(self.context, indent=2, default=str) + "\n")

    def _id(self, key: str) -> str:
        return digest([self._context_digest, key])[:20]

    def record_path(self, key: str) -> Path:
        return self.root / "records" / f"{self._id(key)}.json"

    def file_dir(self, key: str) -> Path:
        """The folder a candidate's file is written into (its final name inside)."""
        return self.root / "files" / self._id(key)

    def model_path(self, key: str) -> Path:
        return self.root / "models" / f"{self._id(key)}.pt"

    def load(self, key: str, parse: Callable[[dict[str, Any]], T]) -> T | None:
        """The finished entry of ``key``, as ``parse`` reads its record; None when there is none, or when
        it cannot be trusted (then it is removed, to be redone, with a note saying why)."""
        path = self.record_path(key)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            why = f"its record is not readable JSON ({exc})"
        else:
            why = self._problem(key, record)
            if why is None:
                try:
                    return parse(record)
                except (KeyError, TypeError, ValueError, AttributeError) as exc:
                    why = f"its record is incomplete ({type(exc).__name__}: {exc})"
        self.progress.note(f"search cache: {key} ({self.relative(path)}) is redone: {why}")
        self.forget(key)
        return None

    def _problem(self, key: str, record: Any) -> str | None:
        """Why ``record`` (the parsed JSON of ``key``) and its file cannot be trusted; None when they can."""
        if not isinstance(record, dict):
            return f"its record is a JSON {type(record).__name__}, not an object"
        if record.get("key") != key:
            return "its record is for another recipe"
        file, sha, size = record.get("file"), record.get("file_sha256"), record.get("file_size")
        for name, value, kind in (("file", file, str), ("file_sha256", sha, str), ("file_size", size, int)):
            if not isinstance(value, kind) or isinstance(value, bool):
                return f"its record lacks {name!r} or it is not a {kind.__name__}"
        target = self.absolute(file)
        if self.root.resolve() not in target.resolve().parents:
            return f"its file {file!r} lies outside the cache"
        if not target.exists():
            return f"its file {file} is missing"
        read = WrittenFile.of_file(target)  # the one read of a cached file: checked here, used after
        if read.size_bytes != size:
            return f"its file {file} has {read.size_bytes:,} bytes, {size:,} when it was written"
        if read.sha256 != sha:
            return f"its file {file} is not the one written (SHA-256 differs)"
        self._files[key] = read
        return None

    def forget(self, key: str) -> None:
        """Remove ``key``'s record and the files made for it."""
        self._files.pop(key, None)
        self.record_path(key).unlink(missing_ok=True)
        shutil.rmtree(self.file_dir(key), ignore_errors=True)
        self.model_path(key).unlink(missing_ok=True)

    def store(self, key: str, record: Mapping[str, Any], file: WrittenFile) -> None:
        """Record ``key``'s finished entry; its ``file`` (written already, at ``record["file"]``) as written."""
        if Path(file.path).resolve() != self.absolute(record["file"]).resolve():
            raise OutputError(f"search cache: {key}'s record names {record['file']}, not the file written ({file.path})")
        self._files[key] = file
        with atomic_output(self.record_path(key), force=True) as tmp:
            tmp.write_text(json.dumps({**record, "key": key, "file_sha256": file.sha256,
                                       "file_size": file.size_bytes}, indent=2, default=str) + "\n")

    def file(self, key: str) -> WrittenFile:
        """``key``'s file as this search wrote it or read it from the cache (its bytes checked then)."""
        return self._files[key]

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def absolute(self, relative: str) -> Path:
        return self.root / relative
