"""File checks and safe writing shared by the readers and writers."""
import contextlib
import os
import socket
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


def check_output(path, overwrite=False, inputs=(), kind=None):
    """Before the work that ``path`` is to receive: InputError if it is one of the ``inputs``
    (even with ``overwrite``), is not named as a ``kind`` file ("model" or "map": an MRC
    written to a name ending .cif), exists (and ``overwrite`` is false) or cannot be written
    there (a file is made and removed beside it; its directory is created if missing)."""
    path = os.fspath(path)
    if kind is not None:
        extensions = tuple(e for e in EXTENSIONS[kind] if not e.endswith((".gz", ".mtz")))
        if not path.lower().endswith(extensions):
            raise InputError(f"output {path} is written as a {kind} file: name it with one "
                             f"of {', '.join(extensions)}")
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
        # mkstemp makes the file 0600: give it the mode any other program's output has.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):   # a full disk, a quota
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(prefix):
    """Hold ``prefix``.lock for a run's whole life, so that a second run writing the same
    outputs (with --overwrite, say) stops at once instead of mixing its files with the
    first's.  A lock left by a run that no longer exists on this host is taken over."""
    path = os.fspath(prefix) + ".lock"
    output_directory(path)
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    pid, _, host = f.read().strip().partition(" ")
            except OSError:
                pid, host = "", ""
            if host == socket.gethostname() and pid.isdigit() and not _running(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            owner = f"process {pid} on {host}" if pid else "another run"
            raise InputError(f"outputs {prefix}.* are being written by {owner} ({path}); "
                             "wait for it, or remove the lock if that run is gone") from None
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    else:
        raise InputError(f"cannot take the lock {path}")
    try:
        os.write(fd, me.encode())
        os.close(fd)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
