"""The search cache behind ``tbopt optimize --resume`` is verified before it is trusted: a cached file
cut short, changed or gone, and a record that is not JSON, lacks its fields or holds other types, are
redone with a note naming them and why -- never reused, never copied out, never an internal error. The
sizes and hashes in search.json and search.md are those of the files in --out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tinybeauty_cli.core.files import sha256_file, size_on_disk
from tinybeauty_cli.flow.optimize_config import CACHE_DIR, REPORT_FILES

from ..helpers import save_small

SIZE = 32
runner = CliRunner()


def cli(*args):
    from tinybeauty_cli.cli.app import app

    return runner.invoke(app, [str(a) for a in args])


def search_args(ckpt: Path, out: Path) -> list:
    return ["optimize", ckpt, "--out", out, "--for", "ios13", "--for", "ios16", "--rates", "0.5",
            "--finetune-steps", "1", "--full-res-rates", "", "--palettes", "pal8", "--sparsities", "",
            "--fit-steps", "0", "--no-bits-by-layer", "--limit", "3", "--threads", "1", "--runs", "2",
            "--min-fidelity", "10"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    ckpt = save_small(d / "tiny.pt", size=SIZE)
    out = d / "out"
    r = cli(*search_args(ckpt, out), "--json")
    assert r.exit_code == 0, r.output
    return ckpt, out, json.loads(r.stdout)


def records(out: Path) -> dict[str, Path]:
    """Each record of the cache by its key."""
    return {json.loads(p.read_text())["key"]: p for p in (out / CACHE_DIR / "records").glob("*.json")}


def _chosen_file(out: Path, data: dict, target: str) -> tuple[str, Path]:
    key = data["chosen"][target]["recipe"]["key"]
    rec = json.loads(records(out)[key].read_text())
    return key, out / CACHE_DIR / rec["file"]


def truncate_mlmodel(out, data):
    key, f = _chosen_file(out, data, "ios13")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return key, "bytes"


def flip_a_byte_in_the_package_weights(out, data):
    key, f = _chosen_file(out, data, "ios16")
    weights = next(f.rglob("weight.bin"))
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    return key, "SHA-256"


def remove_the_file(out, data):
    key, f = _chosen_file(out, data, "ios13")
    f.unlink()
    return key, "missing"


def _edit_record(target: str, edit, why: str):
    def corrupt(out, data):
        key = data["chosen"][target]["recipe"]["key"]
        path = records(out)[key]
        text = edit(json.loads(path.read_text()), path.read_text())
        path.write_text(text if isinstance(text, str) else json.dumps(text))
        return key, why
    corrupt.__name__ = why
    return corrupt


def _without(*names):
    return lambda rec, text: {k: v for k, v in rec.items() if k not in names}


def _with(**fields):
    return lambda rec, text: {**rec, **fields}


def _model_record(edit, why: str):
    def corrupt(out, data):
        key = data["models"][0]["key"]
        path = records(out)[key]
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
        return key, why
    return corrupt


def truncate_the_pruned_model(out, data):
    key = data["models"][0]["key"]
    f = out / CACHE_DIR / json.loads(records(out)[key].read_text())["file"]
    f.write_bytes(f.read_bytes()[:100])
    return key, "bytes"


CASES = [
    pytest.param(truncate_mlmodel, id="mlmodel-cut-short"),
    pytest.param(flip_a_byte_in_the_package_weights, id="mlpackage-weights-changed"),
    pytest.param(remove_the_file, id="file-gone"),
    pytest.param(_edit_record("ios13", lambda rec, text: text[: len(text) // 2], "not readable JSON"),
                 id="record-cut-short"),
    pytest.param(_edit_record("ios13", lambda rec, text: [rec], "not an object"), id="record-a-list"),
    pytest.param(_edit_record("ios13", _without("file_sha256", "file_size"), "lacks 'file_sha256'"),
                 id="record-without-hash"),
    pytest.param(_edit_record("ios13", _without("size_bytes"), "size_bytes"), id="record-without-size"),
    pytest.param(_edit_record("ios16", _without("recipe"), "recipe"), id="record-without-recipe"),
    pytest.param(_edit_record("ios13", _with(size_bytes="big"), "size_bytes"), id="size-a-string"),
    pytest.param(_edit_record("ios16", _with(target_psnr_db=[1.0]), "target_psnr_db"), id="psnr-a-list"),
    pytest.param(_edit_record("ios13", _with(file_size=True), "file_size"), id="file-size-a-bool"),
    pytest.param(_edit_record("ios13", _with(file="../../tiny.pt"), "outside the cache"), id="file-outside"),
    pytest.param(_edit_record("ios16", _with(notes="x"), "notes"), id="notes-a-string"),
    pytest.param(_model_record(lambda rec: {k: v for k, v in rec.items() if k != "entry"}, "entry"),
                 id="model-record-without-entry"),
    pytest.param(_model_record(lambda rec: {**rec, "entry": {**rec["entry"], "seconds": None}}, "seconds"),
                 id="model-seconds-null"),
    pytest.param(truncate_the_pruned_model, id="pruned-model-cut-short"),
]


QUICK = {"mlmodel-cut-short", "mlpackage-weights-changed", "record-cut-short", "record-without-hash",
         "size-a-string", "pruned-model-cut-short"}  # the rest: -m slow (each resumes a search)


@pytest.mark.parametrize("corrupt", [
    pytest.param(*case.values, id=case.id, marks=[] if case.id in QUICK else [pytest.mark.slow]) for case in CASES])
def test_a_cache_entry_that_fails_its_check_is_redone(finished, tmp_path, corrupt):
    ckpt, done, data = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    key, why = corrupt(out, data)
    r = cli(*search_args(ckpt, out), "--resume", "--json")
    assert r.exit_code == 0, r.output
    assert "internal error" not in r.output + r.stderr and "Traceback" not in r.stderr
    notes = [line for line in r.stderr.splitlines() if "search cache:" in line]
    assert any(key in line and "is redone" in line and why in line for line in notes), r.stderr
    result = json.loads(r.stdout)
    redone = [c for c in result["candidates"] + result["models"]
              if (c.get("recipe") or {}).get("key", c.get("key")) == key]
    assert redone and not any(c["cached"] for c in redone)
    _check_outputs(out, result)


def _check_outputs(out: Path, result: dict) -> None:
    """Each chosen file opens with tbopt info, and search.json and search.md give its size and hash."""
    saved = json.loads((out / REPORT_FILES["json"]).read_text())
    markdown = (out / REPORT_FILES["markdown"]).read_text()
    for target, c in saved["chosen"].items():
        f = Path(c["file"])
        info = cli("info", f, "--json")
        assert info.exit_code == 0, info.output
        assert c["size_bytes"] == size_on_disk(f) and c["sha256"] == sha256_file(f)
        assert result["chosen"][target]["sha256"] == c["sha256"]
        assert c["sha256"] in markdown and f"{c['size_bytes']:,}" in markdown


def test_an_untouched_cache_is_reused_and_the_outputs_are_the_files(finished, tmp_path):
    ckpt, done, data = finished
    out = tmp_path / "out"
    shutil.copytree(done, out)
    r = cli(*search_args(ckpt, out), "--resume", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert all(c["cached"] for c in result["candidates"]) and "search cache:" not in r.stderr
    _check_outputs(out, result)
    _check_outputs(done, data)
