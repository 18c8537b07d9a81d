"""Model and map reading/writing: atoms, order and names kept; axis order, NSTART and ORIGIN."""
import errno
import os

import gemmi
import mrcfile
import numpy as np
import pytest

import gpu_refine as gr
from gpu_refine.errors import InputError
from gpu_refine.examples import helix_structure
from gpu_refine.io import write_atomically
from gpu_refine.model import structures_as_models
from gpu_refine.restraints.topology import build_topology
from gpu_refine.workflows import validate
from helpers import crystal_map, write_mtz


def test_model_roundtrip_keeps_atoms_and_order(tmp_path, shared):
    model = gr.read_model(shared / "xray/4xof/4xof.pdb")
    assert model.is_aniso.sum() == 0 or model.u_aniso[model.is_aniso].any()
    batch = gr.Batch.from_model(model, 2, backend="numpy", dtype=np.float64)
    batch.xyz[1] += 0.5
    batch.b[1] += 3.0
    batch.occ[1] *= 0.5
    if batch.u is not None:
        batch.u[1] *= 1.5
    structures = batch.to_structures()
    atoms = list(structures[1][0].all())
    np.testing.assert_allclose([c.atom.b_iso for c in atoms], model.b + 3.0, atol=1e-4)
    np.testing.assert_allclose([c.atom.occ for c in atoms], model.occ * 0.5, atol=1e-6)
    aniso = np.flatnonzero(model.is_aniso)
    assert len(aniso) > 100
    np.testing.assert_allclose([atoms[i].atom.aniso.u11 for i in aniso],
                               1.5 * model.u_aniso[aniso, 0], rtol=1e-5)
    for ext in ("cif", "pdb"):
        gr.write_model(tmp_path / f"out.{ext}", structures_as_models(structures))
        back = gemmi.read_structure(str(tmp_path / f"out.{ext}"))
        assert len(back) == 2
        names = [(c.chain.name, c.residue.name, c.atom.name, c.atom.altloc) for c in back[1].all()]
        assert names == [(c.chain.name, c.residue.name, c.atom.name, c.atom.altloc)
                         for c in model.structure[0].all()]
        xyz = np.array([c.atom.pos.tolist() for c in back[1].all()])
        np.testing.assert_allclose(xyz, model.xyz + 0.5, atol=1e-3)
    with pytest.raises(gr.InputError, match="overwrite"):
        gr.write_model(tmp_path / "out.cif", structures[0])


def test_a_structure_read_by_gemmi_alone_keeps_its_polymer_links():
    """gemmi.read_structure of a PDB file sets up no entities, without which gemmi's topology
    links no polymer: Model.from_gemmi sets them up, as read_model does."""
    text = helix_structure().make_pdb_string()
    plain = gemmi.read_pdb_string(text)
    assert len(plain.entities) == 0
    links = build_topology(gr.Model.from_gemmi(plain)).links
    assert links["TRANS"] == len(plain[0][0]) - 1
    assert links == build_topology(gr.Model.from_gemmi(helix_structure())).links


def test_negative_b_is_flagged(caplog):
    st = helix_structure("AAK")
    atoms = list(st[0].all())
    atoms[0].atom.b_iso, atoms[1].atom.b_iso = -5.0, 0.0
    model = gr.Model.from_gemmi(st)
    assert model.b[0] == -5.0
    assert "1 atoms have B below 0 (lowest -5.0 Å²)" in caplog.text
    assert "occupancy" not in caplog.text


def test_occupancy_above_1_is_flagged_and_below_0_refused(caplog):
    st = helix_structure("AAK")
    atoms = list(st[0].all())
    atoms[4].atom.occ = 1.5
    gr.Model.from_gemmi(st)
    assert "1 atoms (e.g. A/ALA 1/CB occupancy 1.50) have occupancy above 1" in caplog.text
    atoms[6].atom.occ = -0.5
    with pytest.raises(InputError, match=r"1 atoms \(e.g. A/ALA 2/CA occupancy -0.50\) have "
                                         "occupancy below 0"):
        gr.Model.from_gemmi(st)


def test_read_batch_from_multimodel_file(tmp_path):
    st = helix_structure("AAK")
    m2 = st[0].clone()
    st.add_model(m2)
    st[1].num = 2
    for c in st[1].all():
        c.atom.pos = c.atom.pos + gemmi.Position(1, 0, 0)
    path = tmp_path / "two.pdb"
    st.write_pdb(str(path))
    batch = gr.read_batch(path, backend="numpy")
    assert batch.size == 2
    np.testing.assert_allclose(batch.xyz[1] - batch.xyz[0], [[1, 0, 0]] * 15, atol=1e-3)
    # Each model keeps its own ANISOU.
    for k, cra in enumerate(st[1].all()):
        cra.atom.aniso = gemmi.SMat33f(0.2 + 0.01 * k, 0.3, 0.4, 0.0, 0.01, 0.0)
    st.write_pdb(str(path))
    batch = gr.read_batch(path, backend="numpy")
    assert batch.u is not None and not batch.u[0].any()
    np.testing.assert_allclose(batch.u[1, :, 0], 0.2 + 0.01 * np.arange(15), atol=1e-4)
    # Model 2 with another atom, or with a B of NaN, is refused.
    bad = st.clone()
    bad[1][0][0][0].b_iso = float("nan")
    bad.write_pdb(str(path))
    with pytest.raises(gr.InputError, match="non-finite"):
        gr.read_batch(path)
    bad = st.clone()
    bad[1][0][0].remove_atom("CB", "\0")
    bad.write_pdb(str(path))
    with pytest.raises(gr.InputError, match="model 2 of .* has different atoms from model 1"):
        gr.read_batch(path)


