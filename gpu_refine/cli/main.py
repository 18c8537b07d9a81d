"""``gpu-refine``: subcommand dispatch, logging, parameter translation and exit codes.

Exit codes: 0 ok; 1 a problem with the input or parameters (one-line reason on stderr);
2 command-line usage; 3 out of memory or an internal error (one line; details with --debug).
"""
import argparse
import logging
import shlex
import sys

from .. import __version__
from ..errors import GpuRefineError
from . import example_cmd, geometry_cmd, map_cmd, rsr_cmd, validate_cmd
from .params import expand_params_files, translate

SUBCOMMANDS = {"map": map_cmd, "validate": validate_cmd, "geometry": geometry_cmd,
               "rsr": rsr_cmd, "example": example_cmd}
log = logging.getLogger("gpu_refine")


class UsageError(GpuRefineError):
    """The command line itself is malformed (argparse's complaint): exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    debug = "--debug" in argv
    try:
        if argv and argv[0] in subparsers:
            argv_t = [argv[0]] + translate(expand_params_files(argv[1:]), subparsers[argv[0]])
        else:
            argv_t = argv
        args = parser.parse_args(argv_t)
        if args.command is None:
            parser.print_help()
            return 2
        logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                            format="%(message)s", stream=sys.stdout)
        _header(args, argv)
        SUBCOMMANDS[args.command].main(args)
        return 0
    except GpuRefineError as exc:
        print(f"gpu-refine: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except MemoryError:
        print("gpu-refine: error: out of memory; use a smaller batch or grid", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("gpu-refine: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"gpu-refine: internal error: {exc.__class__.__name__}: {exc} "
              "(rerun with --debug for details)", file=sys.stderr)
        return 3


def main():
    sys.exit(run())
