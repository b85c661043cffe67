"""Docs that cannot drift: every command has help and a README section; CI runs README's commands."""

import re

import typer.main

from tinybeauty_cli.cli.app import app

from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()


def _commands():
    group = typer.main.get_command(app)
    return group.commands


def test_every_command_has_help_and_is_in_the_readme():
    commands = _commands()
    assert commands
    for name, cmd in commands.items():
        assert (cmd.help or "").strip(), f"{name} has no help text"
        assert f"tbopt {name}" in README, f"README.md does not mention `tbopt {name}`"


def test_every_option_has_help():
    for name, cmd in _commands().items():
        for param in cmd.params:
            if param.param_type_name == "option" and param.name not in ("help",):
                assert (getattr(param, "help", "") or "").strip(), f"tbopt {name} {param.opts} has no help"


def _readme_commands():
    """The two commands at the top of README.md: the first two ```bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    return blocks[0].strip(), blocks[1].strip()


def test_ci_runs_the_readme_commands_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    install, tests = _readme_commands()
    for line in install.splitlines() + tests.splitlines():
        assert line.strip() in ci, f".ci/run does not run README's `{line.strip()}`"
