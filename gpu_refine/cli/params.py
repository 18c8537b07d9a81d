"""Phenix-style ``key=value`` parameters, translated to argparse options.

A key matches an option exactly or as a unique dotted suffix (``prefix`` for ``output.prefix``),
or ends with one (a phenix path, ``pdb_interpretation.peptide_link.apply_all_trans``); unknown
keys get the close matches suggested.
"""
import argparse
import difflib
import os

from ..errors import GpuRefineError, ParameterError


class UsageError(GpuRefineError):
    """The command line itself is malformed (argparse's complaint, a key given twice): exit
    code 2."""

# Help of the restraint parameters that geometry and rsr both take.
RESTRAINT_HELP = {
    "monlib": "monomer library directory (CCP4 layout); default $CLIBD_MON, else the built-in "
              "dictionary",
    "h_distances": "X-H bond targets: electron (cloud) | nucleus",
    "find_links": "also link what the library defines from distances (disulfides, "
                  "glycosylation, ...), not only the file's records: true | false",
    "apply_all_trans": "restrain every peptide trans, whatever its omega in the model (else one "
                       "within 60° of cis is cis): true | false",
}


def add_dictionary_arguments(parser):
    parser.add_argument("--dictionary", action="append", default=[],
                        help="extra monomer CIF (repeatable)")
    parser.add_argument("--ignore-unknown", action="store_true",
                        help="leave residues without a dictionary unrestrained")


def boolean(text):
    """An option's true / false value (yes / no, 1 / 0; any case), for argparse's ``type``."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise ValueError(text)


def option_names(parser):
    """Long option names (without dashes) that take parameters: {name: action}."""
    names = {}
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                names[opt[2:]] = action
    return names


def resolve_key(key, names):
    key = key.strip().lstrip("-").replace("_", "-") if key not in names else key
    candidates = [key, key.replace("-", "_")]
    for c in candidates:
        if c in names:
            return c
    matches = [n for n in names if n.endswith("." + key) or n.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ParameterError(f"parameter {key!r} is ambiguous: {', '.join(sorted(matches))}")
    # A phenix path (pdb_interpretation.peptide_link.apply_all_trans): its trailing parts.
    parts = key.split(".")
    for k in range(1, len(parts)):
        try:
            return resolve_key(".".join(parts[k:]), names)
        except ParameterError:
            continue
    close = difflib.get_close_matches(key, list(names), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ParameterError(f"unknown parameter {key!r}{hint}")


def expand_params_files(argv):
    """Replace each ``*.params`` argument by its lines (a run's effective parameters), so that
    ``gpu-refine rsr P.params key=value`` reruns it with overrides.  Returns (tokens, sources):
    each token's parameter file, or None for one typed on the command line."""
    tokens, sources = [], []
    for tok in argv:
        if tok.endswith(".params") and "=" not in tok:
            try:
                with open(tok, encoding="utf-8") as f:
                    lines = [ln.strip() for ln in f]
            except OSError as exc:
                raise ParameterError(f"cannot read parameter file {tok}: {exc.strerror}") from None
            lines = [ln for ln in lines if ln and not ln.startswith("#")]
            tokens += lines
            sources += [tok] * len(lines)
        else:
            tokens.append(tok)
            sources.append(None)
    return tokens, sources


def _option_of(tok, names):
    """The option name a ``key=value`` or ``--key`` token sets, else None (a positional)."""
    if "=" in tok and not tok.startswith("-"):
        key = tok.split("=", 1)[0]
        return None if "/" in key or "\\" in key else resolve_key(key, names)
    if tok.startswith("--") and len(tok) > 2:
        return resolve_key(tok[2:].partition("=")[0], names)
    return None


def check_repeats(argv, sources, parser):
    """UsageError for a parameter typed twice on the command line (the last would win
    silently); a typed value that overrides a parameter file's is allowed: the notes say so."""
    names = option_names(parser)
    typed, from_file, notes = {}, {}, []
    for tok, source in zip(argv, sources):
        name = _option_of(tok, names)
        if name is None or isinstance(names[name], argparse._AppendAction):
            continue
        if source is not None:
            from_file[name] = (tok, source)
        elif name in typed:
            raise UsageError(f"parameter {name} is given twice ({typed[name]} and {tok}); "
                             "give it once")
        else:
            typed[name] = tok
            if name in from_file:
                notes.append(f"{tok} overrides {from_file[name][0]} of "
                             f"{os.path.basename(from_file[name][1])}")
    return notes


def translate(argv, parser):
    """Turn ``key=value`` tokens into ``--key value``; check ``--key`` tokens too."""
    names = option_names(parser)
    out = []
    for tok in argv:
        if "=" in tok and not tok.startswith("-"):
            key, value = tok.split("=", 1)
            if "/" in key or "\\" in key:  # a file path that contains '='
                out.append(tok)
                continue
            name = resolve_key(key, names)
            action = names[name]
            if action.nargs == 0:
                if value.lower() in ("true", "yes", "1"):
                    out.append("--" + name)
                elif value.lower() not in ("false", "no", "0"):
                    raise ParameterError(f"{key} takes true or false, not {value!r}")
            else:
                out += ["--" + name, value]
        elif tok.startswith("--") and len(tok) > 2:
            key, eq, value = tok[2:].partition("=")
            name = resolve_key(key, names)
            out.append("--" + name + (eq + value if eq else ""))
        else:
            out.append(tok)
    return out
