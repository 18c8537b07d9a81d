"""File checks and safe writing shared by the readers and writers."""
import os
import tempfile

from .errors import InputError


def check_readable(path, extensions, kind):
    """Raise InputError if ``path`` is missing, a directory, or not one of ``extensions``."""
    if not os.path.exists(path):
        raise InputError(f"{kind} file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"{kind} path is a directory, not a file: {path}")
    if not path.lower().endswith(extensions):
        raise InputError(f"unknown {kind} format for {path} (expected one of: "
                         f"{', '.join(extensions)})")


def output_directory(path):
    """The directory that output ``path`` goes into, created if missing (as for
    ``output.prefix=results/run1``); InputError if it cannot be."""
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory {directory}: "
                         f"{exc.strerror or exc}") from None
    return directory


def write_atomically(path, data, overwrite=False):
    """Write to a temporary file beside ``path`` and rename it into place.

    ``data`` is bytes, or a callable that writes the file whose path it is given.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise InputError(f"output exists and would be overwritten: {path} (use --overwrite)")
    directory = output_directory(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            if not callable(data):
                f.write(data)
        if callable(data):
            data(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
