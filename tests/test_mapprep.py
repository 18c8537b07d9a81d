"""Map preparation: the box around the model, the soft mask, crystal cells kept whole."""
import dataclasses

import numpy as np
import pytest
from scipy import fft as sp_fft
from scipy.spatial import cKDTree

import gpu_refine as gr
import gpu_refine.examples
from gpu_refine.density import DensitySettings, ModelMapper
from gpu_refine import mapprep
from gpu_refine.mapprep import prepare_map
from helpers import crystal_map, write_mtz


@pytest.fixture(scope="module")
def helix():
    return gr.Model.from_gemmi(gr.examples.helix_structure("AEAKAEAKA"))


def _reference_mask(spec, xyz, radius, edge):
    """Weights from the distance to the nearest copy of an atom: every symmetry operation and
    every lattice translation up to two cells away, none pruned."""
    ops = spec.cartesian_operations()
    copies = np.concatenate([xyz @ r.T + t for r, t in ops])
    steps = np.stack(np.meshgrid(*[np.arange(-2, 3)] * 3, indexing="ij"), -1).reshape(-1, 3)
    lattice = steps @ spec.orth.T
    centres = (copies[:, None, :] + lattice[None]).reshape(-1, 3)
    idx = np.indices(spec.shape).reshape(3, -1).T
    d, _ = cKDTree(centres).query(spec.origin_xyz + idx @ spec.xyz_from_index.T)
    t = np.clip((d - radius) / edge, 0.0, 1.0)
    return (0.5 * (1 + np.cos(np.pi * t))).reshape(spec.shape)


def test_small_crystal_cell_is_taken_whole_with_its_mates(helix):
    """A cell smaller than the model plus its cushion: the box is the whole cell with its
    space group (so the model map holds the mates), and the mask reaches across the cell's
    faces and around every mate."""
    cell = (18.0, 21.0, 24.0, 90.0, 104.0, 90.0)
    map_data = crystal_map(helix, cell, "P 1 21 1")
    prepared = prepare_map(map_data, helix.xyz)
    assert prepared.spec.is_crystal and prepared.spec.spacegroup == "P 1 21 1"
    assert prepared.spec.shape == map_data.spec.shape
    assert prepared.spec.start == map_data.spec.start
    expected = _reference_mask(prepared.spec, helix.xyz, 3.0, 2.0)
    np.testing.assert_allclose(prepared.mask, expected, atol=1e-6)
    assert (expected > 0).mean() > 0.5       # the case does test the periodic images


def test_p1_crystal_from_its_mtz_is_periodic(helix, tmp_path):
    """A P 1 crystal's map coefficients: its map is a crystal's (periodic), not a box, so a
    small cell is taken whole and the mask reaches across its faces."""
    cell = (18.0, 21.0, 24.0, 80.0, 104.0, 95.0)
    write_mtz(tmp_path / "p1.mtz", crystal_map(helix, cell, "P 1"), 3.0)
    map_data = gr.read_map(tmp_path / "p1.mtz")
    assert map_data.spec.is_crystal and map_data.spec.spacegroup == "P 1"
    prepared = prepare_map(map_data, helix.xyz)
    assert prepared.spec.is_crystal and prepared.spec.shape == map_data.spec.shape
    assert prepared.copies is None      # the cell's space group (P 1: none)
    np.testing.assert_allclose(prepared.mask,
                               _reference_mask(prepared.spec, helix.xyz, 3.0, 2.0), atol=1e-6)


def test_box_cut_from_a_crystal_holds_the_mates_near_it(helix):
    """A cell larger than the model plus cushion along every axis: a P 1 box inside it, whose
    model map holds the atoms of mates near the model, so that it equals the crystal's
    density wherever the mask is."""
    cell = (50.0, 48.0, 50.0, 90.0, 100.0, 90.0)      # a 2-fold axis by the model
    map_data = crystal_map(helix, cell, "P 1 2 1")
    prepared = prepare_map(map_data, helix.xyz)
    box = prepared.spec
    assert box.spacegroup == "P 1" and not box.periodic
    assert all(n < m for n, m in zip(box.shape, map_data.spec.shape))
    assert prepared.copies, "the case should bring mates near the model"
    batch = gr.Batch.from_model(helix, 1, backend="numpy", dtype=np.float64)
    settings = DensitySettings(blur=10.0)
    in_box = ModelMapper(box, 3.0, settings, backend="numpy",
                         copies=prepared.copies).exact(batch)[0]
    crystal = ModelMapper(map_data.spec, 3.0, settings, backend="numpy").exact(batch)[0]
    idx = [np.arange(s, s + n) % m for s, n, m in zip(box.start, box.shape,
                                                       map_data.spec.shape)]
    crystal = crystal[np.ix_(*idx)]
    masked = prepared.mask > 0
    np.testing.assert_allclose(in_box[masked], crystal[masked], atol=1e-5 * crystal.max())
    without = ModelMapper(box, 3.0, settings, backend="numpy", copies=[]).exact(batch)[0]
    assert np.abs(without - in_box)[masked].max() > 0.05 * crystal.max()


