"""Map-model CCs: the shared cryo-EM case against cctbx, and basic properties."""
import dataclasses
import logging

import numpy as np
import pytest
from scipy.fft import next_fast_len

import gpu_refine as gr
import gpu_refine.examples
from gpu_refine.examples import make_example
from gpu_refine.mapprep import box_indices, box_spec, enclosing_box
from gpu_refine.metrics import (correlation, mask_and_box_cc, model_box, molecular_mask,
                                molecular_masks, per_residue_cc)
from gpu_refine.workflows import validate

# cctbx-base 2025.11 mmtbx.maps.map_model_cc (electron table, resolution 3.2 Å), run on this
# case with the map's ORIGIN moved into the model frame and atom charges removed:
#   with H:    cc_mask 0.6986  cc_box 0.5994  cc_volume 0.7033  cc_peaks 0.6070
#   without H: cc_mask 0.7344  cc_box 0.6243  cc_volume 0.7353  cc_peaks 0.6353
# gpu_refine gave (numpy, 2026-11-22): with H 0.7061 0.5989 0.7136 0.6092;
#                                      without H 0.7337 0.6236 0.7344 0.6347.
CCTBX = {True: dict(cc_mask=0.6986, cc_box=0.5994, cc_volume=0.7033, cc_peaks=0.6070),
         False: dict(cc_mask=0.7344, cc_box=0.6243, cc_volume=0.7353, cc_peaks=0.6353)}


@pytest.mark.parametrize("with_h", [True, False])
def test_emd2566_matches_cctbx(shared, backend, with_h):
    d = shared / "cryoem/emd2566_3j6b_chain9"
    model = gr.read_model(d / "3J6B_9.pdb")
    if not with_h:
        st = model.structure
        st.remove_hydrogens()
        model = gr.Model.from_gemmi(st)
    r = validate(model, gr.read_map(d / "2566_3J6B_9.mrc"), 3.2, backend=backend)[0]
    assert abs(r["cc_mask"] - CCTBX[with_h]["cc_mask"]) <= 0.02
    for key in ("cc_box", "cc_volume", "cc_peaks"):
        assert abs(r[key] - CCTBX[with_h][key]) <= 0.03, key
    per_res = [x["cc"] for x in r["per_residue"] if x["cc"] is not None]
    assert len(per_res) == len(model.residues)
    assert 0.4 < np.median(per_res) < 0.95


def test_batch_ccs_fall_as_models_are_shaken(backend, rng):
    model, data, spec = make_example()
    batch = gr.Batch.from_model(model, 3, backend=backend, dtype=np.float32)
    for i, shake in enumerate((0.0, 0.5, 1.5)):
        batch.xyz[i] += backend.asarray(rng.normal(scale=shake, size=(model.n_atoms, 3)),
                                        dtype=np.float32)
    results = validate(batch, gr.MapData(data, spec), 3.0, backend=backend)
    cc = [r["cc_mask"] for r in results]
    assert cc[0] > 0.85 and cc[0] > cc[1] > cc[2]


def test_a_resolution_finer_than_the_grid_is_flagged(caplog):
    """The example map has 1 Å voxels: model maps hold 2 Å at best; a finer resolution is
    computed as that, with a warning (none at 2 Å)."""
    model, data, spec = make_example()
    with caplog.at_level(logging.WARNING, logger="gpu_refine"):
        validate(model, gr.MapData(data, spec), 2.0, backend="numpy")
        assert "finer than the map's grid" not in caplog.text
        validate(model, gr.MapData(data, spec), 1.5, backend="numpy")
    assert "resolution=1.50 Å is finer than the map's grid holds (1.00 Å voxels)" in caplog.text


def test_a_flat_map_gives_undefined_ccs_with_a_warning(caplog):
    model, data, spec = make_example()
    with caplog.at_level(logging.WARNING, logger="gpu_refine"):
        result = validate(model, gr.MapData(np.zeros_like(data), spec), 3.0, backend="numpy")[0]
    assert np.isnan(result["cc_mask"]) and np.isnan(result["cc_box"])
    assert "the map is flat" in caplog.text


