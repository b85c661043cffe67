"""``WrittenFile`` holds a file or a folder as written; a copy made from it is the same file."""

from __future__ import annotations

from tinybeauty_cli.core.files import sha256_file, size_on_disk
from tinybeauty_cli.core.written import WrittenFile


def test_a_folder_is_copied_whole_empty_folders_included(tmp_path):
    """An ML Program without a weight file keeps an empty ``weights/`` that its manifest names: a copy
    without it does not open in coremltools ("Item does not exist for identifier")."""
    pkg = tmp_path / "m.mlpackage"
    (pkg / "Data" / "com.apple.CoreML" / "weights").mkdir(parents=True)
    (pkg / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(b"graph")
    (pkg / "Manifest.json").write_text("{}")
    held = WrittenFile.of_file(pkg)
    assert held.is_folder and held.folders == ("Data/com.apple.CoreML/weights",)
    assert held.sha256 == sha256_file(pkg) and held.size_bytes == size_on_disk(pkg)
    copy = tmp_path / "copy.mlpackage"
    held.write_to(copy)
    assert (copy / "Data" / "com.apple.CoreML" / "weights").is_dir()
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*"))
    assert sha256_file(copy) == held.sha256
    assert held.moved_to(tmp_path / "elsewhere.mlpackage").folders == held.folders


def test_a_single_file_round_trips(tmp_path):
    f = tmp_path / "a.pt"
    f.write_bytes(b"weights")
    held = WrittenFile.of_file(f)
    assert not held.is_folder and held.sha256 == sha256_file(f)
    held.write_to(tmp_path / "b.pt")
    assert (tmp_path / "b.pt").read_bytes() == b"weights"
