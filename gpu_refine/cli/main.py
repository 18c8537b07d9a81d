"""``gpu-refine``: subcommand dispatch, logging, parameter translation and exit codes.

Exit codes: 0 ok; 1 a problem with the input or parameters (one-line reason on stderr);
2 command-line usage; 3 out of memory or an internal error (one line; details with --debug).
"""
import argparse
import contextlib
import logging
import shlex
import signal
import sys
import threading

from .. import __version__
from ..backend import check_environment
from ..errors import GpuRefineError, ParameterError
from . import example_cmd, geometry_cmd, map_cmd, rsr_cmd, validate_cmd
from .params import UsageError, check_repeats, expand_params_files, translate

SUBCOMMANDS = {"map": map_cmd, "validate": validate_cmd, "geometry": geometry_cmd,
               "rsr": rsr_cmd, "example": example_cmd}
log = logging.getLogger("gpu_refine")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # A value of the wrong kind is a parameter error (exit 1), as the checks of the
        # values themselves are; a malformed command line is a usage error (exit 2).
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        if "invalid" in message and "value:" in message:
            raise ParameterError(where + message)
        raise UsageError(where + message)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a batch system's stop) ends a run as Ctrl-C does: its outputs are cleaned up
    and its log says so."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt("terminated")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser():
    parser = _Parser(
        prog="gpu-refine",
        description="Batched refinement of atomic models against cryo-EM maps, on the GPU "
                    "(CuPy) or in NumPy.  Parameters as --options or phenix-style key=value.",
        epilog="Exit codes: 0 ok; 1 bad input or parameters; 2 usage; 3 out of memory or "
               "internal error.  `gpu-refine COMMAND -h` for a command's parameters.")
    parser.add_argument("--version", action="version", version=f"gpu-refine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        p.__class__ = _Parser
        p.add_argument("--backend", default=None, choices=["auto", "numpy", "cupy"],
                       help="compute backend (default: GPU if CuPy sees one; env GPU_REFINE_BACKEND)")
        p.add_argument("--quiet", action="store_true", help="only warnings and errors")
        p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
        module.add_arguments(p)
    return parser, sub.choices


def _header(args, argv):
    from ..backend import get_backend
    args.device = get_backend(args.backend).device
    args.command_line = "gpu-refine " + " ".join(shlex.quote(a) for a in argv)
    log.info("gpu-refine %s | device: %s", __version__, args.device)
    log.info("command: %s", args.command_line)


def run(argv=None):
    """Run one command line; returns the exit code.  The log goes to the current stdout."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    debug = "--debug" in argv
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    try:
        with _terminate_as_interrupt():
            notes = []
            if argv and argv[0] in subparsers:
                tokens, sources = expand_params_files(argv[1:])
                notes = check_repeats(tokens, sources, subparsers[argv[0]])
                argv_t = [argv[0]] + translate(tokens, subparsers[argv[0]])
            else:
                argv_t = argv
            args = parser.parse_args(argv_t)
            if args.command is None:
                parser.print_help(sys.stderr)
                return 2
            check_environment()
            log.addHandler(console)
            log.setLevel(logging.WARNING if args.quiet else logging.INFO)
            _header(args, argv)
            for note in notes:
                log.info("%s", note)
            SUBCOMMANDS[args.command].main(args)
            return 0
    except GpuRefineError as exc:
        print(f"gpu-refine: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except MemoryError:
        print("gpu-refine: error: out of memory; use a smaller batch or grid", file=sys.stderr)
        return 3
    except KeyboardInterrupt as exc:
        print(f"gpu-refine: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130 if not str(exc) else 143
    except Exception as exc:
        if debug:
            raise
        print(f"gpu-refine: internal error: {exc.__class__.__name__}: {exc} "
              "(rerun with --debug for details)", file=sys.stderr)
        return 3
    finally:
        log.removeHandler(console)
        log.setLevel(logging.NOTSET)


def main():
    sys.exit(run())
