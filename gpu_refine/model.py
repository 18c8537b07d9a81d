"""Models: a gemmi structure kept for writing back, plus the arrays the kernels use.

``Model`` is one topology (atoms in file order).  ``Batch`` holds B models of that topology as
(B, N, ...) arrays on a backend: ensemble members, shaken starts and trial weights are all just
batch members.
"""
import functools
import logging
import os
from dataclasses import dataclass, field, replace

import gemmi
import numpy as np

from .backend import get_backend
from .checks import MAX_B, MAX_COORDINATE, MIN_B
from .errors import InputError, ParameterError
from .io import check_readable, write_atomically

log = logging.getLogger(__name__)


def _atoms_of(st, flags, show=lambda atom: f"occupancy {atom.occ:.2f}"):
    """"N atoms (e.g. chain/RES seq/name occupancy)" for the atoms ``flags`` marks."""
    first = next(c for c, f in zip(st[0].all(), flags) if f)
    return f"{int(np.sum(flags))} atoms (e.g. {first} {show(first.atom)})"


def atom_labels(st):
    """("chain/RES seq/name[.altloc]" (N,), altloc (N,), "" where none) of model 1's atoms in
    file order: how messages and restraints name atoms."""
    labels, alts = [], []
    for ch in st[0]:
        for res in ch:
            for at in res:
                alt = at.altloc if at.altloc != "\0" else ""
                labels.append(f"{ch.name}/{res.name} {str(res.seqid).strip()}/{at.name}"
                              + (f".{alt}" if alt else ""))
                alts.append(alt)
    return np.array(labels), np.array(alts)


def _anisou(atom):
    return "ANISOU " + " ".join(f"{x:.4g}" for x in atom.aniso.elements_pdb())


def _check_ranges(st, model):
    """InputError for values beyond any atom's (they would overflow a grid); warnings for
    an anisotropic U that is not positive-definite and for altloc occupancies that add up
    to more than 1."""
    far = np.abs(model.xyz).max(axis=1) > MAX_COORDINATE
    if far.any():
        raise InputError(f"{_atoms_of(st, far, lambda a: f'at {a.pos}')} lie more than "
                         f"{MAX_COORDINATE:g} Å from the origin: no map reaches there")
    low = model.b < MIN_B
    if low.any():
        raise InputError(f"{_atoms_of(st, low, lambda a: f'B {a.b_iso:.4g}')} have B below "
                         f"{MIN_B:g} Å², which no displacement has: check the B column")
    high = model.b > MAX_B
    if high.any():
        raise InputError(f"{_atoms_of(st, high, lambda a: f'B {a.b_iso:.4g}')} have B above "
                         f"{MAX_B:g} Å² (an rms displacement over 3.6 Å): check the B column")
    if model.is_aniso.any():
        u = model.u_aniso
        tensors = np.stack([u[:, [0, 3, 4]], u[:, [3, 1, 5]], u[:, [4, 5, 2]]], axis=1)
        lowest = np.where(model.is_aniso, np.linalg.eigvalsh(tensors)[:, 0], 1.0)
        absurd = 8 * np.pi**2 * lowest < MIN_B
        if absurd.any():
            raise InputError(f"{_atoms_of(st, absurd, _anisou)} have an anisotropic U far "
                             f"from positive-definite (below {MIN_B:g} Å² along an axis): "
                             "correct or remove their ANISOU")
        bad = lowest <= 0
        if bad.any():
            # As a negative B: taken as given (the blur keeps its Gaussian positive).
            log.warning("%s have an anisotropic U that is not positive-definite (no "
                        "displacement has it): model maps take it as given",
                        _atoms_of(st, bad, _anisou))
        big = model.is_aniso & (b_equivalent(u) > MAX_B)
        if big.any():
            raise InputError(f"{_atoms_of(st, big, lambda a: 'ANISOU')} have an anisotropic U "
                             f"whose B_eq is above {MAX_B:g} Å²")
    _check_altloc_occupancy(st)


