"""Write tests/cupy_api.json: the names and call signatures CuPy offers.

The CuPy stand-in (tests/cupy_standin.py) forwards to NumPy, which has functions, keywords and
ndarray methods CuPy lacks; with this snapshot it refuses them as CuPy would, so a NumPy-only
call in a GPU branch fails on a machine without a GPU.  CuPy imports without a GPU, so run this
anywhere CuPy is installed (``pip install cupy-cuda13x``), after a CuPy upgrade:

    python tools/cupy_api_snapshot.py [OUT.json]

Signatures come from ``inspect`` or, for Cython methods and ufuncs, from the signature line
Cython embeds at the top of their docstrings.
"""
import ast
import inspect
import json
import pathlib
import sys

import cupy

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "cupy_api.json"


def _docstring_signature(fn, name):
    """Parameters from a Cython docstring's first line, e.g. ``exp(x, /, out=None, *, ...)``."""
    first = (getattr(fn, "__doc__", None) or "").lstrip().split("\n", 1)[0]
    head = first.split("->")[0].strip().replace("\\*", "*")
    qualified = head.split("(", 1)[0]
    if "(" not in head or qualified.rsplit(".", 1)[-1] != name:
        return None
    try:
        tree = ast.parse(f"def f({head.split('(', 1)[1]}: pass")
    except SyntaxError:
        return None
    return tree.body[0].args


def _spec(fn, name):
    """{"positional": max positional count or None for *args, "keywords": names or None for
    **kwargs}, or None where neither inspect nor the docstring gives a signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        args = _docstring_signature(fn, name)
        if args is None:
            return None
        positional = [a.arg for a in args.posonlyargs + args.args]
        if positional[:1] == ["self"]:
            positional = positional[1:]
        return {"positional": None if args.vararg else len(positional),
                "keywords": None if args.kwarg else
                sorted([a.arg for a in args.args if a.arg != "self"]
                       + [a.arg for a in args.kwonlyargs])}
    P = inspect.Parameter
    kinds = [p.kind for p in sig.parameters.values()]
    return {"positional": None if P.VAR_POSITIONAL in kinds else
            sum(k in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD) for k in kinds),
            "keywords": None if P.VAR_KEYWORD in kinds else
            sorted(n for n, p in sig.parameters.items()
                   if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY))}


def _members(obj):
    out = {}
    for name in sorted(dir(obj)):
        if name.startswith("_"):
            continue
        value = getattr(obj, name)
        if isinstance(value, cupy.ufunc):
            out[name] = {"ufunc": True, **(_spec(value, name) or {})}
        elif callable(value) and not isinstance(value, type):
            out[name] = _spec(value, name) or {}
        else:
            out[name] = None   # a constant, type or submodule: present, not checked
    return out


def main():
    ufunc = cupy.add
    snapshot = {
        "cupy_version": cupy.__version__,
        "made_by": "tools/cupy_api_snapshot.py",
        "cupy": _members(cupy),
        "cupy.fft": _members(cupy.fft),
        "ndarray": _members(cupy.ndarray),
        "ufunc_methods": {name: _spec(getattr(ufunc, name), name) or {}
                          for name in ("at", "reduce", "accumulate", "reduceat", "outer")
                          if hasattr(ufunc, name)},
    }
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.write_text(json.dumps(snapshot, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} (CuPy {cupy.__version__}: {len(snapshot['cupy'])} names, "
          f"{len(snapshot['ndarray'])} ndarray members)", file=sys.stderr)


if __name__ == "__main__":
    main()
