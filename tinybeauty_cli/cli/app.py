"""The ``tbopt`` Typer application: every command is registered here."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from .. import __version__

# Command modules import only typer/rich and torch-free modules (core.errors, core.paths, the config
# modules, coreml.units); each imports the library inside its function. torch and coremltools take
# seconds to import, and --help needs neither (tests/project/test_startup.py keeps it so).
from . import apply, bench, compare, export, info, optimize, prune, quantize, run
from ._errors import INTERRUPTED, INTERRUPTED_EXIT, TbOptGroup, say

app = typer.Typer(
    name="tbopt",
    cls=TbOptGroup,
    help="Shrink the TinyBeauty facial-makeup network and ship it to iPhones as Core ML.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tbopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                    help="Show the version and exit.")] = None,
) -> None:
    """Shrink the TinyBeauty facial-makeup network and ship it to iPhones as Core ML."""


# In the order a user meets them: the whole chain, its stages, then the tools to look at results.
app.command("run")(run.run)
app.command("optimize")(optimize.optimize)
app.command("prune")(prune.prune)
app.command("quantize")(quantize.quantize)
app.command("export")(export.export)
app.command("bench")(bench.bench)
app.command("compare")(compare.compare)
app.command("info")(info.info)
app.command("apply")(apply.apply)


def main() -> None:
    """The ``tbopt`` console script (and ``python -m tinybeauty_cli``)."""
    try:
        app()
    except KeyboardInterrupt:  # before the group runs (Typer building the command)
        say(INTERRUPTED)
        sys.exit(INTERRUPTED_EXIT)
