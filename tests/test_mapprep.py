"""Map preparation: the box around the model, the soft mask, crystal cells kept whole."""
import dataclasses

import numpy as np
import pytest
from scipy import fft as sp_fft
from scipy.spatial import cKDTree

import gpu_refine as gr
import gpu_refine.examples
from gpu_refine.density import DensitySettings, ModelMapper
from gpu_refine.grid import GridSpec
from gpu_refine.mapprep import prepare_map


@pytest.fixture(scope="module")
def helix():
    return gr.Model.from_gemmi(gr.examples.helix_structure("AEAKAEAKA"))


def _crystal_map(model, cell, spacegroup, spacing=1.0):
    """The model's map (with its symmetry mates) on the whole cell of a crystal."""
    sampling = tuple(int(np.ceil(c / spacing)) for c in cell[:3])
    spec = GridSpec(cell=cell, sampling=sampling, shape=sampling, spacegroup=spacegroup)
    mapper = ModelMapper(spec, 3.0, DensitySettings(), backend="numpy")
    data = mapper.image(gr.Batch.from_model(model, 1, backend="numpy"))[0]
    return gr.MapData(np.asarray(data, dtype=np.float32), spec)


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
    map_data = _crystal_map(helix, cell, "P 1 21 1")
    prepared = prepare_map(map_data, helix.xyz)
    assert prepared.spec.is_crystal and prepared.spec.spacegroup == "P 1 21 1"
    assert prepared.spec.shape == map_data.spec.shape
    assert prepared.spec.start == map_data.spec.start
    expected = _reference_mask(prepared.spec, helix.xyz, 3.0, 2.0)
    np.testing.assert_allclose(prepared.mask, expected, atol=1e-6)
    assert (expected > 0).mean() > 0.5       # the case does test the periodic images


def test_large_crystal_cell_gets_a_box_without_symmetry(helix):
    """A cell larger than the model plus cushion along every axis: a P 1 box inside it."""
    cell = (80.0, 85.0, 90.0, 90.0, 90.0, 90.0)
    map_data = _crystal_map(helix, cell, "P 21 21 21", spacing=1.5)
    prepared = prepare_map(map_data, helix.xyz)
    assert prepared.spec.spacegroup == "P 1" and not prepared.spec.periodic
    assert all(n < m for n, m in zip(prepared.spec.shape, map_data.spec.shape))
    assert prepared.mask.max() == 1.0


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
