"""Reading and writing MRC/CCP4 maps with mrcfile, keeping axis order, NSTART, ORIGIN and cell;
map coefficients from an MTZ (gemmi) as a map on the whole cell."""
import logging
import os
import warnings
from dataclasses import dataclass

import gemmi
import mrcfile
import numpy as np

from .checks import MAX_CELL, MAX_MAP_POINTS, MAX_VOXEL
from .errors import InputError, ParameterError
from .grid import GridSpec
from .io import check_readable, write_atomically

log = logging.getLogger(__name__)


@dataclass
class MapData:
    """A map as a C-contiguous float32 array indexed [i, j, k] along a, b, c, and its grid."""
    data: np.ndarray
    spec: GridSpec


# Map coefficients of a 2mFo-DFc map as X-ray programs name them (Refmac and Servalcat; Phenix).
MTZ_MAP_LABELS = (("FWT", "PHWT"), ("2FOFCWT", "PH2FOFCWT"))


def read_map(path, labels=None):
    """Read an MRC/CCP4 map, placed by ORIGIN when it is non-zero, else by NSTART; or map
    coefficients from an MTZ, ``labels`` "F,PHI" (by default FWT,PHWT or 2FOFCWT,PH2FOFCWT),
    as a map on the whole cell with the MTZ's space group."""
    path = os.fspath(path)
    check_readable(path, "map")
    if path.lower().endswith(".mtz"):
        return _read_mtz_map(path, labels)
    if labels:
        raise ParameterError("labels= names MTZ map coefficients; the map is not an MTZ")
    if not path.lower().endswith(".gz"):
        _check_mrc_header(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, permissive=True) as mrc:
                h = mrc.header
                raw = mrc.data
                if raw is None or h is None:
                    raise ValueError("its data are missing or shorter than its header says "
                                     "(a truncated file?)")
                data = np.asarray(raw, dtype=np.float32)
                axes = [int(h.maps), int(h.mapr), int(h.mapc)]   # data dims are (sec, row, col)
                starts = [int(h.nzstart), int(h.nystart), int(h.nxstart)]
                sampling = (int(h.mx), int(h.my), int(h.mz))
                cell = (float(h.cella.x), float(h.cella.y), float(h.cella.z),
                        float(h.cellb.alpha), float(h.cellb.beta), float(h.cellb.gamma))
                origin = (float(h.origin.x), float(h.origin.y), float(h.origin.z))
                ispg = int(h.ispg)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read map {path}: {exc}") from None
    if data.ndim != 3 or sorted(axes) != [1, 2, 3]:
        raise InputError(f"map {path} is not a 3D volume with a valid axis order")
    order = [axes.index(1), axes.index(2), axes.index(3)]
    data = np.ascontiguousarray(data.transpose(order))
    start = tuple(starts[d] for d in order)
    shape = data.shape
    if min(sampling) <= 0:
        sampling = shape
    _check_cell(path, cell, sampling)
    if not np.all(np.isfinite(data)):
        raise InputError(f"map {path} contains NaN or infinite values")
    if any(origin) and any(start):
        log.warning("map %s sets both ORIGIN and NSTART; placing it by ORIGIN", path)
    if any(origin):
        start = (0, 0, 0)
    spacegroup = "P 1"
    if ispg > 1 and tuple(shape) == tuple(sampling):
        sg = gemmi.find_spacegroup_by_number(ispg)
        spacegroup = sg.hm if sg else "P 1"
    spec = GridSpec(cell=cell, sampling=tuple(sampling), shape=tuple(shape), start=start,
                    origin=origin, spacegroup=spacegroup)
    return MapData(data=data, spec=spec)


# Bytes per value of each MRC mode (mode 101 packs two 4-bit values in a byte).
_MODE_BYTES = {0: 1, 1: 2, 2: 4, 3: 4, 4: 8, 6: 2, 12: 2, 101: 0.5}


