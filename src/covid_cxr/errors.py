"""Exceptions with messages a user can act on: which file, what is wrong, what to do."""

from __future__ import annotations

import re


class CovidCxrError(Exception):
    """Base of every error raised on purpose; the CLI prints these without a traceback."""


class ConfigError(CovidCxrError):
    """A configuration file or option is wrong."""


class DataError(CovidCxrError):
    """A dataset, manifest or source layout is wrong or unusable."""


class RadiographError(CovidCxrError):
    """An image file cannot be turned into a radiograph.

    `source` names the file (or '<bytes>'), `reason` says what is wrong in a few words.
    """

    def __init__(self, source: str, reason: str, hint: str = "") -> None:
        self.source = source
        self.reason = reason
        self.hint = hint
        message = f"{source}: {reason}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class UnreadableFileError(RadiographError):
    """The file cannot be opened at all: missing, a folder, or no permission."""


class EmptyFileError(RadiographError):
    """The file has zero bytes."""


class NotAnImageError(RadiographError):
    """The bytes are not any image format we know (text, PDF, ...)."""


class CorruptImageError(RadiographError):
    """The format is known but the data is truncated or damaged."""


class UnsupportedImageError(RadiographError):
    """A real image we deliberately refuse: unknown codec, multi-frame or 3-D volume, odd mode."""


class ImageTooLargeError(RadiographError):
    """Too many pixels (decompression-bomb guard), refused from the header before decoding."""


class ImageTooSmallError(RadiographError):
    """Smaller than the minimum side length; nothing diagnostic survives at that size."""


class OutOfScopeError(RadiographError):
    """A readable image the model cannot judge: not a frontal chest radiograph (the input gate).

    The reason starts with "out of scope:" and says why (wrong modality, lateral view, body
    part, or the image classifier's verdict).
    """


class ModelError(CovidCxrError):
    """A model file or checkpoint is missing, corrupt or of the wrong kind."""


def failure_reason(exc: BaseException) -> str:
    """The reason to show for a failed file, without repeating its path (shown beside it)."""
    if isinstance(exc, RadiographError):
        return f"{exc.reason} ({exc.hint})" if exc.hint else exc.reason
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, CovidCxrError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def error_code(exc: BaseException) -> str:
    """A short, stable code for a failure, free of file names and header values
    (CorruptImageError -> corrupt_image): what the API reports and the audit trail keeps."""
    if isinstance(exc, OSError) and not isinstance(exc, CovidCxrError):
        return "unreadable_file"
    if not isinstance(exc, CovidCxrError):
        return "internal_error"
    name = type(exc).__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
