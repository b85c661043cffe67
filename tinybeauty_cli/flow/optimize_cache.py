"""The search cache of ``tbopt optimize``: every finished evaluation (and the file or float model it
made) under ``--out/.tbopt-search/``, keyed by recipe and by everything the evaluation depends on,
so that ``--resume`` continues an interrupted search without redoing finished candidates.

Each entry is written atomically (the file first, its record last): an interrupt leaves either a
whole entry or none.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from ..core.files import atomic_output


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class SearchCache:
    """Records and files by recipe key, for one search context (checkpoint, images, settings)."""

    def __init__(self, root: Path, context: Mapping[str, Any]):
        self.root = Path(root)
        self.context = dict(context)
        self._context_digest = digest(self.context)

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

    def load(self, key: str) -> dict[str, Any] | None:
        """The record of ``key``, if it was finished (and its file is still there)."""
        path = self.record_path(key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except ValueError:
            return None
        if record.get("key") != key:
            return None
        file = record.get("file")
        if file is not None and not (self.root / file).exists():
            return None
        return record

    def store(self, key: str, record: Mapping[str, Any]) -> None:
        with atomic_output(self.record_path(key), force=True) as tmp:
            tmp.write_text(json.dumps({**record, "key": key}, indent=2, default=str) + "\n")

    def relative(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def absolute(self, relative: str) -> Path:
        return self.root / relative
