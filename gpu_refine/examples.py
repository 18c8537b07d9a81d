"""A self-made example: an ideal α-helix and its simulated map (no external data needed)."""
import gemmi
import numpy as np

from .density import DensitySettings, ModelMapper
from .grid import box_around
from .model import Batch, Model

# Backbone geometry (Engh & Huber) and α-helix torsions (phi, psi, omega) in degrees.
_BOND = {"N-CA": 1.458, "CA-C": 1.525, "C-N": 1.329, "C-O": 1.231, "CA-CB": 1.530}
_ANGLE = {"N-CA-C": 111.2, "CA-C-N": 116.2, "C-N-CA": 121.7, "CA-C-O": 120.1, "N-CA-CB": 110.5}
_PHI, _PSI, _OMEGA = -57.8, -47.0, 180.0
_SEQUENCE = "AEAAAKEAAAKEAAAKAAAEAAKA"


def place_atom(a, b, c, bond, angle, torsion):
    """Position of d with |cd| = bond, angle(b,c,d) and torsion(a,b,c,d) in degrees (NeRF)."""
    angle, torsion = np.radians(angle), np.radians(torsion)
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d2 = bond * np.array([-np.cos(angle), np.sin(angle) * np.cos(torsion),
                          np.sin(angle) * np.sin(torsion)])
    return c + d2[0] * bc + d2[1] * m + d2[2] * n


def helix_structure(sequence=_SEQUENCE, b_iso=30.0):
    """An ideal α-helix with Ala/Glu/Lys reduced to their CB (a small, well-formed test model)."""
    names = {"A": "ALA", "E": "GLU", "K": "LYS"}
    n = np.array([0.0, 0.0, 0.0])
    ca = np.array([_BOND["N-CA"], 0.0, 0.0])
    t = np.radians(180 - _ANGLE["N-CA-C"])
    c = ca + _BOND["CA-C"] * np.array([np.cos(t), np.sin(t), 0.0])
    st = gemmi.Structure()
    st.name = "helix"
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    for i, aa in enumerate(sequence):
        if i > 0:
            n_new = place_atom(n, ca, c, _BOND["C-N"], _ANGLE["CA-C-N"], _PSI)
            ca_new = place_atom(ca, c, n_new, _BOND["N-CA"], _ANGLE["C-N-CA"], _OMEGA)
            c_new = place_atom(c, n_new, ca_new, _BOND["CA-C"], _ANGLE["N-CA-C"], _PHI)
            n, ca, c = n_new, ca_new, c_new
        # O is trans to the next N; CB from the backbone with L chirality.
        n_next = place_atom(n, ca, c, _BOND["C-N"], _ANGLE["CA-C-N"], _PSI)
        o = place_atom(n_next, ca, c, _BOND["C-O"], _ANGLE["CA-C-O"], 180.0)
        cb = place_atom(c, n, ca, _BOND["CA-CB"], _ANGLE["N-CA-CB"], -122.6)
        res = gemmi.Residue()
        res.name = names[aa]
        res.seqid = gemmi.SeqId(i + 1, " ")
        res.entity_type = gemmi.EntityType.Polymer
        for name, el, pos in (("N", "N", n), ("CA", "C", ca), ("C", "C", c), ("O", "O", o),
                              ("CB", "C", cb)):
            atom = gemmi.Atom()
            atom.name = name
            atom.element = gemmi.Element(el)
            atom.pos = gemmi.Position(*pos)
            atom.b_iso = b_iso
            atom.occ = 1.0
            res.add_atom(atom)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_entities()
    return st


def simulated_map(model, resolution=3.0, noise=0.3, seed=0, backend=None, padding=8.0, rate=1.5):
    """Model map at ``resolution`` on a box around the model (spacing d / (2 rate)), plus
    Gaussian noise (``noise`` × the map's standard deviation).  Returns (data, spec)."""
    spec = box_around(model.xyz, resolution / (2 * rate), padding)
    batch = Batch.from_model(model, 1, backend=backend)
    mapper = ModelMapper(spec, resolution, DensitySettings(table="electron"), backend=backend)
    data = batch.backend.to_numpy(mapper.image(batch))[0].astype(np.float64)
    rng = np.random.default_rng(seed)
    data += rng.normal(scale=noise * data.std(), size=data.shape)
    return data.astype(np.float32), spec


def make_example(backend=None):
    """(Model, map data, spec) of the bundled example: a 24-residue helix at 3 Å."""
    model = Model.from_gemmi(helix_structure())
    data, spec = simulated_map(model, 3.0, backend=backend)
    return model, data, spec
