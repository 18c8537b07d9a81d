"""Map-model CCs: the shared cryo-EM case against cctbx, and basic properties."""
import numpy as np
import pytest

import gpu_refine as gr
import gpu_refine.examples
from gpu_refine.examples import make_example
from gpu_refine.metrics import molecular_mask, molecular_masks
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
