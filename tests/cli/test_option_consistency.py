"""One meaning per option across commands: names, lists, case, threads, defaults, metavars, and the
small surprises (compare's picture, the demo's note, the load average beside latencies)."""

from __future__ import annotations

import json
import re

import pytest
import typer.main

from tinybeauty_cli.cli import _options
from tinybeauty_cli.cli.app import app
from tinybeauty_cli.core import load

from tests.helpers import assert_one_line_error, run

GROUP = typer.main.get_command(app)
#: placeholders for required arguments and options, so that a command line parses
REQUIRED = {"compare": ["a.pt", "b.pt"], "apply": ["m.pt", "p.png", "-o", "out"], "prune": ["--rate", "0.3"]}
COMPUTING = ("run", "optimize", "prune", "quantize", "export", "bench", "compare", "apply")



def _choices(p):
    choices, _ = _options._type_of(p)
    return [str(getattr(c, "value", c)) for c in choices or ()]


def _parse(name, args):
    command = GROUP.commands[name]
    return command.make_context(name, [*REQUIRED.get(name, []), *args]).params


def test_the_fidelity_floor_is_min_fidelity_everywhere_and_min_psnr_a_hidden_old_name():
    for name in ("quantize", "run", "optimize"):
        options = {o: p for p in GROUP.commands[name].params for o in p.opts}
        assert "--min-fidelity" in options and not options["--min-fidelity"].hidden, name
        if name != "optimize":
            assert options["--min-psnr"].hidden, name
            assert "--min-psnr" not in run(name, "--help").stdout


def test_min_psnr_still_sets_the_floor_and_both_names_must_agree(small_artifact):
    # the floor is checked before any work: the old name reaches the same check under the new name
    assert_one_line_error(run("quantize", small_artifact, "--min-psnr", "0"), "--min-fidelity must be", code=2)
    assert_one_line_error(run("quantize", small_artifact, "--min-psnr", "40", "--min-fidelity", "41"),
                          "--min-psnr is the old name of --min-fidelity", code=2)


@pytest.mark.parametrize("name", sorted(GROUP.commands))
def test_every_choice_is_read_in_any_case(name):
    for p in GROUP.commands[name].params:
        values = _choices(p)
        if p.param_type_name != "option" or not values:
            continue
        for value in values:
            for spelled in (value.upper(), value.lower()):
                got = _parse(name, [p.opts[0], spelled])[p.name]
                got = got[0] if isinstance(got, (list, tuple)) else got
                assert str(getattr(got, "value", got)) == value, (name, p.opts[0], spelled)


def test_for_takes_any_case_and_comma_lists_and_names_its_choices_when_wrong():
    assert _options.pick(_options.split_list(["iOS13,CPU", "ios16"]), ["ios13", "ios16", "cpu"], "--for") == \
        ("ios13", "cpu", "ios16")
    assert_one_line_error(run("optimize", "--for", "ios13,android"), "--for must be one of ios13", code=2)


def test_list_options_are_repeatable_and_take_comma_lists():
    assert _options.split_list(["a,b", " c ", ""]) == ("a", "b", "c")
    assert _options.split_list([""]) == ()  # --sparsities '' is an empty list
    lists = {(name, p.opts[0]) for name, c in GROUP.commands.items() for p in c.params
             if p.param_type_name == "option" and getattr(p, "multiple", False)}
    assert {("optimize", "--for"), ("optimize", "--rates"), ("optimize", "--palettes"), ("optimize", "--sparsities"),
            ("optimize", "--full-res-rates"), ("optimize", "--finetune-steps"), ("prune", "--exclude"),
            ("prune", "--group-rate"), ("quantize", "--keep-float")} <= lists
    for name, option in lists:  # every one says both ways in its help
        p = next(p for p in GROUP.commands[name].params if option in p.opts)
        assert "repeatable" in (p.help or "").lower() and "comma" in (p.help or ""), (name, option)


def test_prune_exclude_comma_list_reaches_the_library(small_artifact, tmp_path):
    r = run("prune", small_artifact, "--rate", "0.3", "--exclude", "upconv*,nope", "--limit", "1", "-o",
            tmp_path / "p.pt")
    assert_one_line_error(r, "nope", code=2)  # the second of the comma list was read as its own pattern


def test_threads_on_every_command_that_computes():
    for name in COMPUTING:
        assert "--threads" in {o for p in GROUP.commands[name].params for o in p.opts}, name


