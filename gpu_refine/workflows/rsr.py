"""Real-space refinement of a batch of models against one map (phenix.real_space_refine-style).

Every batch member (a starting model, a shaken copy of one, a weight of a grid) is refined at
once:
    sites:  T = w T_map(xyz) + T_restraints(xyz)
    ADP:    T = w_adp T_map(B) + T_adp(B)
    occupancy: T = T_map(occ), altloc conformers of a residue constrained to sum to 1
T_map is the model-map correlation inside a soft mask (``target=cc``, needed for B and
occupancy) or, for sites, the map value at atom centres (``target=map_value``).  Without a
given weight, trial weights are refined side by side for a short run and the largest one whose
geometry stays within the limits is kept; given several (a grid), each start is refined with
each of them.
"""
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..backend import get_backend
from ..checks import check_finite, check_finite_rows, check_number
from ..density import DensitySettings, ModelMapper, lowest_b, map_in_chunks, refmac_blur
from ..dynamics import LangevinSettings, langevin
from ..errors import InputError, ParameterError
from ..mapprep import box_slices, box_spec, low_pass, prepare_map
from ..metrics import mask_and_box_cc, model_box, molecular_masks
from ..minimize import LBFGSSettings, minimize_lbfgs
from ..model import Batch, b_equivalent
from ..restraints.adp import ADPRestraints
from ..restraints.geometry import GeometryRestraints
from ..restraints.precondition import SitesPreconditioner
from ..restraints.stats import geometry_statistics
from ..restraints.topology import build_topology, check_h_distances
from ..rigid import RigidBodies
from ..targets import MapValueTarget, ModelMapTarget
from .geometry import shake_shifts
from .validate import check_fit, check_occupancy, check_resolution, check_sampling

log = logging.getLogger(__name__)

STRATEGY_WORDS = ("minimization_global", "individual_sites", "adp", "occupancy",
                  "resolution_annealing", "simulated_annealing", "rigid_body")
# Rigid bodies: L-BFGS iterations per stage, and the largest step of a parameter (radians
# of a rotation vector, Å of a translation).
RIGID_ITERATIONS = 30
RIGID_STEP = 0.3
# Resolution annealing: the coarse maps (Å) refined against before the run's own, those at
# least COARSEST_STEP_RATIO × its resolution, each with ANNEAL_WEIGHT × the weight scale.
RESOLUTION_STEPS = (6.0, 4.5)
# The automatic weight is moved each macro-cycle toward geometry at LIMIT_FILL × the limits,
# by at most FEEDBACK_STEP; models beyond the limits at the end get SETTLE_STEPS more tries.
LIMIT_FILL = 0.9
FEEDBACK_STEP = 2.0
SETTLE_STEPS = 3
COARSEST_STEP_RATIO = 1.2
ANNEAL_WEIGHT = 1.0
B_BOUNDS = (1.0, 500.0)
SITES_STEP = 0.3    # Å: the largest move of a site in one L-BFGS step
# Å: sites are refined preconditioned only where every model's bond rmsd is within this.
PC_BONDS = 0.03
# Å: regularisation holds each site to its start this loosely: bad local geometry is mended
# (2AXD, a start halfway between two models: bonds 0.0102 Å left after 100 iterations without
# it, 0.0065 with it), the model stays where it was.
REGULARIZE_TETHER = 0.3
ADP_SAMPLING = 0.7  # refined B keep B + blur >= this share of Refmac's 8pi²/1.1 spacing²
# The middle trial weight relative to the gradient-norm ratio, measured on EMD-2566 (3.2 Å):
# the chosen weight sits 2^6 below the raw ratio of restraint forces at 0.05 Å noise.
WEIGHT_SCALE = 2.0 ** -6
# A weight-search limit is at least this factor above the geometry restraints alone reach
# (EMD-2566, 3J6B chain 9 regularised: angles 0.56-0.61°, so 1.0° stands).
FLOOR_MARGIN = 1.5


# Ranges of the numeric settings: (low, high, unit, whole number).  Lengths are bounded so
# that a mistyped one is an error, not a grid of 10^18 points.
SETTING_RANGES = {
    "macro_cycles": (1, 1000, "", True),
    "nmodels": (1, 100000, "", True),
    "weight_trials": (1, 30, "", True),
    "weight_iterations": (1, 100000, "", True),
    "sites_iterations": (0, 100000, "", True),
    "adp_iterations": (0, 100000, "", True),
    "regularize_iterations": (0, 100000, "", True),
    "seed": (0, 2 ** 32 - 1, "", True),
    "annealing_steps": (1, 100000, "", True),
    "annealing_temperature": (0.0, 1000.0, "", False),
    "adp_weight": (1e-6, 1e9, "", False),
    "bond_limit": (1e-4, 1.0, "Å", False),
    "angle_limit": (1e-2, 90.0, "°", False),
    "shake": (0.0, 10.0, "Å", False),
    "mask_radius": (0.5, 20.0, "Å", False),
    "mask_edge": (0.0, 20.0, "Å", False),
    "cushion": (0.0, 50.0, "Å", False),
}