def _check_mrc_header(path):
    """InputError, from the 1024-byte header alone, where an MRC file cannot hold what its
    header says (dimensions, mode, extended header NSYMBT): before any of it is allocated."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
        size = os.path.getsize(path)
    except OSError as exc:
        raise InputError(f"cannot read map {path}: {exc.strerror or exc}") from None
    if len(head) < 1024:
        raise InputError(f"map {path} is shorter than an MRC header ({len(head)} bytes)")
    order = ">" if head[212:214] == b"\x11\x11" else "<"
    nx, ny, nz, mode = np.frombuffer(head[:16], dtype=order + "i4").tolist()
    nsymbt = int(np.frombuffer(head[92:96], dtype=order + "i4")[0])
    if min(nx, ny, nz) <= 0:
        raise InputError(f"map {path} has no points: its header gives dimensions "
                         f"{nx} x {ny} x {nz}")
    if nx * ny * nz > MAX_MAP_POINTS:
        raise InputError(f"map {path}: its header gives {nx} x {ny} x {nz} points, more than "
                         f"{MAX_MAP_POINTS} (a damaged header?)")
    if mode not in _MODE_BYTES:
        raise InputError(f"map {path} has an unknown data mode {mode} in its header")
    need = 1024 + nsymbt + int(np.ceil(nx * ny * nz * _MODE_BYTES[mode]))
    if nsymbt < 0 or need > size:
        raise InputError(f"map {path} is {size} bytes, but its header asks for {need} "
                         f"(dimensions {nx} x {ny} x {nz}, mode {mode}, extended header "
                         f"{nsymbt} bytes): a truncated file or a damaged header")


def _check_cell(path, cell, sampling):
    """InputError where the cell is no physical cell: lengths and angles finite, edges up
    to MAX_CELL Å and voxels up to MAX_VOXEL Å."""
    lengths, angles = np.asarray(cell[:3], float), np.asarray(cell[3:], float)
    text = "cell " + " ".join(f"{c:g}" for c in cell)
    if not (np.isfinite(lengths).all() and np.isfinite(angles).all()):
        raise InputError(f"map {path} has a cell that is not finite in its header ({text})")
    if lengths.min() <= 0:
        raise InputError(f"map {path} has no valid unit cell in its header ({text})")
    if lengths.max() > MAX_CELL or (lengths / np.asarray(sampling)).max() > MAX_VOXEL:
        raise InputError(f"map {path}: its header's {text} Å is larger than any map's "
                         f"(edges up to {MAX_CELL:g} Å, voxels up to {MAX_VOXEL:g} Å)")
    if not ((angles > 0) & (angles < 180)).all():
        raise InputError(f"map {path} has cell angles outside 0-180° in its header ({text})")


def map_resolution(path):
    """The d_min (Å) of an MTZ's map coefficients, as the default resolution of a job on
    them; None for a map file, which does not state one."""
    path = os.fspath(path)
    if not path.lower().endswith(".mtz") or not os.path.isfile(path):
        return None
    try:
        return round(float(gemmi.read_mtz_file(path).resolution_high()), 3)
    except Exception as exc:
        raise InputError(f"cannot read MTZ {path}: {exc}") from None


def _read_mtz_map(path, labels, sample_rate=3.0):
    """The map of an MTZ's coefficients on the cell, sampled at d_min / ``sample_rate``."""
    try:
        mtz = gemmi.read_mtz_file(path)
    except Exception as exc:
        raise InputError(f"cannot read MTZ {path}: {exc}") from None
    kinds = {c.label: c.type for c in mtz.columns}
    available = ", ".join(f"{k} ({t})" for k, t in kinds.items() if t in "FP")
    if labels:
        pair = tuple(x.strip() for x in str(labels).split(","))
        if len(pair) != 2 or not all(pair):
            raise ParameterError(f"labels={labels}: give an amplitude and a phase column, F,PHI")
        if [kinds.get(x) for x in pair] != ["F", "P"]:
            raise InputError(f"MTZ {path} has no amplitude {pair[0]} and phase {pair[1]} "
                             f"(amplitude and phase columns: {available or 'none'})")
    else:
        pair = next((p for p in MTZ_MAP_LABELS if [kinds.get(x) for x in p] == ["F", "P"]),
                    None)
        if pair is None:
            raise InputError(f"MTZ {path} has no map coefficients FWT,PHWT or "
                             f"2FOFCWT,PH2FOFCWT; name them with labels=F,PHI (amplitude and "
                             f"phase columns: {available or 'none'})")
    try:
        grid = mtz.transform_f_phi_to_map(*pair, sample_rate=sample_rate)
    except Exception as exc:
        raise InputError(f"cannot compute a map from {path} {pair[0]},{pair[1]}: {exc}") from None
    data = np.ascontiguousarray(np.asarray(grid), dtype=np.float32)
    if not np.all(np.isfinite(data)) or not data.std() > 0:
        raise InputError(f"the map of {path} {pair[0]},{pair[1]} is empty or not finite")
    spacegroup = mtz.spacegroup.hm if mtz.spacegroup else "P 1"
    log.info("map from %s %s,%s (d_min %.2f Å): %s grid on the cell, %s", path, *pair,
             mtz.resolution_high(), "x".join(map(str, data.shape)), spacegroup)
    spec = GridSpec(cell=tuple(mtz.cell.parameters), sampling=data.shape, shape=data.shape,
                    spacegroup=spacegroup, crystal=True)
    return MapData(data=data, spec=spec)


def write_map(path, data, spec, overwrite=False):
    """Write an [i, j, k]-indexed array as MRC with axes X, Y, Z, NSTART, ORIGIN and cell."""
    arr = np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0))

    def write(tmp):
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(arr)
            h = mrc.header
            h.mx, h.my, h.mz = spec.sampling
            h.cella = spec.cell[:3]
            h.cellb = spec.cell[3:]
            h.nxstart, h.nystart, h.nzstart = spec.start
            h.origin = spec.origin
            h.mapc, h.mapr, h.maps = 1, 2, 3
            h.ispg = gemmi.SpaceGroup(spec.spacegroup).number if spec.periodic else 1
            mrc.update_header_stats()

    write_atomically(os.fspath(path), write, overwrite=overwrite)