def _check_altloc_occupancy(st):
    """Warn, naming the residue, where the conformers of an atom add up to more than 1."""
    over = []
    for ch in st[0]:
        for res in ch:
            if not any(at.has_altloc() for at in res):
                continue
            total = {}
            for at in res:
                total[at.name] = total.get(at.name, 0.0) + at.occ
            worst = max(total.values())
            if worst > 1.0 + 1e-3:
                over.append(f"{ch.name}/{res.name} {res.seqid} ({worst:.2f})")
    if over:
        log.warning("the altloc occupancies of %d residue(s) add up to more than 1: %s%s",
                    len(over), ", ".join(over[:5]), " ..." if len(over) > 5 else "")


@dataclass
class Model:
    """One topology.  Arrays are NumPy; ``structure`` holds exactly the atoms of the arrays."""
    structure: gemmi.Structure
    xyz: np.ndarray          # (N,3) Å
    b: np.ndarray            # (N,) Å² (B_iso, or B_eq for anisotropic atoms)
    u_aniso: np.ndarray      # (N,6) Å², U11 U22 U33 U12 U13 U23; zero where isotropic
    is_aniso: np.ndarray     # (N,) bool
    occ: np.ndarray          # (N,)
    element: np.ndarray      # (N,) str, scattering type (element symbol)
    residue_index: np.ndarray  # (N,) int, index into ``residues``
    residues: list = field(default_factory=list)  # [(chain, seqid str, resname)]

    @property
    def n_atoms(self):
        return len(self.xyz)

    @classmethod
    def from_gemmi(cls, st, model_index=0):
        """Arrays from model ``model_index`` of a gemmi Structure (which is copied and trimmed;
        its entities set up, without which gemmi's topology sees no polymer to link)."""
        if len(st) == 0:
            raise InputError("the model file has no models")
        st = st.clone()
        while len(st) > model_index + 1:
            del st[len(st) - 1]
        for _ in range(model_index):
            del st[0]
        st.remove_empty_chains()
        st.setup_entities()
        xyz, b, u, occ, el, rix, residues = [], [], [], [], [], [], []
        unknown = set()
        for ch in st[0]:
            for res in ch:
                residues.append((ch.name, str(res.seqid).strip(), res.name))
                for at in res:
                    e = at.element
                    if e == gemmi.Element("X"):
                        unknown.add(f"{ch.name}/{res.name} {res.seqid}/{at.name}")
                    xyz.append(at.pos.tolist())
                    b.append(at.b_iso)
                    a = at.aniso
                    u.append([a.u11, a.u22, a.u33, a.u12, a.u13, a.u23])
                    occ.append(at.occ)
                    el.append("H" if e.name == "D" else e.name)
                    rix.append(len(residues) - 1)
        if not xyz:
            raise InputError("the model has no atoms")
        if unknown:
            some = ", ".join(sorted(unknown)[:3])
            raise InputError(f"{len(unknown)} atoms have no known element (e.g. {some}); "
                             "set the element column")
        u = np.array(u, dtype=np.float64)
        model = cls(structure=st, xyz=np.array(xyz, dtype=np.float64),
                    b=np.array(b, dtype=np.float64), u_aniso=u, is_aniso=np.any(u != 0, axis=1),
                    occ=np.array(occ, dtype=np.float64), element=np.array(el),
                    residue_index=np.array(rix), residues=residues)
        model.check_finite()
        _check_ranges(st, model)
        negative = model.b < 0
        if negative.any():
            log.warning("%d atoms have B below 0 (lowest %.1f Å²), which no displacement has: "
                        "model maps take them as given; refined B start them at 1 Å²",
                        int(negative.sum()), float(model.b.min()))
        if (model.occ < 0).any():
            raise InputError(f"{_atoms_of(st, model.occ < 0)} have occupancy below 0: set them "
                             "to 0 (absent) or to what they are")
        if (model.occ > 1).any():
            log.warning("%s have occupancy above 1: model maps take them as given; occupancy "
                        "refinement brings them to 1 at most", _atoms_of(st, model.occ > 1))
        return model

    @functools.cached_property
    def _labels(self):
        return atom_labels(self.structure)

    @property
    def altloc(self):
        """(N,) str: each atom's altloc, "" where none."""
        return self._labels[1]

    def atom_label(self, i):
        """'chain/RES seq/name[.altloc]' of atom ``i`` (file order), for messages."""
        return str(self._labels[0][i])

    def check_finite(self):
        for name in ("xyz", "b", "occ", "u_aniso"):
            if not np.all(np.isfinite(getattr(self, name))):
                raise InputError(f"the model has non-finite values in {name}")

    def isotropic(self):
        """A copy in which anisotropic atoms are isotropic with B = B_eq = 8pi² tr(U)/3, as
        refinement of isotropic B needs (the density of an anisotropic atom ignores B)."""
        b = np.where(self.is_aniso, b_equivalent(self.u_aniso), self.b)
        st = self.structure.clone()
        for i, cra in enumerate(st[0].all()):
            if self.is_aniso[i]:
                cra.atom.aniso = gemmi.SMat33f(0, 0, 0, 0, 0, 0)
                cra.atom.b_iso = float(b[i])
        return replace(self, structure=st, b=b, u_aniso=np.zeros_like(self.u_aniso),
                       is_aniso=np.zeros_like(self.is_aniso))

    def to_gemmi(self, xyz=None, b=None, occ=None, u_aniso=None):
        """A copy of the structure with new per-atom values where given (same atoms, order,
        names); the others are the model's own, which the structure holds."""
        st = self.structure.clone()
        atoms = [at for chain in st[0] for res in chain for at in res]
        # From plain lists, one field at a time: models of a batch are written or masked one
        # call each, and numpy scalars and CRA objects would cost more than the updates.
        if xyz is not None:
            for at, p in zip(atoms, np.asarray(xyz, dtype=np.float64).tolist()):
                at.pos = gemmi.Position(*p)
        if b is not None:
            for at, v in zip(atoms, np.asarray(b, dtype=np.float64).tolist()):
                at.b_iso = v
        if occ is not None:
            for at, v in zip(atoms, np.asarray(occ, dtype=np.float64).tolist()):
                at.occ = v
        if u_aniso is not None:
            for i in np.flatnonzero(self.is_aniso):
                atoms[i].aniso = gemmi.SMat33f(*map(float, u_aniso[i]))
        return st


