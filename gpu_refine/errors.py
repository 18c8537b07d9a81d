"""Exceptions raised by the library; the CLI turns each into a one-line message and exit code."""


class GpuRefineError(Exception):
    """Base class: a problem the user can fix (bad input, bad parameter, unusable device)."""


class InputError(GpuRefineError):
    """A file is missing, unreadable or has content that cannot be used."""


class ParameterError(GpuRefineError):
    """A parameter name or value is wrong."""


class BackendError(GpuRefineError):
    """The requested compute backend cannot run here."""


class ResultError(GpuRefineError):
    """A computation produced a number that cannot be reported (NaN or infinite)."""
