"""File checks and safe writing shared by the readers and writers."""
import os
import tempfile

from .errors import InputError


EXTENSIONS = {
    "model": (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz"),
    "map": (".mrc", ".map", ".ccp4", ".mrc.gz", ".map.gz", ".ccp4.gz", ".mtz"),
}


def check_readable(path, kind):
    """Raise InputError if ``path`` is missing, a directory, or not named as a ``kind`` file
    ("model" or "map"; one named as the other kind is said to be, as when the two are swapped
    on a command line)."""
    if not os.path.exists(path):
        raise InputError(f"{kind} file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"{kind} path is a directory, not a file: {path}")
    extensions = EXTENSIONS[kind]
    if not path.lower().endswith(extensions):
        other = [k for k, ext in EXTENSIONS.items() if k != kind and path.lower().endswith(ext)]
        hint = f"; it is named as a {other[0]} file" if other else ""
        raise InputError(f"unknown {kind} format for {path} (expected one of: "
                         f"{', '.join(extensions)}){hint}")


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


def _refuse_existing(path, overwrite):
    if os.path.exists(path) and not overwrite:
        raise InputError(f"output exists and would be overwritten: {path} (use --overwrite)")


def _temporary_beside(path):
    """(fd, name) of a new temporary file in the directory of output ``path``."""
    directory = output_directory(path)
    try:
        return tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


def check_output(path, overwrite=False, inputs=()):
    """Before the work that ``path`` is to receive: InputError if it is one of the ``inputs``
    (even with ``overwrite``), exists (and ``overwrite`` is false) or cannot be written there
    (a file is made and removed beside it; its directory is created if missing)."""
    path = os.fspath(path)
    for given in inputs:
        if given and os.path.realpath(path) == os.path.realpath(given):
            raise InputError(f"output {path} would replace the input {given}; choose another "
                             "output name")
    _refuse_existing(path, overwrite)
    fd, tmp = _temporary_beside(path)
    os.close(fd)
    os.unlink(tmp)


def write_atomically(path, data, overwrite=False):
    """Write to a temporary file beside ``path`` and rename it into place.

    ``data`` is bytes, or a callable that writes the file whose path it is given.
    """
    path = os.fspath(path)
    _refuse_existing(path, overwrite)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            if not callable(data):
                f.write(data)
        if callable(data):
            data(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):   # a full disk, a quota
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise
