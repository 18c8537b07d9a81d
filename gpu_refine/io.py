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