def b_equivalent(u):
    """B_eq (...,) of U (...,6) in Å²: 8pi² times the mean of U11, U22, U33."""
    return 8 * np.pi**2 * (u[..., 0] + u[..., 1] + u[..., 2]) / 3


def read_model(path, model_index=0):
    """Read PDB or mmCIF (optionally gzipped) into a Model."""
    path = os.fspath(path)
    check_readable(path, "model")
    try:
        st = gemmi.read_structure(path, merge_chain_parts=True)
    except Exception as exc:
        raise InputError(f"cannot read model {path}: {exc}") from None
    return Model.from_gemmi(st, model_index)


def read_batch(path, backend=None, dtype=np.float32):
    """All models of a multi-model file as one Batch (they must share one topology)."""
    path = os.fspath(path)
    check_readable(path, "model")
    try:
        st = gemmi.read_structure(path, merge_chain_parts=True)
    except Exception as exc:
        raise InputError(f"cannot read model {path}: {exc}") from None
    if len(st) == 0:
        raise InputError(f"the model {path} has no atoms")
    models = [Model.from_gemmi(st, i) for i in range(len(st))]
    ref = models[0]
    for i, m in enumerate(models[1:], start=2):
        if m.n_atoms != ref.n_atoms or list(m.element) != list(ref.element):
            raise InputError(f"model {i} of {path} has different atoms from model 1")
    stack = (lambda name: np.stack([getattr(m, name) for m in models]).astype(dtype))
    aniso = any(m.is_aniso.any() for m in models)
    return Batch(ref, stack("xyz"), stack("b"), stack("occ"), stack("u_aniso") if aniso else None,
                 backend=backend)