def test_box_mask_and_mates_cover_every_start(helix):
    """Several starting models of one topology: the box holds each one's box, the mask is the
    largest of their masks, and a mate carries the atoms that are near it in any start."""
    cell = (50.0, 48.0, 50.0, 90.0, 100.0, 90.0)
    map_data = crystal_map(helix, cell, "P 1 2 1")
    moved = helix.xyz + np.where(np.arange(helix.n_atoms) % 2 == 0, 2.5, -2.0)[:, None]
    both = prepare_map(map_data, np.stack([helix.xyz, moved]))
    alone = [prepare_map(map_data, xyz) for xyz in (helix.xyz, moved)]
    for one in alone:
        assert all(b <= o and o + n <= b + m for b, m, o, n in
                   zip(both.spec.start, both.spec.shape, one.spec.start, one.spec.shape))
    masks = [mapprep.soft_mask(both.spec, xyz, 3.0, 2.0) for xyz in (helix.xyz, moved)]
    np.testing.assert_allclose(both.mask, np.maximum(*masks), atol=1e-6)
    # Each start's own mask too, for the models refined from it.
    assert both.masks.shape == (2,) + tuple(both.spec.shape)
    np.testing.assert_allclose(both.masks, np.stack(masks), atol=1e-6)
    # A mate carries the atoms whose image in either start comes within reach of either
    # start (the mask is theirs together): at least those of each start alone.
    reach = 3.0 + 2.0 + mapprep.MATE_DENSITY_REACH
    tree = cKDTree(np.concatenate([helix.xyz, moved]))
    alone_atoms = {}
    for one in alone:
        for c in one.copies:
            key = (c.rot.round(6).tobytes(), c.shift.round(6).tobytes())
            alone_atoms[key] = np.union1d(alone_atoms.get(key, []), c.atoms)
    assert len(both.copies) == len(alone_atoms)
    for c in both.copies:
        assert set(alone_atoms[(c.rot.round(6).tobytes(), c.shift.round(6).tobytes())]) \
            <= set(c.atoms)
        d = np.min([tree.query(xyz[c.atoms] @ c.rot.T + c.shift)[0] for xyz in
                    (helix.xyz, moved)], axis=0)
        assert d.max() <= reach and len(c.atoms) < helix.n_atoms


@pytest.mark.parametrize("sampling,whole", [((38, 34, 38), True), ((38, 35, 38), False)])
def test_box_that_would_be_most_of_the_cell_is_the_whole_cell(helix, sampling, whole):
    """A box that would hold most of a cell's points is the whole cell where the sampling
    suits the space group (mates summed on the grid), else a box with the mates' atoms."""
    cell = (38.0, 34.0, 38.0, 90.0, 100.0, 90.0)
    map_data = crystal_map(helix, cell, "P 1 21 1")
    spec = dataclasses.replace(map_data.spec, sampling=sampling, shape=sampling)
    data = np.zeros(sampling, dtype=np.float32)
    data[:38, :34, :38] = map_data.data
    prepared = prepare_map(gr.MapData(data, spec), helix.xyz)
    assert prepared.spec.is_crystal == whole
    assert (prepared.copies is None) == whole
    assert np.prod(prepared.spec.shape) >= mapprep.WHOLE_CELL_FRACTION * np.prod(sampling)


