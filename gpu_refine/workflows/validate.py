"""Model maps and map-model validation for one model or a batch."""
import logging

import numpy as np

from ..backend import get_backend
from ..checks import MAX_BOX_POINTS, check_number
from ..density import DensitySettings, ModelMapper, map_in_chunks
from ..errors import InputError, ParameterError
from ..grid import box_around
from ..metrics import five_cc, image_radius, molecular_masks, per_residue_cc
from ..model import Batch
from ..restraints.topology import coincident_problems

log = logging.getLogger(__name__)


def check_resolution(resolution):
    if resolution is None:
        raise ParameterError("resolution is required (resolution=D, in Å)")
    try:
        d = float(resolution)
    except (TypeError, ValueError):
        raise ParameterError(f"resolution must be a number in Å, got {resolution!r}") from None
    if not (np.isfinite(d) and 0.5 <= d <= 50):
        raise ParameterError(f"resolution={d} Å is not plausible (expected 0.5-50 Å)")
    return d


def check_sampling(resolution, spec):
    """Warn where ``resolution`` is finer than the grid of ``spec`` can hold (two voxels):
    model maps then stop at the grid's limit, whatever was asked."""
    finest = 2 * float(np.max(spec.voxel_size))
    if resolution < finest - 1e-6:
        log.warning("resolution=%.2f Å is finer than the map's grid holds (%.2f Å voxels): "
                    "model maps reach %.2f Å at best", resolution, finest / 2, finest)


def check_overlap(model_xyz, spec, what="map"):
    """Raise if no atom lies in the map box; warn if some do not."""
    inside = spec.contains(model_xyz)
    if not inside.any():
        raise InputError(f"the model does not overlap the {what}: no atom lies inside its box "
                         "(check the map origin / NSTART and the model frame)")
    if not inside.all():
        log.warning("%d of %d atoms lie outside the map box", int((~inside).sum()), inside.size)
    return inside


def check_occupancy(occ):
    """Raise where a model (a row of ``occ``, (B, N)) has no atom of occupancy above 0: it has
    no density to make a map of or compare with one."""
    empty = np.flatnonzero(~(np.asarray(occ) > 0).any(axis=-1).reshape(-1))
    if len(empty):
        raise InputError(f"every atom of model {int(empty[0]) + 1} has occupancy 0: the model "
                         "has no density")


def check_coincident(model, xyz):
    """InputError where atoms of one conformer lie on each other in a model of ``xyz``
    (B, N, 3): a pile of copies has no map worth comparing, and costs its square in work."""
    problems = coincident_problems(xyz, model.altloc, model.atom_label, "model",
                                   "remove the copies")
    if problems:
        raise InputError(problems[0])


def check_extent(model, xyz, spacing, padding):
    """InputError where a box around the models ``xyz`` (B, N, 3) at ``spacing`` Å would hold
    more than MAX_BOX_POINTS: names the atom farthest from the models' centre (one atom far
    from the rest, a coordinate typed wrong) instead of running out of memory."""
    flat = xyz.reshape(-1, 3)
    points = np.prod(np.ceil((flat.max(axis=0) - flat.min(axis=0) + 2 * padding) / spacing) + 1)
    if points <= MAX_BOX_POINTS:
        return
    centre = np.median(flat, axis=0)
    far = np.linalg.norm(xyz - centre, axis=-1)
    k, i = np.unravel_index(int(np.argmax(far)), far.shape)
    raise InputError(f"a map around the model would have {points:.3g} points: atom "
                     f"{model.atom_label(i)}{f' of model {k + 1}' if len(xyz) > 1 else ''} "
                     f"lies {far[k, i]:.0f} Å from the centre of the others; move or remove it")


INVERTED_CC = -0.1   # CCmask below this for every model: the map's contrast is inverted
UNRELATED_CC = 0.1   # below this for every model: the model is not where its density is


