"""docs/ and --help cannot drift: every option of every command (hidden old names included) is on its
command's page in docs/commands/, and no page (nor README.md) names an option no command has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from tinybeauty_cli.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
GROUP = typer.main.get_command(app)
#: options of other programs the pages show (pip's install line)
OTHER_PROGRAMS = {"--index-url", "--no-deps"}
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
#: a code span that runs a benchmark or script: its options are the script's, not a command's
SCRIPT_SPAN = re.compile(r"`[^`]*(?:benchmarks|scripts)/[^`]*`", re.S)
#: pages the optimize rework (issue 21) writes; linked from here before they land
def _options(command) -> set[str]:
    """Every spelling of every option, hidden ones included (they are documented as old names)."""
    return {o for p in command.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]


@pytest.mark.parametrize("name", sorted(GROUP.commands))
def test_every_option_of_a_command_is_on_its_page(name):
    page = DOCS / "commands" / f"{name}.md"
    assert page.is_file(), f"docs/commands/{name}.md is missing"
    text = page.read_text()
    missing = sorted(o for o in _options(GROUP.commands[name]) | {"--help"} - {"--help"}
                     if not re.search(rf"`{re.escape(o)}`", text))
    assert not missing, f"docs/commands/{name}.md does not document {missing}"


def test_the_docs_name_no_option_that_does_not_exist():
    known = {o for c in GROUP.commands.values() for o in _options(c)} | {"--help", "--version"} | OTHER_PROGRAMS
    unknown = {}
    for page in _pages():
        for option in OPTION.findall(SCRIPT_SPAN.sub("", page.read_text())):
            if option not in known:
                unknown.setdefault(option, page.relative_to(ROOT).as_posix())
    assert not unknown, f"options no command has: {unknown}"


def test_the_readme_is_short_and_the_three_commands_come_early():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    for command in ("tbopt prune ckpt.pt --rate 0.3", "tbopt export --fp16", "tbopt compare a.pt b.mlmodel"):
        assert command in lines[:120], f"README.md: `{command}` is not in its first 120 lines"


def test_every_link_into_docs_resolves():
    broken = []
    for page in _pages():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
