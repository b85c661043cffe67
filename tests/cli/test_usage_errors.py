"""One style of usage error.

Every bad option value exits 2 with the same look, whichever layer refuses it (Typer's parser or
the library's checks): ``Error: <what>`` and ``Hint: <what to do>``, nothing else -- no usage
block, no box, no traceback. Runtime and input errors exit 1 with the same two-line look. Option
names mean the same in every command.
"""

from __future__ import annotations

import re

import pytest


from tests.helpers import PROGRESS_LINE, run

BOX = set("│╭╮╰╯─┃━┏┓┗┛")


def assert_error_look(r, code: int, command: str | None = None, match: str | None = None) -> None:
    """The one look of every error: ``Error:`` then at most a ``Hint:`` line, on stderr only."""
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
    assert lines and lines[0].startswith("Error: "), r.stderr
    assert len(lines) <= 2 and all(line.startswith("Hint: ") for line in lines[1:]), r.stderr
    text = r.stderr + r.stdout
    assert "Traceback" not in text and "Usage:" not in text and not (BOX & set(text)), text
    assert r.stdout == "", r.stdout
    if code == 2:
        assert len(lines) == 2, r.stderr  # a usage error always says where to look
    if command is not None and code == 2 and "see '" in lines[-1]:
        assert lines[-1] == f"Hint: see 'tbopt {command} --help'", lines[-1]
    if match is not None:
        assert match in lines[0], lines[0]


# (command line, where the value is refused) -- Typer's parser or the library's checks.
TYPER = [
    ("run --rate abc", "rate"), ("run --method foo", "method"), ("run --weights pal5", "weights"),
    ("run --weights int4", "weights"), ("run --package-weights int3", "package-weights"), ("run --backend gpu", "backend"), ("run --runs 0", "runs"),
    ("run --limit 0", "limit"), ("run --calib-count 0", "calib-count"), ("run --threads 0", "threads"),
    ("run --finetune-steps -1", "finetune-steps"), ("run --no-such-option", "no-such-option"),
    ("prune --rate abc", "rate"), ("prune --rate 0.3 --method foo", "method"), ("prune", "rate"),
    ("prune --rate 0.3 --limit 0", "limit"), ("prune --rate 0.3 --threads 0", "threads"),
    ("prune --rate 0.3 --finetune-steps -1", "finetune-steps"),
    ("quantize --backend gpu", "backend"), ("quantize --calib-count 0", "calib-count"),
    ("quantize --limit 0", "limit"), ("quantize --threads 0", "threads"), ("quantize --min-psnr x", "min-psnr"),
    ("export --weights pal5", "weights"), ("export --target iOS9", "target"), ("export --io video", "io"),
    ("export --size 4", "size"), ("export --sparse maybe", "sparse"),
    ("bench --runs 0", "runs"), ("bench --warmup -1", "warmup"), ("bench --limit 0", "limit"),
    ("bench --compute-units gpu", "compute-units"),
    ("compare a.pt", "B"), ("compare a.pt b.pt --worst 0", "worst"), ("compare a.pt b.pt --runs 0", "runs"),
    ("info --no-such-option", "no-such-option"), ("info a.pt b.pt", "b.pt"),
    ("apply demo", "IMAGES"), ("apply demo x.png", "output"), ("apply demo x.png -o o --compute-units gpu",
                                                                "compute-units"),
]