@pytest.mark.parametrize("axes", [(1, 2, 3), (3, 1, 2), (2, 3, 1)])
def test_map_axis_order_nstart_origin(tmp_path, rng, axes):
    """A map written with any axis order reads back as the same [a, b, c] array and places
    the same grid point at the same position (by NSTART, or by ORIGIN when that is set)."""
    data_xyz = rng.normal(size=(6, 7, 8)).astype(np.float32)
    # File dims are (section, row, column) = axes (MAPS, MAPR, MAPC); axis 1 is X.
    file_data = np.ascontiguousarray(data_xyz.transpose(axes[2] - 1, axes[1] - 1, axes[0] - 1))
    sampling = (12, 14, 16)
    nstart_xyz = (2, 3, 4)
    path = tmp_path / "m.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(file_data)
        h = mrc.header
        h.mapc, h.mapr, h.maps = axes
        h.nxstart, h.nystart, h.nzstart = (nstart_xyz[axes[0] - 1], nstart_xyz[axes[1] - 1],
                                           nstart_xyz[axes[2] - 1])
        h.mx, h.my, h.mz = sampling
        h.cella = (24.0, 28.0, 32.0)
    m = gr.read_map(path)
    np.testing.assert_array_equal(m.data, data_xyz)
    assert m.spec.start == nstart_xyz and not m.spec.periodic
    np.testing.assert_allclose(m.spec.origin_xyz, [4.0, 6.0, 8.0])
    # Written back (X,Y,Z order) it is the same map.
    gr.write_map(tmp_path / "back.mrc", m.data, m.spec)
    m2 = gr.read_map(tmp_path / "back.mrc")
    np.testing.assert_array_equal(m2.data, m.data)
    assert m2.spec == m.spec


def test_shared_em_map_is_placed_by_origin(shared):
    m = gr.read_map(shared / "cryoem/emd2566_3j6b_chain9/2566_3J6B_9.mrc")
    np.testing.assert_allclose(m.spec.origin_xyz, [356.44, 155.44, 159.46], atol=1e-3)
    model = gr.read_model(shared / "cryoem/emd2566_3j6b_chain9/3J6B_9.pdb")
    assert m.spec.contains(model.xyz).all()
    assert m.data.shape == (35, 52, 47)


def test_mtz_map_coefficients(tmp_path):
    """FWT,PHWT of a crystal's map come back as a map on its whole cell with its space group,
    matching the model's map; other labels by name; clear errors for missing ones."""
    model = gr.Model.from_gemmi(helix_structure("AEAKA"))
    original = crystal_map(model, (18.0, 21.0, 24.0, 90.0, 104.0, 90.0), "P 1 21 1")
    write_mtz(tmp_path / "map.mtz", original, 3.0)
    read = gr.read_map(tmp_path / "map.mtz")
    assert read.spec.is_crystal and read.spec.spacegroup == "P 1 21 1"
    assert read.data.flags.c_contiguous and read.data.dtype == np.float32
    image = gr.ModelMapper(read.spec, 3.0).image(gr.Batch.from_model(model, 1,
                                                                     backend="numpy"))[0]
    assert np.corrcoef(np.asarray(image).ravel(), read.data.ravel())[0, 1] > 0.99
    write_mtz(tmp_path / "named.mtz", original, 3.0, (("F2", "F"), ("PHI2", "P")))
    with pytest.raises(gr.InputError, match="no map coefficients.*labels=F,PHI.*F2 \\(F\\)"):
        gr.read_map(tmp_path / "named.mtz")
    named = gr.read_map(tmp_path / "named.mtz", labels="F2,PHI2")
    np.testing.assert_allclose(named.data, read.data)
    with pytest.raises(gr.InputError, match="no amplitude PHI2 and phase F2"):
        gr.read_map(tmp_path / "named.mtz", labels="PHI2,F2")
    with pytest.raises(gr.ParameterError, match="F,PHI"):
        gr.read_map(tmp_path / "named.mtz", labels="F2")
    gr.write_map(tmp_path / "map.mrc", read.data, read.spec)
    with pytest.raises(gr.ParameterError, match="not an MTZ"):
        gr.read_map(tmp_path / "map.mrc", labels="F2,PHI2")


def test_shared_mtz_map_fits_the_deposited_model(shared):
    """4xof's 2mFo-DFc coefficients (FWT,PHWT, 1.15 Å): the deposited model fits its map."""
    emap = gr.read_map(shared / "xray/4xof/4xof.mtz")
    assert emap.spec.spacegroup == "P 21 21 21" and emap.spec.is_crystal
    result = validate(gr.read_model(shared / "xray/4xof/4xof.pdb"), emap, 1.15,
                      backend="numpy")
    assert result[0]["cc_mask"] > 0.9


def test_a_write_that_fails_leaves_nothing_and_says_why(tmp_path):
    """A full disk while writing: a one-line InputError naming the file; no temporary file
    is left and an existing output is kept."""
    target = tmp_path / "out.json"
    target.write_text("keep me")

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(InputError, match="cannot write .*out.json: No space left on device"):
        write_atomically(target, full, overwrite=True)
    assert target.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