@dataclass
class RSRSettings:
    """Parameters of a real-space refinement run (phenix names where phenix has one)."""
    resolution: float = None
    # Resolution annealing on by default: on 2AXD it brought starts 0.6-1.4 Å off 0.05-0.25 Å
    # closer to the map's model, for ~1-2 s (bench/RESULTS.md, nineteenth session).
    strategy: str = "minimization_global+resolution_annealing+adp"
    adp: str = "individual"            # individual | group (one B per residue)
    macro_cycles: int = 5
    weight: object = None              # data weight for sites: a number, several (a grid:
                                       # each start refined with each), or None (automatic)
    target: str = "cc"                 # sites target: cc | map_value
    # 2AXD at 3 Å is iteration-limited (Cα 0.30 Å from model 5's map with 25 per cycle and
    # 40 per trial weight, 0.26 with these; bench/RESULTS.md, twentieth session).
    sites_iterations: int = 80         # L-BFGS iterations per macro-cycle
    adp_iterations: int = 25
    adp_weight: float = 200.0          # data weight for ADP against the ADP restraints
    bond_limit: float = 0.01           # Å: automatic weight keeps rmsd(bonds) at or below
    angle_limit: float = 1.0           # degrees: and rmsd(angles) at or below
    weight_trials: int = 6
    regularize_iterations: int = 100
    weight_iterations: int = 100       # per trial weight: a trial's geometry is read where
                                       # it has nearly converged (it falls as the fit does)
    nmodels: int = 1                   # copies of each starting model
    shake: float = 0.0                 # Å rms shift of each copy
    seed: int = 0                      # of the shifts and of simulated annealing's noise
    annealing_steps: int = 300         # simulated annealing: Langevin steps of each model
    annealing_temperature: float = 2.0  # its first kT (restraint units), falling to 0
    mask_radius: float = 3.0
    mask_edge: float = 2.0
    cushion: float = 5.0
    table: str = "electron"            # scattering factors: electron (cryo-EM) | xray
    monlib: str = None
    dictionaries: list = field(default_factory=list)
    ignore_unknown: bool = False
    h_distances: str = None            # X-H bond targets: electron (cloud) | nucleus; by
                                       # default nucleus with table=electron, as Servalcat
    precondition: bool = True          # sites refined in the variables of the restraints'
                                       # Laplacian (restraints/precondition.py)
    find_links: bool = True            # library links found from distances (disulfides, ...)
    apply_all_trans: bool = False      # every peptide restrained trans, whatever its omega

    def parsed_strategy(self):
        words = [w.strip() for w in str(self.strategy).replace(",", "+").split("+") if w.strip()]
        bad = [w for w in words if w not in STRATEGY_WORDS]
        if bad or not words:
            raise ParameterError(f"unknown strategy {'+'.join(bad) or self.strategy!r}; combine "
                                 f"{', '.join(STRATEGY_WORDS)} with '+'")
        return {"sites": bool({"minimization_global", "individual_sites"} & set(words)),
                "adp": "adp" in words, "occupancy": "occupancy" in words,
                "resolution_annealing": "resolution_annealing" in words,
                "simulated_annealing": "simulated_annealing" in words,
                "rigid_body": "rigid_body" in words}

    def weight_grid(self):
        """The given weights as a tuple (each start is refined with each); (None,) where the
        weight is automatic."""
        return self.weight if isinstance(self.weight, tuple) else (self.weight,)

    def check(self):
        self.resolution = check_resolution(self.resolution)
        self.parsed_strategy()
        if self.adp not in ("individual", "group"):
            raise ParameterError(f"adp must be individual or group, not {self.adp!r}")
        if self.table not in ("electron", "xray"):
            raise ParameterError(f"table must be electron or xray, not {self.table!r}")
        if self.h_distances is None:
            # A cryo-EM map's potential peaks at an H's nucleus: EMD-2566 with its H fits
            # better so (CCmask 0.8447 against 0.8416 at X-ray distances).
            self.h_distances = "nucleus" if self.table == "electron" else "electron"
        check_h_distances(self.h_distances)
        for name in ("find_links", "apply_all_trans", "precondition"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ParameterError(f"{name} must be true or false, not "
                                     f"{getattr(self, name)!r}")
        if self.target not in ("cc", "map_value"):
            raise ParameterError(f"target must be cc or map_value, not {self.target!r}")
        if self.weight is not None:
            self.weight = _weights(self.weight)
            if isinstance(self.weight, tuple) and not self.parsed_strategy()["sites"]:
                raise ParameterError("a weight grid weighs the map against the restraints of "
                                     "sites: the strategy must refine sites")
        for name, (low, high, unit, integer) in SETTING_RANGES.items():
            setattr(self, name, check_number(name, getattr(self, name), low, high, unit,
                                             integer))
        return self


def _weights(value):
    """A positive number, or a tuple of them (a grid), from a number, a sequence or text
    such as "5,10,20"."""
    items = value.split(",") if isinstance(value, str) else np.atleast_1d(value).tolist()
    try:
        w = [float(x) for x in items]
    except (TypeError, ValueError):
        raise ParameterError(f"weight must be a number or numbers separated by commas, not "
                             f"{value!r}") from None
    if not w or not all(x > 0 and np.isfinite(x) for x in w):
        raise ParameterError(f"weight must be positive, not {value!r}")
    w = [check_number("weight", x, 1e-9, 1e12) for x in w]
    return w[0] if len(w) == 1 else tuple(w)


def geometry_limits(resolution, bond_limit=0.01, angle_limit=1.0, floor=None):
    """Limits for the automatic weight: the given ones, tightened by 20 % beyond 4 Å, where the
    map holds the geometry less and the restraints should dominate.  ``floor`` (bonds, angles)
    is what the restraints alone reach (the regularised start); where a limit is within
    FLOOR_MARGIN of it (restraints in conflict, e.g. a ligand's or a library's own strain),
    the limit becomes FLOOR_MARGIN × floor, so that the map still gets a share."""
    f = 0.8 if resolution > 4.0 else 1.0
    limits = (bond_limit * f, angle_limit * f)
    if floor is None:
        return limits
    return tuple(max(lim, FLOOR_MARGIN * low) for lim, low in zip(limits, floor))


@dataclass
class RSRResult:
    batch: Batch                  # refined models
    stats: list                   # one dict per model
    weight: np.ndarray            # (B,) data weight used for sites
    best: int                     # index of the best model
    settings: RSRSettings
    weight_trials: list = field(default_factory=list)
    time: float = 0.0
    phases: dict = field(default_factory=dict)   # seconds per phase of the run


@dataclass
class WeightChoice:
    weight: float                 # the chosen data weight
    trials: list                  # {"weight", "rmsd_bonds", "rmsd_angles"} per trial run
    xyz: object                   # (N,3) model 1 refined with the chosen weight
    iterations: int               # L-BFGS iterations of that run


class _Groups:
    """Occupancy groups: one per (residue, altloc) of atoms with altlocs or an occupancy
    other than 1 (partial, or above 1 in a faulty file: the bounds bring it to 1 at most);
    the altloc groups of one residue are constrained to sum to 1 (occ_g = p_g / sum p).
    Atoms without altloc at occupancy 0 are marked absent (e.g. H that reduce could not
    place) and stay at 0 (``n_absent``)."""

    def __init__(self, model, xp):
        altlocs = [cra.atom.altloc for cra in model.structure[0].all()]
        keys, gid = {}, np.full(model.n_atoms, -1)
        self.n_absent = 0
        for i, (alt, occ, r) in enumerate(zip(altlocs, model.occ, model.residue_index)):
            if alt == "\0" and occ <= 0.0:
                self.n_absent += 1
            elif alt != "\0" or occ != 1.0:
                gid[i] = keys.setdefault((int(r), alt), len(keys))
        g = len(keys)
        residues = sorted({r for (r, alt) in keys if alt != "\0"})
        member = np.zeros((g, len(residues)))
        for (r, alt), k in keys.items():
            if alt != "\0":
                member[k, residues.index(r)] = 1.0
        self.n = g
        self.atoms = np.nonzero(gid >= 0)[0]
        self.group_of = gid[self.atoms]
        onehot = np.zeros((len(self.atoms), g))
        onehot[np.arange(len(self.atoms)), gid[self.atoms]] = 1.0
        self.xp = xp
        self.onehot = xp.asarray(onehot)
        self.member = xp.asarray(member)
        self.free = xp.asarray(member.sum(axis=1) == 0)
        start = np.zeros(g)
        np.add.at(start, gid[self.atoms], model.occ[self.atoms])
        start /= np.maximum(np.bincount(gid[self.atoms], minlength=g), 1)
        self.start = start
        self.lower = np.where(member.sum(axis=1) > 0, 0.02, 0.0)

    def _sums(self, p):
        xp = self.xp
        s = (p @ self.member) @ self.member.T
        return xp.where(self.free[None], 1.0, s)

    def occupancies(self, p):
        return p / self._sums(p)

    def gradient(self, p, g_atoms):
        """dT/dp from dT/d(occupancy) of the grouped atoms."""
        g = g_atoms @ self.onehot
        occ = self.occupancies(p)
        shared = ((g * occ) @ self.member) @ self.member.T
        return (g - shared) / self._sums(p)


class RealSpaceRefinement:
    """Set attributes (through ``settings``), then ``run()``.

    ``starts``: the starting models, a Batch of ``model``'s topology (as ``read_batch`` gives
    for a multi-model file); by default ``model`` itself.  The batch refined is each start
    in ``settings.nmodels`` copies (shaken where ``settings.shake`` > 0), each copy with
    each weight of a grid; the map box covers the atoms of every start, and each member is
    fitted inside the mask around its own start."""

    def __init__(self, model, map_data, settings, backend=None, dtype=np.float32, starts=None):
        self.settings = s = settings.check()
        self.strategy = s.parsed_strategy()
        if s.nmodels > 1 and s.shake == 0:
            log.warning("nmodels=%d without shake: the copies of each start are identical "
                        "and refine alike (give shake=RMS to vary them)", s.nmodels)
        check_sampling(s.resolution, map_data.spec)
        self.input_model = model
        if self.strategy["adp"] and model.is_aniso.any():
            # Isotropic B is refined; an anisotropic atom's density would not depend on it.
            log.info("ADP: %d anisotropic atoms made isotropic (B = B_eq)",
                     int(model.is_aniso.sum()))
            model = model.isotropic()
        self.model = model
        self.map_data = map_data
        self.backend = bk = get_backend(backend)
        self.dtype = np.dtype(dtype)
        self.starts = self._starts(starts)
        check_occupancy(self.starts.occ)
        self.topology = build_topology(model, monlib=s.monlib, dictionaries=s.dictionaries,
                                       ignore_unknown=s.ignore_unknown,
                                       h_distances=s.h_distances, find_links=s.find_links,
                                       apply_all_trans=s.apply_all_trans)
        problems = (self.topology.coincident(self.starts.xyz, "start")
                    + self.topology.stretched(self.starts.xyz, "start"))
        if problems:
            raise InputError(problems[0])
        self.restraints = GeometryRestraints(self.topology, backend=bk, dtype=self.dtype)
        self.adp_restraints = ADPRestraints(self.topology, backend=bk, dtype=self.dtype)
        self.preconditioner = None
        if self.strategy["sites"] and s.precondition:
            try:
                self.preconditioner = SitesPreconditioner(self.topology, bk)
            except ValueError as exc:
                log.warning("sites refined without preconditioning: %s", exc)
        self.prepared = prepare_map(map_data, self.starts.xyz, s.cushion, s.mask_radius,
                                    s.mask_edge)
        spacing = float(min(self.prepared.spec.voxel_size))
        # One blur for the whole run, so every evaluation sees the same function of B: where
        # the start's atoms need it (Refmac's rule).  Refined B may fall far below the start's
        # (from B 400 for every atom, EMD-2566 ended at CCmask 0.826 instead of 0.846, its
        # atoms sampled too coarsely): then every B the refinement may reach is kept sampled
        # to ADP_SAMPLING of that rule.
        blur = refmac_blur(spacing, min(lowest_b(np, self.starts), B_BOUNDS[1]))
        if self.strategy["adp"]:
            blur = max(blur, ADP_SAMPLING * refmac_blur(spacing, 0.0) - B_BOUNDS[0])
        self.cc_target = ModelMapTarget(self.prepared, s.resolution, backend=bk,
                                        settings=DensitySettings(table=s.table, blur=blur,
                                                                 cutoff=1e-4))
        self.sites_target = (self.cc_target if s.target == "cc"
                             else MapValueTarget(self.prepared, model, backend=bk))
        self.groups = _Groups(model, bk.xp) if self.strategy["occupancy"] else None
        grp = self.groups
        if grp is not None and grp.n_absent:
            log.info("occupancy: %d atoms at occupancy 0 (no altloc) are kept at 0",
                     grp.n_absent)
        if grp is not None and grp.n == 0:
            log.info("strategy includes occupancy but no atom has an altloc or partial occupancy")
        elif grp is not None:
            n_alt = int(grp.member.shape[1])
            log.info("occupancy: %d atoms in %d group(s)%s", len(grp.atoms), grp.n,
                     f"; the altloc conformers of {n_alt} residue(s) sum to 1"
                     if n_alt else " (partially occupied, no altlocs)")
        # Atoms of a start outside the map have no data for their B and occupancy: the CC
        # target would only shrink the tails they send into the box (EMD-2566 cut in half:
        # atoms 2-10 Å beyond the cut went from B ~140 to 1).  They keep them.
        self.outside = ~map_data.spec.contains(self.starts.xyz)   # (starts, atoms)
        self.b_index, self.b_owner = self._b_parameters()
        if self.strategy["adp"]:
            if s.adp == "group":
                what = f"one isotropic B per residue ({len(model.residues)} residues)"
            else:
                riding = 0 if self.b_owner is None else model.n_atoms - len(self.b_owner)
                what = f"individual isotropic B ({model.n_atoms - riding} atoms)"
                if riding:
                    what += f"; {riding} hydrogens ride on the B of the atom they are bonded to"
            log.info("ADP: %s", what)
        kept_what = [name for key, name in (("adp", "B"), ("occupancy", "occupancy"))
                     if self.strategy[key]]
        if self.outside.any() and kept_what:
            log.warning("%d atom(s) outside the map keep their %s (no data to refine them "
                        "against)", int(self.outside.any(axis=0).sum()), " and ".join(kept_what))

    def _b_parameters(self):
        """(the B parameter of each atom, the atom whose B each parameter starts from, or
        None to start from the mean B of its atoms); (None, None) where every atom has its
        own.  adp=group: one per residue.  adp=individual: one per atom, but a hydrogen rides
        on the B of the atom it is bonded to, as Servalcat keeps it: the map hardly sees an
        H's B (EMD-2566 with its H free: 223 of its 1437 H went to the lower bound)."""
        if self.settings.adp == "group":
            return np.asarray(self.model.residue_index), None
        atoms = np.arange(self.model.n_atoms)
        parent = self.topology.hydrogen_parents()
        if (parent < 0).all():
            return None, None
        owner, index = np.unique(np.where(parent >= 0, parent, atoms), return_inverse=True)
        return index, owner

    # -- one parameter class at a time ------------------------------------------------------
    def _view(self, batch, xyz=None, b=None, occ=None):
        return Batch(batch.model, batch.xyz if xyz is None else xyz,
                     batch.b if b is None else b, batch.occ if occ is None else occ,
                     batch.u, backend=self.backend, mask_index=batch.mask_index)

    def _sites_objective(self, batch, weight, target=None):
        """fg(x) of the flattened sites (B, 3N) of ``batch``: T_restraints + ``weight`` × the
        map target (the run's, or ``target``: a coarse stage's), and its gradient."""
        xp = self.backend.xp
        shape = batch.xyz.shape
        w = xp.asarray(weight, dtype=xp.float64)
        target, restraints = target or self.sites_target, self.restraints
        with_data = bool((w != 0).any())

        def fg(x):
            xyz = x.reshape(shape)
            fr, gr = restraints.energy_and_gradient(xyz)
            if with_data:
                fd, gd = target.value_and_gradient(self._view(batch, xyz=xyz), ("xyz",), w)
                fr += fd
                gr += gd.xyz
            return fr, gr.reshape(shape[0], -1)
        return fg

    def regularize(self, batch, iterations):
        """Restraints alone, each site held to its start (REGULARIZE_TETHER), in x: the
        preconditioned variables would carry the whole model along the restraints' soft
        directions (2AXD model 1: Cα 0.94 -> 1.16 Å from the map's model in 100
        iterations) and mend a badly distorted start slowly (a start halfway between two
        NMR models, bonds 0.28 Å: 0.14 Å after 100 iterations, 0.0065 Å so)."""
        x0 = batch.xyz.reshape(batch.size, -1)
        fg = _tethered(self._sites_objective(batch, np.zeros(batch.size)), x0.copy(),
                       REGULARIZE_TETHER)
        return self._minimize_sites(batch, (fg, x0, None), iterations, SITES_STEP)

    def refine_sites(self, batch, weight, iterations, target=None):
        """L-BFGS of the sites of ``batch`` (``_sites_objective``), in the preconditioned
        variables where the run has them."""
        fg = self._sites_objective(batch, weight, target)
        x0 = batch.xyz.reshape(batch.size, -1)
        pc = self.preconditioner
        target = target or self.sites_target
        if pc is None or max(g["rmsd_bonds"] for g in self.geometry(batch)) > PC_BONDS:
            # The Laplacian models the restraints near their ideal geometry only: from a
            # start shaken 1 Å (bonds ~0.5 Å off) it ends 1.1 Å from the model, 0.05 in x.
            return self._minimize_sites(batch, (fg, x0, None), iterations, SITES_STEP, target)
        # z's smallest curvature is pc's shift: a step of SITES_STEP √shift in z moves no
        # atom much farther than SITES_STEP Å.
        return self._minimize_sites(batch, pc.wrap(fg, x0.copy()), iterations,
                                    SITES_STEP * pc.shift_value ** 0.5, target)

    def _minimize_sites(self, batch, problem, iterations, max_step, target=None):
        """L-BFGS of ``problem`` = (fg of the parameters, their start, their map to the sites
        (B, 3N); None where the parameters are the sites), the result written to batch.xyz.
        ``target``: the map target in fg, which B does not change for."""
        fg, p0, x_of = problem
        with (target.fixed_b(batch) if target is not None else contextlib.nullcontext(),
              self.restraints.deferred_pair_checks() as recheck):
            res = minimize_lbfgs(fg, p0, _lbfgs(iterations, max_step=max_step),
                                 backend=self.backend, recheck=recheck)
        batch.xyz[...] = (res.x if x_of is None else x_of(res.x)).reshape(batch.xyz.shape)
        return res

    def _b_map(self):
        """(to atom B, gradient back to parameters) for the parameters of ``_b_parameters``;
        None where every atom has its own."""
        if self.b_index is None:
            return None
        xp = self.backend.xp
        index = xp.asarray(self.b_index)
        order = xp.asarray(np.argsort(self.b_index, kind="stable"))
        ends = xp.asarray(np.cumsum(np.bincount(self.b_index)) - 1)

        def back(g):
            # Sums over each parameter's atoms: cumulative sums of the atoms in parameter order.
            c = xp.cumsum(g[:, order].astype(xp.float64), axis=1)[:, ends]
            seg = xp.concatenate([c[:, :1], c[:, 1:] - c[:, :-1]], axis=1)
            return seg.astype(g.dtype)
        return (lambda p: p[:, index]), back

    def refine_adp(self, batch, iterations):
        xp = self.backend.xp
        mapping = self._b_map()
        adp_w = self.settings.adp_weight
        target, adp = self.cc_target, self.adp_restraints
        held = self.outside[batch.mask_index]
        if mapping is None:
            to_atoms, back, p0 = (lambda p: p), (lambda g: g), batch.b
        else:
            to_atoms, back = mapping
            index, n = self.b_index, int(self.b_index.max()) + 1
            b = self.backend.to_numpy(batch.b).astype(np.float64)
            if self.b_owner is None:   # each residue starts at its atoms' mean B
                counts = np.bincount(index, minlength=n)
                p0 = np.stack([np.bincount(index, weights=bi, minlength=n) for bi in b])
                p0 /= np.maximum(counts, 1)
            else:   # hydrogens start at the B of the atom they ride on
                p0 = b[:, self.b_owner]
            p0 = xp.asarray(p0, dtype=batch.dtype)
            held = _all_of(held, index, n)   # a parameter is kept where all its atoms are outside
        hold = xp.asarray(held) if held.any() else None
        restrained = self.settings.adp == "individual"
        weight = xp.full(batch.size, float(adp_w))

        def fg(p):
            b = to_atoms(p)
            f, gd = target.value_and_gradient(self._view(batch, b=b), ("b",), weight)
            g = gd.b
            if restrained:
                fr, gr = adp.b_energy_and_gradient(b)
                f += fr
                g += gr
            g = back(g)
            # Zero in every step, so the L-BFGS history never moves a kept B.
            return f, g if hold is None else xp.where(hold, 0, g)

        with target.fixed_blur(batch, B_BOUNDS[1]):
            res = minimize_lbfgs(fg, p0, _lbfgs(iterations, max_step=20.0),
                                 lower=B_BOUNDS[0], upper=B_BOUNDS[1], backend=self.backend)
        batch.b[...] = to_atoms(res.x)
        return res

    def refine_occupancy(self, batch, iterations):
        grp = self.groups
        if grp is None or grp.n == 0:
            return None
        xp = self.backend.xp
        atoms = xp.asarray(grp.atoms)
        p0 = xp.asarray(np.broadcast_to(grp.start, (batch.size, grp.n)), dtype=xp.float64)
        held = _all_of(self.outside[batch.mask_index][:, grp.atoms], grp.group_of, grp.n)
        hold = xp.asarray(held) if held.any() else None

        def occ_of(p):
            occ = batch.occ.copy()
            occ[:, atoms] = (grp.occupancies(p) @ grp.onehot.T).astype(batch.dtype)
            return occ

        def fg(p):
            fd, gd = self.cc_target.value_and_gradient(self._view(batch, occ=occ_of(p)), ("occ",))
            g = grp.gradient(p, gd.occ[:, atoms].astype(xp.float64))
            return fd, g if hold is None else xp.where(hold, 0, g)

        with self.cc_target.fixed_b(batch):
            res = minimize_lbfgs(fg, p0, _lbfgs(iterations, max_step=0.2),
                                 lower=xp.asarray(grp.lower), upper=1.0, backend=self.backend)
        batch.occ[...] = occ_of(res.x)
        return res

    # -- weights and statistics -------------------------------------------------------------
    def geometry(self, batch):
        return geometry_statistics(self.restraints, batch.xyz, max_outliers=0)

    def search_weight(self, start, limits=None):
        """Trial weights from model 1 of ``start``; returns a WeightChoice.  ``limits`` (bonds
        Å, angles °): those of ``geometry_limits`` by default.

        Trial k has weight scale × 2^(k - n/2) (``_weight_scale``).  On a GPU every trial is a
        batch member: k = 0 … n-1 run at once, and where every trial was acceptable, or none,
        the scale was off for this map and the next n beyond that end run too.  On a CPU each
        member costs as much as a model of its own: geometry worsens as the weight grows, so the
        trials go one at a time from the middle one (k = n/2, where the scale puts the limit)
        towards the limit, to at most n beyond either end (``_next_trial``: steps as long as
        the geometry's trend predicts, at most three).  A bracketed limit then gets one trial
        between its two ends, a factor √2 from each.
        """
        s = self.settings
        n = s.weight_trials
        scale = self._weight_scale(start)
        bond_lim, angle_lim = limits or geometry_limits(s.resolution, s.bond_limit,
                                                        s.angle_limit)
        results, refined = {}, {}

        def acceptable(k):
            return bool(_excess([results[k]], (bond_lim, angle_lim))[0] <= 1.0)

        def excess(k):
            """log of the geometry over its limits (the larger of bonds and angles): ≤ 0
            exactly where the trial is acceptable, infinite where it is not a number."""
            e = float(np.log(max(_excess([results[k]], (bond_lim, angle_lim))[0], 1e-12)))
            if acceptable(k):
                return min(e, 0.0)
            return max(e, 1e-12) if np.isfinite(e) else np.inf

        def run(ks):
            # Each trial is logged as it ends: on a CPU and a large model a trial takes minutes.
            t0 = time.perf_counter()
            ks = list(ks)
            weights = scale * 2.0 ** (np.asarray(ks, dtype=np.float64) - n // 2)
            trial = start.subset([0] * len(ks))
            res = self.refine_sites(trial, weights, s.weight_iterations)
            for j, (k, g) in enumerate(zip(ks, self.geometry(trial))):
                results[k] = {"weight": float(weights[j]), "rmsd_bonds": g["rmsd_bonds"],
                              "rmsd_angles": g["rmsd_angles"]}
                refined[k] = (trial.xyz[j].copy(), int(res.iterations[j]))
            took = time.perf_counter() - t0
            for k in ks:
                t = results[k]
                log.info("  weight %10.4g: bonds %.4f Å, angles %.2f° (%s; %.1f s)", t["weight"],
                         t["rmsd_bonds"], t["rmsd_angles"],
                         "within the limits" if acceptable(k) else "beyond the limits", took)

        if self.backend.is_gpu:
            run(range(n))
            ok = [k for k in results if acceptable(k)]
            if len(ok) == n:
                run(range(n, 2 * n))
            elif not ok:
                run(range(-n, 0))
        else:
            k = n // 2
            while k is not None:
                run([k])
                k = _next_trial({j: excess(j) for j in results}, -n, 2 * n - 1)
        ok = [k for k in results if acceptable(k)]
        best = max(ok) if ok else min(results)
        if ok and best + 1 in results:
            # Bracketed: one more trial halfway (a factor √2), as a factor 2 step may stop
            # well inside the limits.
            run([best + 0.5])
            best = best + 0.5 if acceptable(best + 0.5) else best
        trials = [results[k] for k in sorted(results)]
        if not ok:
            log.warning("no trial weight kept bonds <= %.3f Å and angles <= %.2f°; using the "
                        "smallest", bond_lim, angle_lim)
        elif best == max(results):
            log.warning("every trial weight up to %.4g kept the geometry within the limits; "
                        "using that one", results[best]["weight"])
        xyz, iterations = refined[best]
        return WeightChoice(results[best]["weight"], trials, xyz, iterations)

    def simulated_annealing(self, batch, weight):
        """Langevin dynamics of every model on restraints + ``weight`` × the map target, kT
        falling from annealing_temperature to 0 (``dynamics.langevin``): each model its own
        trajectory, seeded by (seed, its index), so a run replays and copies of one start
        explore apart.  The mobility keeps the stiffest bond stable (a quarter of its
        sigma², Euler's limit being 1/curvature = sigma²/2)."""
        s = self.settings
        shape = batch.xyz.shape
        sigma = self.topology.bonds.sigma
        sigma = float(sigma[sigma > 0].min()) if (sigma > 0).any() else 0.02
        settings = LangevinSettings(steps=s.annealing_steps, t_start=s.annealing_temperature,
                                    t_end=0.0, mobility=0.25 * sigma**2, seed=s.seed)
        res = langevin(self._sites_objective(batch, weight), batch.xyz.reshape(shape[0], -1),
                       settings, self.backend.xp)
        batch.xyz[...] = res.x.reshape(shape)
        return res

    def refine_rigid_bodies(self, batch):
        """Each chain moved as one body (``rigid.RigidBodies``) against the map cut to the
        coarsest of RESOLUTION_STEPS that is coarser than the run's resolution, then against
        the run's own: a start placed off its density as a whole.  Returns the stages run,
        [(d, number of groups)]."""
        s = self.settings
        xp = self.backend.xp
        chains = np.unique([self.model.residues[r][0] for r in self.model.residue_index],
                           return_inverse=True)[1]
        coarse = [d for d in RESOLUTION_STEPS if d >= COARSEST_STEP_RATIO * s.resolution][:1]
        done = []
        for d in coarse + [s.resolution]:
            target = (self.sites_target if d == s.resolution else
                      ModelMapTarget(low_pass(self.prepared, d), d, backend=self.backend,
                                     settings=self.cc_target.settings))
            weight = np.full(batch.size, self._weight_scale(batch, target))
            bodies = RigidBodies(chains, batch.xyz, xp)
            self._minimize_sites(batch, bodies.wrap(self._sites_objective(batch, weight, target),
                                                    batch.xyz.dtype),
                                 RIGID_ITERATIONS, RIGID_STEP, target)
            done.append((d, bodies.n_groups))
        return done

    def anneal_resolution(self, batch):
        """Resolution annealing: sites refined against the map cut to each of
        RESOLUTION_STEPS coarser than the run's resolution in turn, so that broad features
        pull a displaced model first (their gradients reach farther than the fine map's).
        Returns the stages run, [(d, weight)]."""
        s = self.settings
        done = []
        for d in (d for d in RESOLUTION_STEPS if d >= COARSEST_STEP_RATIO * s.resolution):
            target = ModelMapTarget(low_pass(self.prepared, d), d, backend=self.backend,
                                    settings=self.cc_target.settings)
            weight = ANNEAL_WEIGHT * self._weight_scale(batch, target)
            self.refine_sites(batch, np.full(batch.size, weight), s.sites_iterations, target)
            done.append((d, weight))
        return done

    def _weight_scale(self, batch, target=None):
        """The middle trial weight: WEIGHT_SCALE × the ratio of restraint gradient norm (the
        start plus 0.05 Å noise) to data gradient norm (the start), so the trials follow the
        map's scale and the model's size."""
        xp = self.backend.xp
        probe = batch.subset([0])
        _, gd = (target or self.sites_target).value_and_gradient(probe, ("xyz",))
        gd = float(xp.sqrt((gd.xyz.astype(xp.float64) ** 2).sum()))
        _, gr = self.restraints.energy_and_gradient(probe.xyz + xp.asarray(
            np.random.default_rng(0).normal(scale=0.05, size=probe.xyz.shape), dtype=self.dtype))
        gr = float(xp.sqrt((gr.astype(xp.float64) ** 2).sum()))
        return WEIGHT_SCALE * gr / max(gd, 1e-30)

    def map_statistics(self, batch, chunk=16):
        """CCmask and CCbox (as cctbx map_model_cc) against the input map, per model; on a
        map much larger than the models, with model maps made in a box around them."""
        bk = self.backend
        xp = bk.xp
        spec = self.map_data.spec
        box, region = model_box(spec, bk.to_numpy(batch.xyz)), None
        if box is not None:
            region = box_slices(spec, *box)[0]
            spec = box_spec(spec, *box)
        mapper = ModelMapper(spec, self.settings.resolution,
                             DensitySettings(table=self.settings.table), backend=bk)
        exp_map = bk.asarray(self.map_data.data)

        def ccs(sub):
            masks = xp.asarray(molecular_masks(self.model, bk.to_numpy(sub.xyz), spec))
            return mask_and_box_cc(xp, exp_map, mapper.image(sub), masks, region)
        parts, _ = map_in_chunks(bk, batch, ccs, chunk)
        return {k: np.concatenate([p[k] for p in parts]) for k in ("cc_mask", "cc_box")}

    # -- the run ----------------------------------------------------------------------------
    def _starts(self, batch):
        """The starting models as a NumPy float64 Batch of this job's model (isotropic where
        ADP are refined)."""
        if batch is None:
            return Batch.from_model(self.model, 1, backend="numpy", dtype=np.float64)
        if batch.model is not self.model and batch.model is not self.input_model:
            raise InputError("the starting models must be of the given model's topology")
        bk = batch.backend
        xyz, b, occ = (bk.to_numpy(a).astype(np.float64) for a in (batch.xyz, batch.b, batch.occ))
        u = None if batch.u is None else bk.to_numpy(batch.u).astype(np.float64)
        if batch.model is not self.model:       # the job's model was made isotropic
            if u is not None:
                b = np.where(self.input_model.is_aniso, b_equivalent(u), b)
            u = None
        return Batch(self.model, xyz, b, occ, u, backend="numpy")

    def members(self):
        """(start, weight) of each batch member: every start in ``nmodels`` copies, each copy
        with each weight of a grid (None where no weight is given); starts are numbered from
        1 over the copies."""
        s = self.settings
        return [(k + 1, w) for k in range(self.starts.size * s.nmodels)
                for w in s.weight_grid()]

    def copy_batch(self):
        """Each start in ``nmodels`` copies (shaken where ``shake`` > 0), in the run's dtype
        and on its backend; each copy fitted inside its start's mask."""
        s = self.settings
        st = self.starts
        source = np.repeat(np.arange(st.size), s.nmodels)           # the start of each copy
        xyz = st.xyz[source]
        if s.shake > 0:
            xyz = xyz + shake_shifts(len(source), self.model.n_atoms, s.shake, s.seed)
        take = (lambda a: None if a is None else a[source].astype(self.dtype))
        return Batch(self.model, xyz.astype(self.dtype), take(st.b), take(st.occ), take(st.u),
                     backend=self.backend, mask_index=source)

    def _each_weight(self, n_copies):
        """Indices taking each copy once per weight of a grid (the members' order)."""
        return np.repeat(np.arange(n_copies), len(self.settings.weight_grid())).tolist()

    def start_batch(self):
        """The batch as it starts: each copy once per weight of a grid (``members``)."""
        copies = self.copy_batch()
        return copies.subset(self._each_weight(copies.size))

    def run(self, progress=None):
        s = self.settings
        t0 = time.perf_counter()
        phases = _Phases()
        members = self.members()
        xp = self.backend.xp
        grid = len(s.weight_grid())
        # The members of one copy (its weights) start alike: the start is prepared per copy.
        copies = self.copy_batch()
        n = copies.size * grid
        cc_start = np.repeat(self.map_statistics(copies)["cc_mask"], grid)
        check_fit(cc_start, refuse=True)
        phases.lap("statistics")
        n_starts = members[-1][0]
        log.info("%d model(s)%s, %d atoms; start CCmask %s", n,
                 f" ({n_starts} start(s) x {grid} weights)" if grid > 1 else "",
                 self.model.n_atoms, _range(cc_start))
        iterations = np.zeros(copies.size, dtype=int)
        floor, done = None, []
        if self.strategy["sites"] and s.regularize_iterations > 0:
            # Shaken or rough starts: fix the local geometry first (restraints only, cheap).
            res = self.regularize(copies, s.regularize_iterations)
            iterations += res.iterations
            geo = self.geometry(copies)
            floor = (geo[0]["rmsd_bonds"], geo[0]["rmsd_angles"])
            done.append(f"regularised: bonds {_range([g['rmsd_bonds'] for g in geo])} Å, "
                        f"angles {_range([g['rmsd_angles'] for g in geo], '.2f')}°")
        if self.strategy["rigid_body"]:
            stages = self.refine_rigid_bodies(copies)
            done.append(f"{stages[0][1]} rigid bod{'y' if stages[0][1] == 1 else 'ies'} "
                        "(chains) refined at " + ", ".join(f"{d:g}" for d, _ in stages) + " Å")
        if self.strategy["sites"] and self.strategy["resolution_annealing"]:
            stages = self.anneal_resolution(copies)
            if stages:
                done.append("sites annealed at " + ", ".join(
                    f"{d:g} Å (weight {w:.3g})" for d, w in stages))
        if self.strategy["adp"]:
            # After the coarse stages, not before: B refined at a displaced start swell where
            # the atoms are off, and their map gradient fades (2AXD map 8: Cα 0.28 Å after
            # 200 sites iterations from such B, 0.07 Å from the start's).
            iterations += self.refine_adp(copies, s.adp_iterations).iterations
            done.append("B refined")
        batch = copies.subset(self._each_weight(copies.size))
        iterations = np.repeat(iterations, grid)
        log.info("start prepared (%s) in %.1f s", "; ".join(done) or "as given",
                 phases.lap("start"))
        limits = geometry_limits(s.resolution, s.bond_limit, s.angle_limit, floor)
        trials, sites_done = [], 0
        if not self.strategy["sites"]:
            weight = np.zeros(n)
        elif s.weight is not None:
            weight = np.asarray([w for _, w in members], dtype=np.float64)
        elif not any(self.topology.counts().values()):
            # Nothing for a weight to balance the map against: the search would weigh it 0.
            log.warning("the model has no bonded atoms to restrain (e.g. a CA-only trace): "
                        "sites are refined against the map alone (weight 1)")
            weight = np.ones(n)
        else:
            log.info("automatic weight: %d trial weights a factor 2 apart, %s, %d iterations "
                     "each", s.weight_trials,
                     "side by side" if self.backend.is_gpu
                     else "one at a time from the middle, as the geometry trends",
                     s.weight_iterations)
            if limits != geometry_limits(s.resolution, s.bond_limit, s.angle_limit):
                log.info("restraints alone reach bonds %.4f Å, angles %.2f° (model 1): the "
                         "weight search allows %.4f Å, %.2f° (%.1f × that where the limits "
                         "are closer)", *floor, *limits, FLOOR_MARGIN)
            choice = self.search_weight(batch, limits)
            trials = choice.trials
            weight = np.full(n, choice.weight)
            # The chosen trial refined model 1 from this very start with this weight: it is
            # that model's first sites step (with more iterations) and is not repeated.
            batch.xyz[0] = choice.xyz
            iterations[0] += choice.iterations
            sites_done = 1
            log.info("weight %.4g chosen (of %d trials) in %.1f s", choice.weight,
                     len(trials), phases.lap("weight"))
        phases.lap("weight")
        if self.strategy["sites"] and self.strategy["simulated_annealing"]:
            self.simulated_annealing(batch, weight)
            log.info("simulated annealing: %d Langevin steps, kT %.3g -> 0, in %.1f s",
                     s.annealing_steps, s.annealing_temperature, phases.lap("annealing"))
        # The automatic weight follows each model's geometry from cycle to cycle: trials of
        # a few iterations from the start end far inside the limits that the final model
        # reaches (2AXD at 3 Å: bonds 0.003 Å against 0.010).
        adjust = bool(trials) and self.strategy["sites"]
        w_dev = xp.asarray(weight)
        for cycle in range(1, s.macro_cycles + 1):
            tc = time.perf_counter()
            first = sites_done if cycle == 1 else 0
            if self.strategy["sites"] and first < n:
                rest = batch.subset(slice(first, n))
                res = self.refine_sites(rest, w_dev[first:], s.sites_iterations)
                batch.xyz[first:] = rest.xyz
                iterations[first:] += res.iterations
            if self.strategy["adp"]:
                iterations += self.refine_adp(batch, s.adp_iterations).iterations
            if self.strategy["occupancy"]:
                res = self.refine_occupancy(batch, s.adp_iterations)
                if res is not None:
                    iterations += res.iterations
            geo = self.geometry(batch)
            cc = self.backend.to_numpy(self.cc_target.stats(batch)["cc_target"])
            line = (f"macro-cycle {cycle}/{s.macro_cycles}: CC(target) {_range(cc)}, bonds "
                    f"{_range([g['rmsd_bonds'] for g in geo], '.4f')} Å, angles "
                    f"{_range([g['rmsd_angles'] for g in geo], '.2f')}°, "
                    f"{time.perf_counter() - tc:.1f} s")
            log.info(line)
            if progress:
                progress(cycle, line)
            if adjust and cycle < s.macro_cycles:
                weight = weight * _weight_feedback(geo, limits)
                w_dev = xp.asarray(weight)
        if adjust:
            # The final models must lie within the limits: those beyond go back a step with
            # their weight lowered as far as their excess asks.
            for _ in range(SETTLE_STEPS):
                geo = self.geometry(batch)
                over = np.flatnonzero(_excess(geo, limits) > 1.0)
                if not len(over):
                    break
                weight[over] = weight[over] * _weight_feedback([geo[i] for i in over], limits)
                sub = batch.subset(over.tolist())
                res = self.refine_sites(sub, weight[over], s.sites_iterations)
                batch.xyz[over.tolist()] = sub.xyz
                iterations[over] += res.iterations
            geo = self.geometry(batch)
            log.info("weight after feedback toward %.0f %% of the limits (bonds %.4f Å, angles "
                     "%.2f°): %s; final bonds %s Å, angles %s°", 100 * LIMIT_FILL, *limits,
                     _range(weight, ".4g"), _range([g["rmsd_bonds"] for g in geo], ".4f"),
                     _range([g["rmsd_angles"] for g in geo], ".2f"))
        phases.lap("macro-cycles")
        final = self.map_statistics(batch)
        geo = self.geometry(batch)
        phases.lap("statistics")
        elapsed = time.perf_counter() - t0
        b_np = self.backend.to_numpy(batch.b)
        stats = []
        for i in range(n):
            stats.append({"model": i + 1, "start": members[i][0],
                          "cc_mask_start": round(float(cc_start[i]), 4),
                          "cc_mask_final": round(float(final["cc_mask"][i]), 4),
                          "cc_box_final": round(float(final["cc_box"][i]), 4),
                          "rmsd_bonds": round(geo[i]["rmsd_bonds"], 5),
                          "rmsd_angles": round(geo[i]["rmsd_angles"], 3),
                          "rmsz_bonds": round(geo[i]["rmsz_bonds"], 3),
                          "rmsz_angles": round(geo[i]["rmsz_angles"], 3),
                          "n_overlaps": geo[i].get("n_overlaps", 0),
                          "mean_b": round(float(b_np[i].mean()), 2),
                          "min_b": round(float(b_np[i].min()), 2),
                          "max_b": round(float(b_np[i].max()), 2),
                          "n_b_at_bounds": int(((b_np[i] <= B_BOUNDS[0])
                                                | (b_np[i] >= B_BOUNDS[1])).sum()),
                          "weight": float(weight[i]), "iterations": int(iterations[i]),
                          "time": round(elapsed / n, 3)})
        best = _best(stats, 1.5 * limits[0], 1.5 * limits[1])
        log.info("final CCmask %s; best model %d (CCmask %.4f, bonds %.4f Å, angles %.2f°); "
                 "%.1f s", _range(final["cc_mask"]), best + 1, stats[best]["cc_mask_final"],
                 stats[best]["rmsd_bonds"], stats[best]["rmsd_angles"], elapsed)
        if self.strategy["adp"]:
            # B held at a bound say that the map asks for more (a sharpened map, B below 1)
            # or less than the bounds allow.
            t = stats[best]
            log.info("B of model %d: mean %.1f, min %.1f, max %.1f Å²; %d atom(s) at the "
                     "bounds %g-%g Å²", best + 1, t["mean_b"], t["min_b"], t["max_b"],
                     t["n_b_at_bounds"], *B_BOUNDS)
        log.info("time: %s", ", ".join(f"{k} {v:.1f} s" for k, v in phases.seconds.items()))
        return RSRResult(batch=batch, stats=stats, weight=weight, best=best, settings=s,
                         weight_trials=trials, time=elapsed, phases=dict(phases.seconds))


class _Phases:
    """Wall seconds per phase of a run, each lap added to its phase's total."""

    def __init__(self):
        self.seconds = {}
        self._last = time.perf_counter()

    def lap(self, name):
        """Add the time since the last lap to ``name``; returns that time."""
        now = time.perf_counter()
        spent, self._last = now - self._last, now
        self.seconds[name] = self.seconds.get(name, 0.0) + spent
        return spent


# Geometry rmsd grows by about 1.1-1.8 × per factor 2 of weight (EMD-2566, simulated maps of
# 4hg7, 1l2h, 4iid): the steepest stands for the trend until two trials have measured a
# growth, so that a step never passes a limit that a power law of up to 1.8 would put nearer.
PRIOR_GROWTH = 1.8
MAX_JUMP = 3


def _next_trial(excess, first, last):
    """The CPU weight search's next trial k (an integer in [first, last]) from the trials so
    far, {k: log of the geometry over its limits} (≤ 0 within them), or None once the limit
    is bracketed by neighbours (or lies beyond ``first`` / ``last``).

    log excess is taken as linear in k (the rmsd as a power of the weight): beyond the trials
    on one side of the limit the next one is where the trend of the two nearest puts the limit
    (PRIOR_GROWTH with one trial, or where they do not grow), at least one step and at most
    MAX_JUMP; between a passing and a failing trial, where the line through them crosses
    zero.  The step lands on the passing side of the predicted limit, so that one step more
    usually brackets it."""
    ks = sorted(k for k in excess if float(k).is_integer())
    passed = [k for k in ks if excess[k] <= 0]
    lo = max(passed) if passed else None
    above = [k for k in ks if excess[k] > 0 and (lo is None or k > lo)]
    hi = min(above) if above else None
    if lo is not None and hi is not None:
        if hi - lo <= 1:
            return None
        t = -excess[lo] / (excess[hi] - excess[lo])
        return int(np.clip(np.floor(lo + t * (hi - lo)), lo + 1, hi - 1))
    end = lo if hi is None else hi
    # The trial nearest to ``end`` on the same side of the limit, for the trend.
    side = [k for k in ks if (k < end if hi is None else k > end)]
    slope = np.log(PRIOR_GROWTH)
    if side:
        near = max(side) if hi is None else min(side)
        measured = (excess[end] - excess[near]) / (end - near)
        slope = measured if measured > 0 else slope
    distance = abs(excess[end]) / slope
    if hi is None:          # every trial within the limits so far: up
        if end >= last:
            return None
        return min(end + int(np.clip(np.floor(distance), 1, MAX_JUMP)), last)
    if end <= first:        # every trial beyond them: down
        return None
    return max(end - int(np.clip(np.ceil(distance), 1, MAX_JUMP)), first)


def _excess(geo, limits):
    """(B,) the larger of bonds / bond limit and angles / angle limit of each model (NaN
    where either is not a number)."""
    bonds = np.array([g["rmsd_bonds"] for g in geo], dtype=np.float64)
    angles = np.array([g["rmsd_angles"] for g in geo], dtype=np.float64)
    return np.maximum(bonds / limits[0], angles / limits[1])


def _weight_feedback(geo, limits):
    """(B,) factors on each model's weight toward geometry at LIMIT_FILL × the limits: the
    ratio itself, at most a factor FEEDBACK_STEP a cycle either way.  Damped: the geometry
    after a macro-cycle's few iterations swings with the state of the minimisation (2AXD at
    3 Å: angles 0.95, 0.54, 1.18, 0.59° in four cycles of one weight's square-law update)."""
    e = np.maximum(_excess(geo, limits), 1e-6)
    return np.clip(LIMIT_FILL / e, 1.0 / FEEDBACK_STEP, FEEDBACK_STEP)


def _tethered(fg, x0, sigma):
    """fg plus sum |x - x0|² / sigma² over the sites."""
    k = 1.0 / sigma ** 2

    def fg_tethered(x):
        f, g = fg(x)
        d = (x - x0).astype(g.dtype)
        return f + k * (d.astype(f.dtype) ** 2).sum(axis=1), g + 2 * k * d
    return fg_tethered


def _all_of(flags, index, n):
    """(B, n): parameters all of whose atoms are flagged, from ``flags`` (B, atoms) and the
    parameter ``index`` of each atom."""
    free = np.stack([np.bincount(index, weights=~f, minlength=n) for f in flags])
    return free == 0


def _lbfgs(iterations, max_step):
    """At most ``iterations``; a model stops earlier once T falls by less than 1e-5 of itself
    twice in a row (T is a sum over thousands of atoms, ~1e4-1e5: the CC then changes by
    ~1e-6 per iteration).  No gradient test: relative to |T| it would stop far too early.
    1e-4 was measured too and left B unconverged on EMD-2566 (bench/RESULTS.md)."""
    return LBFGSSettings(max_iterations=iterations, max_step=max_step, gtol=1e-12, ftol=1e-5)


def _range(values, fmt=".4f"):
    v = np.asarray(values, dtype=np.float64)
    if v.size == 1:
        return format(float(v[0]), fmt)
    return f"{v.mean():{fmt}} (min {v.min():{fmt}}, max {v.max():{fmt}})"


def _best(stats, bond_limit, angle_limit):
    """Highest CCmask among models within the geometry limits (else highest CCmask)."""
    ok = [i for i, st in enumerate(stats)
          if st["rmsd_bonds"] <= bond_limit and st["rmsd_angles"] <= angle_limit]
    pool = ok or range(len(stats))
    return max(pool, key=lambda i: stats[i]["cc_mask_final"])


def check_finite_result(result):
    """ResultError, naming the model and atom, where a refined coordinate, B, occupancy or a
    reported statistic is not finite: such a result is not written."""
    batch, bk = result.batch, result.batch.backend
    label = batch.model.atom_label
    check_finite("coordinate", bk.to_numpy(batch.xyz), label)
    check_finite("B", bk.to_numpy(batch.b), label)
    check_finite("occupancy", bk.to_numpy(batch.occ), label)
    if batch.u is not None:
        check_finite("anisotropic U", bk.to_numpy(batch.u), label)
    check_finite_rows(result.stats)


def refine_real_space(model, map_data, resolution=None, settings=None, backend=None,
                      dtype=np.float32, batch=None, **params):
    """Refine ``model`` against ``map_data``; ``batch`` (of its topology, e.g. ``read_batch``
    of a multi-model file) gives the starting models instead of ``model`` itself.

    Parameters are RSRSettings fields, given as ``settings`` or keywords, e.g.
    ``refine_real_space(model, map_data, resolution=3.2, strategy="minimization_global+adp",
    nmodels=16, shake=0.5)`` or a weight grid ``weight=(10, 20, 40)``.  Returns an RSRResult
    whose batch holds each start's copies in turn (each copy with each weight of a grid).
    """
    s = settings or RSRSettings()
    unknown = set(params) - set(asdict(s))
    if unknown:
        raise ParameterError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    for k, v in params.items():
        setattr(s, k, v)
    if resolution is not None:
        s.resolution = resolution
    job = RealSpaceRefinement(model, map_data, s, backend=backend, dtype=dtype, starts=batch)
    return job.run()
