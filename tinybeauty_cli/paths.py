"""Where the project's bundled files live."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError

#: The repository root of a source (editable) install.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT_NAME = "tinybeauty_demo.pt"


def demo_checkpoint() -> Path:
    """The demo checkpoint in ``assets/`` (override with ``TBOPT_DEMO_CHECKPOINT``)."""
    override = os.environ.get("TBOPT_DEMO_CHECKPOINT")
    path = Path(override) if override else PROJECT_ROOT / "assets" / DEMO_CHECKPOINT_NAME
    if not path.is_file():
        raise InputError(
            f"the demo checkpoint {path} is missing",
            hint="install tbopt from its source checkout (pip install -e .) or give a checkpoint path",
        )
    return path