def test_export_threads_sets_and_restores_torch_threads(small_artifact, tmp_path, monkeypatch):
    import torch

    from tinybeauty_cli.flow import export as flow_export

    seen = []
    real = flow_export.export_file
    monkeypatch.setattr(flow_export, "export_file", lambda *a, **k: (seen.append(torch.get_num_threads()),
                                                                     real(*a, **k))[1])
    before = torch.get_num_threads()
    r = run("export", small_artifact, "-o", tmp_path / "m.mlmodel", "--size", "32", "--threads", "1", "--json")
    assert r.exit_code == 0, r.stderr
    assert seen == [1] and torch.get_num_threads() == before
    assert "--threads 1" in json.loads(r.stdout)["command"]  # the rebuild line gives the same weights


def test_timing_defaults_are_the_same_in_every_command():
    for option, want in (("--runs", _options.DEFAULT_RUNS), ("--warmup", _options.DEFAULT_WARMUP)):
        for name, c in GROUP.commands.items():
            for p in c.params:
                if option in p.opts:
                    assert p.default == want, (name, option, p.default)
    assert (_options.DEFAULT_RUNS, _options.DEFAULT_WARMUP) == (30, 5)


def test_differing_defaults_are_explained_in_help():
    def help_of(name, option):
        return next(p.help for p in GROUP.commands[name].params if option in p.opts)

    assert "export" in help_of("run", "--weights")  # int8 here as in export: says so
    assert "16" in help_of("quantize", "--calib-count") and "32" in help_of("export", "--calib-count")
    assert "45" in help_of("run", "--min-fidelity")


@pytest.mark.parametrize("name", [None, *sorted(GROUP.commands)])
def test_help_shows_plain_metavars(name):
    r = run(*([name] if name else []), "--help")
    assert r.exit_code == 0
    options = [line for line in r.stdout.splitlines() if re.search(r"│\s+(\*\s+)?--", line)]
    assert options
    bad = [line for line in options if re.search(r"<(bool|path|int|float|text|str|list)|list\[", line)]
    assert not bad, bad


def test_single_value_choices_read_as_plain_words():
    export = {o: p for p in GROUP.commands["export"].params for o in p.opts}
    assert export["--bits-by-layer"].metavar == "auto"
    assert export["--activations"].metavar == "int8"


def test_short_flags_of_common_options():
    assert run("-V").stdout.startswith("tbopt ")
    for name, c in GROUP.commands.items():
        opts = {o for p in c.params for o in p.opts}
        for long, short in (("--output", "-o"), ("--force", "-f"), ("--quiet", "-q"), ("--data", "-d"),
                            ("--limit", "-n")):
            if long in opts:
                assert short in opts, (name, long)


def test_compare_twice_in_one_folder_writes_no_picture_without_output(small_artifact, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        r = run("compare", small_artifact, small_artifact, "--limit", "2", "--no-timing", "--json")
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["figure"] is None
    assert not list(tmp_path.rglob("*.png"))
    r = run("compare", small_artifact, small_artifact, "--limit", "2", "--no-timing", "-o", tmp_path / "pics")
    assert r.exit_code == 0, r.stderr
    assert [p.name for p in (tmp_path / "pics").iterdir()] == ["small_vs_small.png"]


def test_a_command_that_falls_back_to_the_demo_says_so(small_artifact):
    r = run("info", env={"TBOPT_DEMO_CHECKPOINT": str(small_artifact)})
    assert r.exit_code == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "bundled demo checkpoint" in line]
    assert notes == [f"Note: no model given: using the bundled demo checkpoint ({small_artifact})"]
    assert "bundled demo" not in run("info", small_artifact).stderr


def test_latencies_carry_the_load_average_and_an_overloaded_machine_is_named(small_artifact, monkeypatch):
    r = run("bench", small_artifact, "--limit", "2", "--runs", "2", "--warmup", "0", "--json")
    assert r.exit_code == 0, r.stderr
    row = json.loads(r.stdout)["rows"][0]
    assert row["cpus"] == load.cores() and (row["load_average"] is None or row["load_average"] >= 0)
    human = run("bench", small_artifact, "--limit", "2", "--runs", "2", "--warmup", "0")
    assert f"on {load.cores()} cores" in " ".join(human.stdout.split())  # the caption wraps at the table's width

    from tinybeauty_cli.runtime import timing

    monkeypatch.setattr(timing, "load_average", lambda: float(load.cores() + 3))
    busy = run("bench", small_artifact, "--limit", "2", "--runs", "2", "--warmup", "0")
    assert busy.exit_code == 0
    lines = [line for line in busy.stdout.splitlines() if "exceeded the cores" in line]
    assert len(lines) == 1 and f"load average {load.cores() + 3:.2f}" in lines[0]


def test_overload_note_only_above_the_cores(monkeypatch):
    monkeypatch.setattr(load, "cores", lambda: 2)
    assert load.overload_note(None) is None and load.overload_note(2.0) is None
    assert "exceeded the cores" in load.overload_note(2.5)
    assert load.load_text(1.234) == "load average 1.23 on 2 cores"