def test_atom_radius_must_be_in_range():
    model, data, spec = make_example()
    for radius in (-1.0, 0.0, float("nan"), 1e6):
        with pytest.raises(gr.ParameterError, match="atom_radius=.* is out of range"):
            validate(model, gr.MapData(data, spec), 3.0, backend="numpy", atom_radius=radius)


def test_an_inverted_map_is_pointed_out(caplog):
    """A map drawn with negative density correlates negatively with its model, and one of
    noise hardly at all: validate says so (and reports the CCs); nothing is said for the
    model's own map."""
    model, data, spec = make_example()
    with caplog.at_level(logging.WARNING, logger="gpu_refine"):
        assert validate(model, gr.MapData(data, spec), 3.0, backend="numpy")[0]["cc_mask"] > 0.9
        assert "inverted" not in caplog.text and "hardly" not in caplog.text
        result = validate(model, gr.MapData(-data, spec), 3.0, backend="numpy")[0]
    assert result["cc_mask"] < -0.9
    assert "the map correlates negatively with the model" in caplog.text
    caplog.clear()
    noise = np.random.default_rng(1).normal(size=data.shape).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="gpu_refine"):
        cc = validate(model, gr.MapData(noise, spec), 3.0, backend="numpy")[0]["cc_mask"]
    assert abs(cc) < 0.1 and "the model hardly matches the map" in caplog.text


def test_per_residue_cc_in_chunks_of_atoms_is_the_whole(rng):
    """Atoms taken a few residues at a time (memory) give each residue the CC of all its
    atoms' points at once, each point once, as a direct sum does."""
    model, data, spec = make_example()
    other = data + rng.normal(scale=0.5 * data.std(), size=data.shape)
    xyz = model.xyz + rng.normal(scale=0.3, size=model.xyz.shape)
    args = (data, other, xyz, model.residue_index, len(model.residues), spec, 2.5)
    whole = per_residue_cc(*args, chunk_atoms=10 ** 9)
    for chunk in (1, 7, 20):
        np.testing.assert_allclose(per_residue_cc(*args, chunk_atoms=chunk), whole, atol=1e-12)
    r = 3
    g = spec.index_coordinates(xyz[model.residue_index == r])
    pts = np.indices(spec.shape).reshape(3, -1).T
    d = ((pts[:, None, :] - g[None]) @ spec.xyz_from_index.T)
    near = ((d * d).sum(-1) < 2.5 ** 2).any(axis=1)
    x, y = data.reshape(-1)[near], other.reshape(-1)[near]
    assert whole[r] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-9)


def test_molecular_masks_in_a_box_are_the_maps():
    """On a map much larger than the models each mask is made in a box around them and set
    into the map: the same points as made on the whole map."""
    model = gr.Model.from_gemmi(gr.examples.helix_structure())
    _, spec = gr.examples.simulated_map(model, 3.0, backend="numpy", padding=25.0)
    xyz = np.stack([model.xyz, model.xyz + 1.5])
    got = molecular_masks(model, xyz, spec)
    want = np.stack([molecular_mask(model, x, spec) for x in xyz])
    assert got.shape == want.shape and want.sum() > 1000
    assert np.array_equal(got, want)


def test_ccs_of_model_maps_made_in_a_box_are_the_whole_maps(backend, rng):
    """CCmask and CCbox from model maps and masks of a box (zero beyond it) equal those of the
    same maps set into the whole map."""
    xp = backend.xp
    exp_map = rng.normal(loc=0.3, size=(40, 36, 44))
    lo, hi = np.array([5, 7, 9]), np.array([29, 27, 35])
    inner = tuple(slice(a, b) for a, b in zip(lo, hi))
    maps = rng.normal(size=(3,) + tuple(hi - lo)) + 0.5 * exp_map[inner][None]
    masks = rng.random(maps.shape) < 0.4
    whole_maps, whole_masks = np.zeros((3,) + exp_map.shape), np.zeros((3,) + exp_map.shape, bool)
    whole_maps[(slice(None),) + inner], whole_masks[(slice(None),) + inner] = maps, masks
    got = mask_and_box_cc(xp, xp.asarray(exp_map), xp.asarray(maps), xp.asarray(masks),
                          inner)
    want = mask_and_box_cc(np, exp_map, whole_maps, whole_masks)
    for key in ("cc_mask", "cc_box"):
        assert 0.1 < want[key].min()
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10)


