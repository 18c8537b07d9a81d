"""Where restraint dictionaries come from: ``monlib=DIR``, else ``$CLIBD_MON``, else built-in.

A directory in the CCP4 monomer-library layout (``list/mon_lib_list.cif`` or
``links_and_mods.cif``, ``ener_lib.cif``, ``<first letter>/<NAME>.cif``) is read by gemmi.  The
built-in dictionary (``gpu_refine/restraints/monomers``) has that layout too; see its README for
the sources of its values.
"""
import logging
import os
from pathlib import Path

import gemmi

from ..errors import InputError

log = logging.getLogger(__name__)

BUILTIN = Path(__file__).resolve().parent / "monomers"


def find_library(monlib=None):
    """(directory, where it came from): the explicit one, ``$CLIBD_MON``, or the built-in one."""
    if monlib:
        path, source = Path(monlib), "monlib="
    elif os.environ.get("CLIBD_MON"):
        path, source = Path(os.environ["CLIBD_MON"]), "$CLIBD_MON"
    else:
        return BUILTIN, "built-in"
    if not path.is_dir():
        raise InputError(f"monomer library directory not found: {path} (from {source})")
    if not ((path / "list" / "mon_lib_list.cif").is_file() or
            (path / "links_and_mods.cif").is_file()):
        raise InputError(f"{path} (from {source}) is not a monomer library: it has neither "
                         "list/mon_lib_list.cif nor links_and_mods.cif")
    return path, source


def read_library(resnames, monlib=None, dictionaries=()):
    """A gemmi MonLib with every residue name that the library (or an extra CIF) defines.

    Returns (monlib, description, missing names).
    """
    path, source = find_library(monlib)
    try:
        lib = gemmi.read_monomer_lib(str(path) + os.sep, sorted(resnames), ignore_missing=True)
    except Exception as exc:
        raise InputError(f"cannot read the monomer library {path}: {exc}") from None
    for cif in dictionaries:
        if not Path(cif).is_file():
            raise InputError(f"restraint dictionary not found: {cif}")
        try:
            defined = [b.name for b in gemmi.cif.read(str(cif))
                       if b.find_mmcif_category("_chem_comp_atom.")]
            lib.read_monomer_cif(str(cif))
        except Exception as exc:
            raise InputError(f"cannot read restraint dictionary {cif}: {exc}") from None
        if not defined:
            raise InputError(f"restraint dictionary {cif} defines no monomer (no "
                             "_chem_comp_atom table): is it a model file?")
    missing = sorted(set(resnames) - set(lib.monomers.keys()))
    return lib, f"{path} ({source})", missing
