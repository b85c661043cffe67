import csv
import json

import pytest
import torch
from PIL import Image

from tinybeauty_cli.core.artifact import Artifact, save_artifact
from tinybeauty_cli.core.errors import ConfigError
from tinybeauty_cli.measure.bench import BenchConfig, bench
from tinybeauty_cli.measure.compare import CompareConfig, compare

from tests.helpers import small_tinybeauty, run


@pytest.fixture
def two_artifacts(tmp_path):
    a = small_tinybeauty(seed=0)
    b = small_tinybeauty(seed=0)
    with torch.no_grad():
        b.out.conv.bias.add_(0.02)
    pa, pb = tmp_path / "a.pt", tmp_path / "b.pt"
    save_artifact(Artifact.for_tinybeauty(a.config, a.state_dict()), pa)
    torch.save(b.state_dict(), pb)
    return pa, pb


def test_bench_rows_are_measured(two_artifacts):
    pa, pb = two_artifacts
    res = bench([pa, pb], BenchConfig(limit=3, runs=2, warmup=1))
    ra, rb = res.rows
    assert ra.is_reference and ra.fidelity_psnr_db is None
    assert rb.fidelity_psnr_db is not None and 20 < rb.fidelity_psnr_db < 100
    assert 0 < rb.ssim <= 1
    assert ra.parameters == rb.parameters == sum(p.numel() for p in small_tinybeauty().parameters())
    assert ra.size_bytes == pa.stat().st_size and ra.zipped_bytes < ra.size_bytes
    assert ra.latency.runs == 2 and ra.latency.p50_ms > 0 and ra.latency.p90_ms >= ra.latency.p50_ms
    assert ra.target_psnr_db is not None and ra.images == 3


def test_bench_with_an_explicit_reference(two_artifacts):
    pa, pb = two_artifacts
    res = bench([pa], BenchConfig(limit=2), ref=pb, time_models=False)
    assert not res.rows[0].is_reference and res.rows[0].fidelity_psnr_db is not None
    assert res.rows[0].latency is None


def test_bench_cli_json_csv_markdown(two_artifacts, tmp_path):
    pa, pb = two_artifacts
    csv_path, md_path = tmp_path / "r.csv", tmp_path / "r.md"
    r = run("bench", str(pa), str(pb), "--limit", "2", "--runs", "2", "--warmup", "0",
                            "--json", "--csv", str(csv_path), "--markdown", str(md_path), "--threads", "1")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert [row["name"] for row in d["rows"]] == ["a.pt", "b.pt"]
    assert d["rows"][0]["threads"] == 1 and d["config"]["threads"] == 1
    rows = list(csv.DictReader(csv_path.open()))
    assert [row["name"] for row in rows] == ["a.pt", "b.pt"]
    md = md_path.read_text()
    assert "| a.pt (ref) |" in md and "1 thread(s)" in md
    # the same files again need --force
    r = run("bench", str(pa), "--limit", "1", "--no-timing", "--csv", str(csv_path))
    assert r.exit_code == 1 and "already exists" in r.stderr


def test_bench_table_output(two_artifacts):
    pa, _ = two_artifacts
    r = run("bench", str(pa), "--limit", "1", "--runs", "1", "--warmup", "0")
    assert r.exit_code == 0, r.stderr
    assert "a.pt (ref)" in r.stdout and "PyTorch eager fp32" in r.stdout and "median of 1 runs" in r.stdout


@pytest.mark.parametrize("kw", [dict(runs=0), dict(warmup=-1), dict(threads=0), dict(limit=0)])
def test_bench_config_is_validated(kw):
    with pytest.raises(ConfigError):
        BenchConfig(**kw)


def test_compare_reports_differences_and_draws_the_worst(two_artifacts, tmp_path):
    pa, pb = two_artifacts
    res = compare(pa, pb, CompareConfig(limit=3, runs=2, warmup=0, worst=2), out_dir=tmp_path / "cmp")
    assert 20 < res.psnr_between_mean_db < 100 and res.psnr_between_worst_db <= res.psnr_between_mean_db
    assert len(res.worst_images) == 2 and res.max_abs_diff_levels > 0
    assert res.latency_ratio > 0 and res.size_ratio > 0
    changed = [l for l in res.layers if l.rel_l2]
    assert [l.name for l in changed] == ["out.conv.bias"]
    assert Image.open(res.figure).size[0] > 400


def test_compare_identical_models(two_artifacts, tmp_path):
    pa, _ = two_artifacts
    res = compare(pa, pa, CompareConfig(limit=2), time_models=False)
    assert res.max_abs_diff_levels == 0 and res.psnr_between_mean_db >= 100
    assert all(l.rel_l2 == 0 for l in res.layers) and res.figure is None


def test_compare_cli(two_artifacts, tmp_path):
    pa, pb = two_artifacts
    out = tmp_path / "c"
    r = run("compare", str(pa), str(pb), "--limit", "2", "--no-timing", "-o", str(out), "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["figure"] and (out / "a_vs_b.png").exists()
    r = run("compare", str(pa), str(pb), "--limit", "2", "--no-timing", "-o", str(out))
    assert r.exit_code == 1 and "already exists" in r.stderr
    r = run("compare", str(pa), str(pb), "--limit", "2", "--no-timing", "-o", str(out), "--force")
    assert r.exit_code == 0 and "PSNR between outputs" in r.stdout