class Batch:
    """B models of one topology on a backend: xyz (B,N,3), b (B,N), occ (B,N), u (B,N,6).

    ``mask_index`` (B,): which of a map target's masks each member is compared inside (the
    mask around its own starting model, ``PreparedMap.masks``); 0 for every member unless
    given.  Subsets keep it."""

    def __init__(self, model, xyz, b, occ, u=None, backend=None, mask_index=None):
        self.model = model
        self.backend = get_backend(backend)
        bk = self.backend
        self.xyz = bk.asarray(xyz)
        self.b = bk.asarray(b, dtype=self.xyz.dtype)
        self.occ = bk.asarray(occ, dtype=self.xyz.dtype)
        self.u = None if u is None else bk.asarray(u, dtype=self.xyz.dtype)
        n = model.n_atoms
        if self.xyz.ndim != 3 or self.xyz.shape[1:] != (n, 3):
            raise ParameterError(f"xyz must have shape (B, {n}, 3), got {self.xyz.shape}")
        if self.b.shape != self.xyz.shape[:2] or self.occ.shape != self.xyz.shape[:2]:
            raise ParameterError("b and occ must have shape (B, N)")
        index = (np.zeros(self.xyz.shape[0], dtype=np.int64) if mask_index is None
                 else bk.to_numpy(mask_index).astype(np.int64).reshape(-1))
        if index.shape != self.xyz.shape[:1] or (index < 0).any():
            raise ParameterError("mask_index must hold one index >= 0 per model")
        self.mask_index = index

    @classmethod
    def from_model(cls, model, n_models=1, backend=None, dtype=np.float32):
        """n_models copies of ``model``."""
        if n_models < 1:
            raise ParameterError("a batch needs at least one model")
        rep = lambda a: np.broadcast_to(a, (n_models,) + a.shape).astype(dtype)
        u = rep(model.u_aniso) if model.is_aniso.any() else None
        return cls(model, rep(model.xyz), rep(model.b), rep(model.occ), u, backend=backend)

    @property
    def size(self):
        return self.xyz.shape[0]

    def subset(self, index):
        """A Batch of the members selected by ``index`` (a slice, or a list that may repeat)."""
        pick = (lambda a: None if a is None else a[index])
        return Batch(self.model, pick(self.xyz), pick(self.b), pick(self.occ), pick(self.u),
                     backend=self.backend, mask_index=self.mask_index[index])

    @property
    def dtype(self):
        return self.xyz.dtype

    def to_structures(self):
        """One gemmi Structure per batch member."""
        bk = self.backend
        xyz, b, occ = bk.to_numpy(self.xyz), bk.to_numpy(self.b), bk.to_numpy(self.occ)
        u = None if self.u is None else bk.to_numpy(self.u)
        return [self.model.to_gemmi(xyz[i], b[i], occ[i], None if u is None else u[i])
                for i in range(self.size)]


def structures_as_models(structures):
    """One multi-model Structure from several single-model ones (MODEL 1..B)."""
    out = structures[0].clone()
    for i, st in enumerate(structures[1:], start=2):
        m = st[0].clone()
        m.num = i
        out.add_model(m)
    out[0].num = 1
    return out


def check_pdb_format(structure):
    """InputError where ``structure`` cannot be written in the PDB format as it is: chain
    names over 2 characters (gemmi refuses them) or residue names over 3 (it would cut
    them, silently)."""
    chains = sorted({ch.name for m in structure for ch in m if len(ch.name) > 2})
    names = sorted({r.name for m in structure for ch in m for r in ch if len(r.name) > 3})
    problems = ([f"chain name(s) longer than 2 characters ({', '.join(chains[:3])})"]
                if chains else []) + ([f"residue name(s) longer than 3 characters "
                                       f"({', '.join(names[:3])})"] if names else [])
    if problems:
        raise InputError(f"the model cannot be written in the PDB format: {'; '.join(problems)}"
                         " (mmCIF, the default output, keeps them)")


def write_model(path, structure, fmt=None, overwrite=False):
    """Write mmCIF (default; by extension) or PDB.  Refuses to replace a file unless overwrite."""
    path = os.fspath(path)
    fmt = fmt or ("pdb" if path.lower().endswith((".pdb", ".ent")) else "cif")
    st = structure.clone()
    st.setup_entities()
    if fmt == "pdb":
        check_pdb_format(st)
        text = st.make_pdb_string(gemmi.PdbWriteOptions(minimal=False))
    else:
        doc = st.make_mmcif_document()
        text = doc.as_string()
    write_atomically(path, text.encode(), overwrite=overwrite)