def check_fit(cc_mask, refuse=False):
    """Point out a map that correlates negatively with every model (CCmask below
    INVERTED_CC: density drawn negative, as some reconstructions write it; ``refuse``: raise
    instead, as a refinement would push the atoms out of the density), or hardly at all."""
    cc = np.asarray(cc_mask, dtype=np.float64)
    if not np.isfinite(cc).all() or cc.max() >= UNRELATED_CC:
        return
    if cc.max() < INVERTED_CC:
        text = (f"the map correlates negatively with the model (CCmask {cc.max():.3f}): its "
                "contrast looks inverted (negate the map), or it is not this model's map")
        if refuse:
            raise InputError(text)
        log.warning(text)
    else:
        log.warning("the model hardly matches the map (CCmask %.3f): check that the map is "
                    "placed by its header as the model expects (ORIGIN, NSTART) and that it "
                    "is this model's map", cc.max())


def _as_batch(model_or_batch, backend):
    if isinstance(model_or_batch, Batch):
        return model_or_batch
    return Batch.from_model(model_or_batch, 1, backend=backend)


def compute_model_map(model, resolution, spec=None, table="electron", backend=None,
                      padding=5.0, rate=1.5):
    """Fourier-image model map(s) at ``resolution``: on ``spec`` if given, else a box around the
    model.  Returns ((B, n0, n1, n2) NumPy array, spec)."""
    d = check_resolution(resolution)
    bk = get_backend(backend)
    batch = _as_batch(model, bk)
    check_occupancy(bk.to_numpy(batch.occ))
    if spec is None:
        check_extent(batch.model, bk.to_numpy(batch.xyz), d / (2 * rate), padding)
        spec = box_around(bk.to_numpy(batch.xyz), d / (2 * rate), padding)
    else:
        check_overlap(bk.to_numpy(batch.xyz).reshape(-1, 3), spec)
        check_sampling(d, spec)
    mapper = ModelMapper(spec, d, DensitySettings(table=table), backend=bk)
    return bk.to_numpy(mapper.image(batch)), spec


def validate(model, map_data, resolution, table="electron", backend=None, atom_radius=None):
    """Map-model CCs of every batch member: list of dicts with cc_mask, cc_box, cc_peaks,
    cc_volume and per_residue [{chain, resseq, resname, cc}]."""
    d = check_resolution(resolution)
    if atom_radius is not None:
        atom_radius = check_number("atom_radius", atom_radius, 0.1, 10.0, "Å")
    bk = get_backend(backend)
    xp = bk.xp
    batch = _as_batch(model, bk)
    spec = map_data.spec
    xyz = bk.to_numpy(batch.xyz)
    check_coincident(batch.model, xyz)
    check_overlap(xyz.reshape(-1, 3), spec)
    check_occupancy(bk.to_numpy(batch.occ))
    check_sampling(d, spec)
    mapper = ModelMapper(spec, d, DensitySettings(table=table), backend=bk)
    exp_map = bk.asarray(map_data.data)

    def maps_and_ccs(sub):
        image = mapper.image(sub)
        masks = xp.asarray(molecular_masks(sub.model, bk.to_numpy(sub.xyz), spec))
        return bk.to_numpy(image), five_cc(xp, exp_map, image, masks)
    parts, _ = map_in_chunks(bk, batch, maps_and_ccs)
    mm = np.concatenate([m for m, _ in parts])
    ccs = {k: np.concatenate([c[k] for _, c in parts]) for k in parts[0][1]}
    if not np.isfinite(ccs["cc_box"]).all():
        log.warning("the map is flat: its correlations with the model are undefined (NaN)")
    elif not np.isfinite(ccs["cc_mask"]).all():
        log.warning("the map is flat where the model is: CCmask is undefined (NaN)")
    check_fit(ccs["cc_mask"])
    b_mean = float(bk.to_numpy(batch.b).mean())
    # mmtbx's per-atom radius is the atom image's first minimum; bounded by d as cctbx reports.
    radius = atom_radius if atom_radius is not None else min(d, image_radius(d, b_mean,
                                                                            table=table))
    residues = batch.model.residues
    results = []
    for i in range(batch.size):
        per_res = per_residue_cc(map_data.data, mm[i], xyz[i], batch.model.residue_index,
                                 len(residues), spec, radius)
        results.append({
            **{k: float(v[i]) for k, v in ccs.items()},
            "atom_radius": radius,
            "per_residue": [{"chain": c, "resseq": s, "resname": n,
                             "cc": None if not np.isfinite(cc) else round(float(cc), 4)}
                            for (c, s, n), cc in zip(residues, per_res)],
        })
    return results
