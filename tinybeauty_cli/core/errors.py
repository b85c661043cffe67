"""The one family of errors the library raises; the CLI turns them into one line."""

from __future__ import annotations

from typing import Iterable


class TbOptError(Exception):
    """Base class. ``hint`` is a short suggestion the CLI prints after the message."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(TbOptError):
    """Options that do not fit together (exit code 2, like a CLI usage error)."""

    exit_code = 2


class ConfigError(UsageError):
    """An option's or configuration's value is invalid (exit code 2: a usage error, however it is detected)."""


class InputError(TbOptError):
    """An input file or folder cannot be used (missing, unreadable, corrupt)."""


class UnsafeCheckpointError(InputError):
    """A checkpoint needs arbitrary unpickling, which can run code."""


class ArchitectureMismatchError(InputError):
    """A state dict does not fit the architecture."""

    def __init__(
        self,
        message: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[str] = (),
        hint: str | None = None,
    ):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        super().__init__(message, hint)


class OutputExistsError(TbOptError):
    """An output exists and ``--force`` was not given."""

    def __init__(self, path: object):
        super().__init__(f"{path} already exists", hint="pass --force to overwrite it")


class OutputError(TbOptError):
    """An output cannot be written where it was asked: under a file, in a folder that cannot be
    made or written, or on a full disk. Nothing partial is left behind."""


class ImageError(InputError):
    """An image cannot be read or a folder holds no usable images."""


class UnsupportedError(TbOptError):
    """A valid request this tool cannot carry out (e.g. an op a runner does not know)."""


class UnusableModelError(InputError):
    """Weights that cannot be right: NaN or Inf in a tensor, or in what the model computes."""


class NonFiniteOutputError(UnusableModelError):
    """A model computes NaN or Inf on an image (finite on the plain test image checked when it was opened).

    ``model`` and ``image`` are how messages name them: a file, or e.g. "built-in test image 3".
    """

    def __init__(self, model: object, image: object, bad: int | None = None, total: int = 1,
                 hint: str | None = None):
        self.model, self.image = str(model), str(image)
        count = f" ({bad} of {total} images)" if bad is not None and total > 1 else ""
        super().__init__(f"{model} computes NaN or Inf on {image}{count}; its weights cannot be right",
                         hint or "nothing was written; check the model's weights (tbopt info runs it only on a "
                                 "plain test image)")


class NotImageModelError(InputError):
    """A model file, but not of an image-to-image network (one 3-channel image in, one out)."""