def test_model_box_only_where_it_is_much_smaller_than_the_map():
    model = gr.Model.from_gemmi(gr.examples.helix_structure())
    xyz = model.xyz[None]
    _, large = gr.examples.simulated_map(model, 3.0, backend="numpy", padding=25.0)
    lo, hi = model_box(large, xyz)
    box = box_spec(large, lo, hi)
    inside = box.index_coordinates(model.xyz)
    step = np.sqrt((box.index_from_xyz ** 2).sum(axis=1))
    # The model's edge lies 10 voxels inside by construction: allow for rounding, not a voxel.
    slack = 1e-6
    assert np.all(inside.min(axis=0) >= 10.0 * step - slack) and \
        np.all(inside.max(axis=0) <= np.asarray(box.shape) - 1 - 10.0 * step + slack)
    _, small = gr.examples.simulated_map(model, 3.0, backend="numpy", padding=8.0)
    assert model_box(small, xyz) is None                  # reaches past the faces
    assert model_box(large, xyz + 20.0) is None           # moved near a face
    assert model_box(large, xyz, cushion=20.0) is None    # over half of the map
    # Just room for the cushion along a (a voxel each side, so that no face sits on a grid
    # point), not for the FFT-friendly size the box grows to.
    for cushion in np.arange(10.0, 14.0, 0.1):
        elo, ehi = enclosing_box(large, xyz, cushion)
        m = int(ehi[0] - elo[0])
        if next_fast_len(m, real=True) >= m + 3:
            break
    n = m + 2
    thin = dataclasses.replace(large, shape=(n,) + tuple(large.shape[1:]),
                               sampling=(n,) + tuple(large.sampling[1:]),
                               cell=(n * large.voxel_size[0],) + tuple(large.cell[1:]),
                               origin=tuple(large.origin_xyz
                                            + (elo[0] - 1) * large.xyz_from_index[:, 0]))
    inner_lo, inner_hi = enclosing_box(thin, xyz, cushion)
    assert inner_lo[0] >= 0 and inner_hi[0] <= n               # room for the cushion ...
    grown_lo, grown_hi = box_indices(thin, xyz, cushion)
    assert grown_lo[0] < 0 or grown_hi[0] > n                  # ... not for the grown box
    assert model_box(thin, xyz, cushion) is None


def test_correlation_is_pearsons_in_float64(backend, rng):
    """float32 maps far from zero mean (deviations 1e-3 of the mean): the CC of each row, and
    over each row's selected points, as float64 np.corrcoef gives it."""
    x = (1000.0 + rng.normal(size=(3, 50000))).astype(np.float32)
    y = (0.5 * (x - 1000.0) + rng.normal(size=x.shape) - 2000.0).astype(np.float32)
    pick = rng.random(x.shape) < 0.3
    xp = backend.xp
    got = backend.to_numpy(correlation(xp, xp.asarray(x), xp.asarray(y)))
    got_w = backend.to_numpy(correlation(xp, xp.asarray(x), xp.asarray(y), xp.asarray(pick)))
    for i in range(3):
        want = np.corrcoef(x[i].astype(np.float64), y[i].astype(np.float64))[0, 1]
        want_w = np.corrcoef(x[i, pick[i]].astype(np.float64),
                             y[i, pick[i]].astype(np.float64))[0, 1]
        assert 0.3 < want < 0.6
        assert abs(got[i] - want) < 1e-7 and abs(got_w[i] - want_w) < 1e-7