def test_crystal_box_whole_along_one_axis_wraps_there_only(helix, backend):
    """A cell shorter than the model plus cushion along c only: the box holds one period along
    c (and is periodic there) and a P 1 box along a and b; with the mates near the model its
    model map equals the crystal's wherever the mask is, on either backend, and the mask
    reaches across the c faces to the model's translates."""
    cell = (60.0, 56.0, 16.0, 90.0, 100.0, 90.0)
    map_data = crystal_map(helix, cell, "P 1 2 1")
    prepared = prepare_map(map_data, helix.xyz)
    box = prepared.spec
    assert box.periodic_axes == (False, False, True) and box.spacegroup == "P 1"
    assert box.shape[2] == map_data.spec.shape[2]
    assert all(n < m for n, m in zip(box.shape[:2], map_data.spec.shape[:2]))
    # One copy per operation and a/b translation: c translates are the box's own wrap.
    keys = [(tuple(np.round(c.rot, 6).ravel()), tuple(np.round(c.shift[:2], 6)))
            for c in prepared.copies]
    assert prepared.copies and len(set(keys)) == len(keys)
    batch = gr.Batch.from_model(helix, 1, backend=backend, dtype=np.float64)
    settings = DensitySettings(blur=10.0)
    in_box = backend.to_numpy(ModelMapper(box, 3.0, settings, backend=backend,
                                          copies=prepared.copies).exact(batch))[0]
    crystal = ModelMapper(map_data.spec, 3.0, settings, backend="numpy").exact(
        gr.Batch.from_model(helix, 1, backend="numpy", dtype=np.float64))[0]
    idx = [np.arange(s, s + n) % m for s, n, m in zip(box.start, box.shape,
                                                       map_data.spec.shape)]
    crystal = crystal[np.ix_(*idx)]
    masked = prepared.mask > 0
    np.testing.assert_allclose(in_box[masked], crystal[masked], atol=1e-5 * crystal.max())
    lattice = np.arange(-2, 3)[:, None] * (box.xyz_from_index[:, 2] * box.shape[2])[None]
    centres = (helix.xyz[:, None, :] + lattice[None]).reshape(-1, 3)
    pts = box.origin_xyz + np.indices(box.shape).reshape(3, -1).T @ box.xyz_from_index.T
    d, _ = cKDTree(centres).query(pts)
    t = np.clip((d - 3.0) / 2.0, 0.0, 1.0)
    expected = (0.5 * (1 + np.cos(np.pi * t))).reshape(box.shape)
    np.testing.assert_allclose(prepared.mask, expected, atol=1e-6)


@pytest.mark.parametrize("cut", [(0, 0, 0), (1, 2, 1)])
def test_map_smaller_than_the_box_is_padded_not_wrapped(helix, cut):
    """A cryo-EM map (a P 1 box) tighter than model plus cushion: the box holds the whole map,
    grown to FFT-friendly sizes beyond its edges (zeros there, outside the mask), never
    wrapped around (the map's far side is not density near the model); the mask ignores
    periodic images.  ``cut`` trims the map to sizes that FFT badly (15 x 13 x 14)."""
    data, spec = gr.examples.simulated_map(helix, 3.0, padding=2.0)
    data = data[cut[0]:, cut[1]:, cut[2]:]
    spec = dataclasses.replace(spec, shape=data.shape, start=cut)
    prepared = prepare_map(gr.MapData(data, spec), helix.xyz, cushion=5.0)
    box = prepared.spec
    assert box.periodic_axes == (False, False, False)
    assert all(sp_fft.next_fast_len(n, real=True) == n for n in box.shape)
    lo = np.subtract(spec.start, box.start)
    assert np.all(lo >= 0) and np.all(lo + data.shape <= box.shape)
    inside = tuple(slice(a, a + n) for a, n in zip(lo, data.shape))
    np.testing.assert_allclose(prepared.data[inside] * prepared.sd + prepared.mean, data,
                               atol=1e-4)
    outside = np.ones(box.shape, dtype=bool)
    outside[inside] = False
    assert np.all(prepared.data[outside] * prepared.sd + prepared.mean == pytest.approx(0.0,
                                                                                      abs=1e-4))
    idx = np.indices(box.shape).reshape(3, -1).T
    d, _ = cKDTree(helix.xyz).query(box.origin_xyz + idx @ box.xyz_from_index.T)
    t = np.clip((d - 3.0) / 2.0, 0.0, 1.0)
    expected = (0.5 * (1 + np.cos(np.pi * t))).reshape(box.shape) * ~outside
    np.testing.assert_allclose(prepared.mask, expected, atol=1e-6)
