"""Where the project's bundled files live."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError

#: The demo checkpoint ships as package data beside this module, so every install has it.
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "tinybeauty_demo.pt"


def demo_checkpoint() -> Path:
    """The demo checkpoint shipped in the package (override with ``TBOPT_DEMO_CHECKPOINT``)."""
    override = os.environ.get("TBOPT_DEMO_CHECKPOINT")
    path = Path(override) if override else DEMO_CHECKPOINT
    if not path.is_file():
        raise InputError(
            f"the demo checkpoint {path} is missing",
            hint="reinstall tbopt (the demo checkpoint is package data) or give a checkpoint path",
        )
    return path