@pytest.mark.parametrize("line, what", TYPER, ids=[c for c, _ in TYPER])
def test_values_typer_refuses_exit_2_in_the_one_look(line, what, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run(*line.split())
    assert_error_look(r, 2, line.split()[0])
    assert what.lower() in r.stderr.splitlines()[0].lower(), r.stderr
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.fixture
def small(small_artifact):
    return small_artifact


# Values only the library can judge (they need the model, or are combinations).
LIBRARY = [
    ("prune {m} --rate 1.5", "--rate"), ("prune {m} --rate nan", "--rate"),
    ("prune {m} --rate 0.3 --limit 1 --exclude nope", "--exclude"),
    ("prune {m} --rate 0.3 --data {d} --eval-data {d}x", "--eval-data"),
    ("quantize {m} --min-psnr 0", "--min-fidelity"), ("quantize {m} --min-fidelity 0", "--min-fidelity"), ("quantize {m} --keep-float nope --backend x86", "--keep-float"),
    ("quantize {m} --keep-float a,,b", "--keep-float"),
    ("run {m} --min-psnr -1", "--min-fidelity"), ("run {m} --min-fidelity -1", "--min-fidelity"), ("run {m} --rate 1.5", "--rate"),
    ("run {m} --out {d}/a --output {d}/b", "--out"),
    ("export {m} --weights fp16 --fp32", "--fp32"), ("export {m} --size 10", "--size"),
    ("export {m} -o {d}/x.onnx", "x.onnx"), ("export {m} -o {d}/x.mlpackage --target iOS13", "--target"),
    ("bench {m} --arch-kwargs {{}}", "--arch-kwargs"), ("bench {m} --arch nocolon", "--arch"),
    ("info {m} --arch-kwargs [1]", "--arch-kwargs"),
]


@pytest.mark.parametrize("line, match", LIBRARY, ids=[c.format(m="M", d="D") for c, _ in LIBRARY])
def test_values_the_library_refuses_look_the_same(line, match, small, tmp_path):
    args = line.format(m=small, d=tmp_path).split()
    r = run(*args)
    assert_error_look(r, 2, args[0], match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.pt"]


def test_the_same_value_gets_the_same_words_in_every_command(small):
    """`--calib-count 0` was exit 1 in quantize (the library) and 2 in run (Typer)."""
    q, r = run("quantize", small, "--calib-count", "0"), run("run", small, "--calib-count", "0")
    assert q.exit_code == r.exit_code == 2
    assert q.stderr.splitlines()[0] == r.stderr.splitlines()[0]
    q, r = run("quantize", small, "--backend", "gpu"), run("run", small, "--backend", "gpu")
    assert q.exit_code == r.exit_code == 2
    assert q.stderr.splitlines()[0] == r.stderr.splitlines()[0]


RUNTIME = [
    "info {d}/missing.pt", "prune {d}/missing.pt --rate 0.3", "quantize {d}/missing.pt", "export {d}/missing.pt",
    "bench {d}/missing.pt", "compare {d}/missing.pt {m}", "apply {d}/missing.pt {m} -o {d}/o",
    "run {d}/missing.pt", "prune {m} --rate 0.3 -o {m}",
]


@pytest.mark.parametrize("line", RUNTIME)
def test_runtime_and_input_errors_exit_1_in_the_same_look(line, small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run(*line.format(m=small, d=tmp_path).split())
    assert_error_look(r, 1)


def test_top_level_usage_errors(tmp_path):
    assert_error_look(run("no-such-command"), 2, match="no-such-command")
    r = run("no-such-command")
    assert r.stderr.splitlines()[-1] == "Hint: see 'tbopt --help'"


def _help(command: str) -> str:
    r = run(command, "--help")
    assert r.exit_code == 0
    return r.stdout


def test_output_is_dash_o_in_every_command_that_writes():
    for command in ("run", "prune", "quantize", "export", "compare", "apply"):
        text = _help(command)
        assert "--output" in text and "-o" in text, command
    assert not re.search(r"--out\b(?!put)", _help("run"))  # the old name works but is not shown


def test_run_keeps_out_as_a_hidden_alias(small, tmp_path):
    # the same refusal through every name: the folder holds an earlier run's output
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "results.json").write_text("{}")
    for name in ("--out", "--output", "-o"):
        r = run("run", small, name, tmp_path / "o")
        assert_error_look(r, 1, match="already exists")


def test_data_is_the_images_scored_and_calib_the_unlabeled_ones():
    prune, quantize, run_ = _help("prune"), _help("quantize"), _help("run")
    for text in (prune, quantize, run_):
        assert "--data" in text and "--calib" in text
    assert "--eval-data" not in prune  # old name of --data, hidden
    # what each says: --data is scored; --calib is unlabeled images
    for text in (prune, run_):
        assert "unlabeled" in text


def _arguments(command: str) -> str:
    text = _help(command)
    return text[text.index("Arguments"):text.index("Options")]


def test_model_argument_help_says_what_each_command_accepts():
    for command in ("prune", "quantize", "export", "run"):  # float models only
        text = _arguments(command)
        assert "checkpoint" in text and ".mlpackage" not in text and "TorchScript" not in text, (command, text)
    text = _arguments("info")  # any model file
    assert ".mlpackage" in text and "int8 TorchScript" in text


def test_choices_are_listed_in_run_as_in_export():
    text = _help("run")
    for choice in ("fp16", "int8", "pal4", "x86", "qnnpack", "magnitude", "channel"):
        assert choice in text, choice
