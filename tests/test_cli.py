"""The command line as a user runs it: outputs, one-line errors, exit codes."""
import dataclasses
import json
import os

import gemmi
import mrcfile
import numpy as np
import pytest

import gpu_refine as gr
from gpu_refine.cli import rsr_cmd
from gpu_refine.cli.main import build_parser
from gpu_refine.cli.params import translate
from gpu_refine.examples import helix_structure
from gpu_refine.workflows.rsr import RSRSettings
from helpers import cli, crystal_map, write_mtz


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    d = tmp_path_factory.mktemp("ex")
    rc, out, err = cli("example", f"directory={d}", "--backend", "numpy", child=True)
    assert rc == 0, err
    return d


def test_validate_and_map(example, tmp_path):
    rc, out, err = cli("validate", example / "helix.cif", example / "helix_3A.mrc",
                       "resolution=3", f"json={tmp_path / 'v.json'}", "backend=numpy",
                       child=True)
    assert rc == 0, err
    assert "CCmask" in out and "device:" in out and "command: gpu-refine validate" in out
    r = json.loads((tmp_path / "v.json").read_text())
    assert set(r) >= {"cc_mask", "cc_box", "cc_peaks", "cc_volume", "per_residue"}
    assert r["cc_mask"] > 0.8
    assert r["per_residue"][0].keys() >= {"chain", "resseq", "resname", "cc"}
    rc, out, err = cli("map", example / "helix.cif", example / "helix_3A.mrc", "--resolution",
                       "3", "--output", tmp_path / "mm.mrc", "table=electron")
    assert rc == 0, err
    mm = gr.read_map(tmp_path / "mm.mrc")
    ex = gr.read_map(example / "helix_3A.mrc")
    assert mm.spec == ex.spec
    assert np.corrcoef(mm.data.ravel(), ex.data.ravel())[0, 1] > 0.9
    # Several MODELs are an ensemble: the map written is the mean of theirs.
    st = helix_structure()
    st.add_model(st[0].clone())
    st[1].num = 2
    for cra in st[1].all():
        cra.atom.pos = cra.atom.pos + gemmi.Position(1.5, 0, 0)
    st.write_pdb(str(tmp_path / "two.pdb"))
    rc, out, err = cli("map", tmp_path / "two.pdb", example / "helix_3A.mrc", "resolution=3",
                       f"output={tmp_path / 'two.mrc'}")
    assert rc == 0, err
    assert "(the mean of 2 models)" in out
    each, _ = gr.workflows.compute_model_map(gr.read_batch(tmp_path / "two.pdb"), 3.0, ex.spec)
    np.testing.assert_allclose(gr.read_map(tmp_path / "two.mrc").data, each.mean(axis=0),
                               atol=1e-5 * np.abs(each).max())


def _one_line_error(rc, err):
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("gpu-refine: error:")
    assert "Traceback" not in err


def test_bad_inputs(example, tmp_path):
    model, emap = example / "helix.cif", example / "helix_3A.mrc"
    rc, _, err = cli("validate", tmp_path / "missing.pdb", emap, "resolution=3", child=True)
    _one_line_error(rc, err)
    assert "not found" in err
    (tmp_path / "model.xyz").write_text("nothing")
    rc, _, err = cli("validate", tmp_path / "model.xyz", emap, "resolution=3")
    _one_line_error(rc, err)
    assert "unknown model format" in err
    rc, _, err = cli("rsr", emap, model, "resolution=3", f"output.prefix={tmp_path / 'swap'}")
    _one_line_error(rc, err)
    assert "unknown model format" in err and "named as a map file" in err
    (tmp_path / "empty.pdb").write_text("END\n")
    rc, _, err = cli("validate", tmp_path / "empty.pdb", emap, "resolution=3")
    _one_line_error(rc, err)
    (tmp_path / "empty.cif").write_text("data_x\n")
    rc, _, err = cli("geometry", tmp_path / "empty.cif")
    _one_line_error(rc, err)
    assert "has no atoms" in err
    (tmp_path / "cut.mrc").write_bytes(emap.read_bytes()[:5000])
    rc, _, err = cli("validate", model, tmp_path / "cut.mrc", "resolution=3")
    _one_line_error(rc, err)
    assert "truncated file" in err
    rc, _, err = cli("validate", model, emap, "resolutoin=3")
    _one_line_error(rc, err)
    assert "did you mean resolution" in err
    rc, _, err = cli("validate", model, emap)
    _one_line_error(rc, err)
    assert "resolution is required" in err
    rc, _, err = cli("validate", model, emap, "resolution=-2")
    _one_line_error(rc, err)
    # NaN in the map
    with mrcfile.open(emap) as m:
        data = m.data.copy()
        voxel = m.voxel_size.copy()
    data[1, 2, 3] = np.nan
    with mrcfile.new(tmp_path / "nan.mrc") as m:
        m.set_data(data)
        m.voxel_size = voxel
    rc, _, err = cli("validate", model, tmp_path / "nan.mrc", "resolution=3")
    _one_line_error(rc, err)
    assert "NaN" in err
    # A model far from the map box
    st = helix_structure("AAA")
    for c in st[0].all():
        c.atom.pos = c.atom.pos + gr.model.gemmi.Position(500, 0, 0)
    st.write_pdb(str(tmp_path / "far.pdb"))
    rc, _, err = cli("validate", tmp_path / "far.pdb", emap, "resolution=3")
    _one_line_error(rc, err)
    assert "does not overlap" in err
    # Outputs are not silently replaced
    (tmp_path / "taken.mrc").write_text("keep me")
    rc, _, err = cli("map", model, "resolution=3", f"output={tmp_path / 'taken.mrc'}")
    _one_line_error(rc, err)
    assert (tmp_path / "taken.mrc").read_text() == "keep me"
    # ... and an input is not replaced, even with --overwrite
    (tmp_path / "m.cif").write_bytes(model.read_bytes())
    for args in (("rsr", tmp_path / "m.cif", emap, f"output.prefix={tmp_path / 'm'}",
                  "resolution=3"),
                 ("map", tmp_path / "m.cif", emap, f"output={emap}", "resolution=3"),
                 ("geometry", tmp_path / "m.cif", f"json={tmp_path / 'm.cif'}")):
        rc, _, err = cli(*args, "--overwrite")
        _one_line_error(rc, err)
        assert "would replace the input" in err
    assert (tmp_path / "m.cif").read_bytes() == model.read_bytes()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_outputs_that_cannot_be_written_are_refused_before_the_work(example):
    """A place where no file can be made (/proc): each command says so in one line before
    it computes anything (no statistics logged, no log file begun)."""
    model, emap = example / "helix.cif", example / "helix_3A.mrc"
    for args in (("validate", model, emap, "resolution=3", "json=/proc/v.json"),
                 ("geometry", model, "json=/proc/g.json"),
                 ("map", model, "resolution=3", "output=/proc/m.mrc"),
                 ("rsr", model, emap, "resolution=3", "output.prefix=/proc/x"),
                 ("example", "directory=/proc/example")):
        rc, out, err = cli(*args, "backend=numpy")
        _one_line_error(rc, err)
        assert "cannot write /proc/" in err or "cannot create output directory" in err, err
        assert "CCmask" not in out and "rmsZ" not in out and "macro-cycle" not in out


def test_usage_errors_exit_2(example):
    for argv in (("rsr",), ("nonsense",), ("validate", example / "helix.cif")):
        rc, _, err = cli(*argv)
        _one_line_error(rc, err)
        assert rc == 2, argv
    rc, _, err = cli("rsr", example / "helix.cif", example / "helix_3A.mrc", "resolution=3",
                     "strategy=minimization_global+adpp")
    _one_line_error(rc, err)
    assert rc == 1 and "unknown strategy 'adpp'" in err


def test_geometry(example, tmp_path):
    rc, out, err = cli("geometry", example / "helix.cif", f"json={tmp_path / 'g.json'}",
                       "backend=numpy")
    assert rc == 0, err
    assert "bonds" in out and "built-in" in out
    r = json.loads((tmp_path / "g.json").read_text())
    assert {"rmsd_bonds", "rmsd_angles", "rmsz_bonds", "rmsz_angles", "n_bonds", "n_angles",
            "n_torsions", "n_chirals", "n_planes", "outliers"} <= set(r)
    assert r["n_bonds"] > 100 and r["rmsd_bonds"] < 0.02
    rc, _, err = cli("geometry", example / "helix.cif", f"monlib={tmp_path / 'none'}")
    _one_line_error(rc, err)
    assert "monomer library directory not found" in err


def test_rsr(example, tmp_path):
    model, emap = example / "helix.cif", example / "helix_3A.mrc"
    prefix = tmp_path / "h"
    args = ("rsr", model, emap, "resolution=3", "nmodels=2", "shake=0.3", "macro_cycles=2",
            f"output.prefix={prefix}", "backend=numpy", "output.pdb=true")
    rc, out, err = cli(*args)
    assert rc == 0, err
    assert "macro-cycle 2/2" in out and "automatic weight" in out
    for ext in (".cif", "_best.cif", ".pdb", "_best.pdb", ".log", ".json", ".params"):
        assert (tmp_path / ("h" + ext)).is_file(), ext
    assert len(gr.model.gemmi.read_structure(str(tmp_path / "h_best.pdb"))) == 1
    log_text = (tmp_path / "h.log").read_text()
    assert log_text.startswith("gpu-refine ") and "command: gpu-refine rsr" in log_text
    assert "macro-cycle 1/2" in log_text
    assert "map box" in log_text.splitlines()[2]     # held while setting up, then written
    r = json.loads((tmp_path / "h.json").read_text())
    assert len(r["models"]) == 2
    assert set(r["phases"]) == {"statistics", "start", "weight", "macro-cycles"}
    assert "time: statistics" in log_text
    for m in r["models"]:
        assert {"cc_mask_start", "cc_mask_final", "cc_box_final", "rmsd_bonds", "rmsd_angles",
                "weight", "iterations", "time"} <= set(m)
        assert m["cc_mask_final"] > m["cc_mask_start"]
        assert m["rmsd_bonds"] < 0.02
    st = gr.model.gemmi.read_structure(str(tmp_path / "h.cif"))
    ref = gr.read_model(model)
    assert len(st) == 2 and st[0].count_atom_sites() == ref.n_atoms
    assert [a.atom.name for a in st[0].all()] == [a.atom.name for a in ref.structure[0].all()]
    # Outputs are kept unless --overwrite; the .params file reruns the job.
    before = (tmp_path / "h.json").read_text()
    rc, _, err = cli(*args)
    _one_line_error(rc, err)
    assert (tmp_path / "h.json").read_text() == before
    params = (tmp_path / "h.params").read_text()
    assert "strategy=minimization_global+resolution_annealing+adp" in params
    assert str(model.resolve()) in params
    # (into a directory that does not exist yet: it is made)
    rc, out, err = cli("rsr", tmp_path / "h.params",
                       f"output.prefix={tmp_path / 'new' / 'again'}", "macro_cycles=1",
                       "backend=numpy")
    assert rc == 0, err
    assert "macro-cycle 1/1" in out and (tmp_path / "new" / "again.json").is_file()
    rc, _, err = cli("rsr", model, emap, "resolution=3", "strategy=sites+adp",
                     f"output.prefix={tmp_path / 'bad'}")
    _one_line_error(rc, err)
    assert "unknown strategy" in err
    # A rejected run writes nothing, so the corrected command runs without --overwrite.
    assert not list(tmp_path.glob("bad*"))
    rc, _, err = cli("rsr", model, tmp_path / "missing.mrc", "resolution=3",
                     f"output.prefix={tmp_path / 'bad'}")
    _one_line_error(rc, err)
    assert not list(tmp_path.glob("bad*"))
    # ... also when the problem is found while setting up: a residue without a dictionary, a
    # model outside the map.
    st = helix_structure("AAA")
    st[0][0][1].name = "XYZ"
    st.write_pdb(str(tmp_path / "unknown.pdb"))
    st = helix_structure("AAA")
    for c in st[0].all():
        c.atom.pos = c.atom.pos + gr.model.gemmi.Position(500, 0, 0)
    st.write_pdb(str(tmp_path / "far.pdb"))
    for start, reason in ((tmp_path / "unknown.pdb", "no restraint dictionary for residue(s) XYZ"),
                          (tmp_path / "far.pdb", "does not overlap")):
        rc, _, err = cli("rsr", start, emap, "resolution=3", "backend=numpy",
                         f"output.prefix={tmp_path / 'bad'}")
        _one_line_error(rc, err)
        assert reason in err
        assert not list(tmp_path.glob("bad*"))


def test_pdb_output_of_a_model_the_pdb_format_cannot_hold(example, tmp_path):
    """output.pdb=true for a model with a long chain name (mmCIF) or residue name: one-line
    error before anything runs or is written; without it the mmCIF keeps the names."""
    st = gr.model.gemmi.read_structure(str(example / "helix.cif"))
    st[0][0].name = "LONG"
    st.setup_entities()
    st.make_mmcif_document().write_file(str(tmp_path / "long.cif"))
    args = ("rsr", tmp_path / "long.cif", example / "helix_3A.mrc", "resolution=3",
            "macro_cycles=1", "weight=100", "backend=numpy")
    rc, _, err = cli(*args, f"output.prefix={tmp_path / 'p'}", "output.pdb=true")
    _one_line_error(rc, err)
    assert "PDB format" in err and "LONG" in err and not list(tmp_path.glob("p*"))
    rc, _, err = cli(*args, f"output.prefix={tmp_path / 'c'}")
    assert rc == 0, err
    assert gr.model.gemmi.read_structure(str(tmp_path / "c.cif"))[0][0].name == "LONG"
    st[0][0].name = "A"
    st[0][0][0].name = "ALAXY"
    with pytest.raises(gr.InputError, match="residue name.*ALAXY"):
        gr.write_model(tmp_path / "x.pdb", st)
    assert not (tmp_path / "x.pdb").exists()


def test_every_rsr_setting_is_a_parameter_of_the_command(tmp_path):
    """Each field of RSRSettings can be given as key=value (dictionaries and ignore_unknown
    by their own options) and a run's .params file records it."""
    fields = {f.name for f in dataclasses.fields(RSRSettings)}
    assert fields == set(rsr_cmd.SETTINGS) | {"dictionaries", "ignore_unknown"}
    parser = build_parser()[1]["rsr"]
    given = {"mask_edge": "1.5", "weight_iterations": "7", "mask_radius": "2.5",
             "weight": "20.5", "monlib": str(tmp_path)}
    args = parser.parse_args(translate(["m.cif", "m.mrc", "resolution=3"]
                                       + [f"{k}={v}" for k, v in given.items()], parser))
    settings = RSRSettings(**{k: getattr(args, k) for k in rsr_cmd.SETTINGS})
    for key, value in given.items():
        assert str(getattr(settings, key)) == value, key
    args.labels = None
    lines = rsr_cmd._params_text(args, settings.check(), None).splitlines()
    for key, value in given.items():
        assert f"{key}={value}" in lines, key


def test_phenix_paths_and_suffixes_name_parameters():
    """A parameter is named by its own name, a unique suffix of it (prefix for output.prefix),
    or a phenix path ending with it; a misspelt one is refused with the close names."""
    parser = build_parser()[1]["rsr"]
    args = parser.parse_args(translate(
        ["m.cif", "m.mrc", "resolution=3", "prefix=run1", "refinement.macro_cycles=2",
         "pdb_interpretation.peptide_link.apply_all_trans=true"], parser))
    assert (args.prefix, args.macro_cycles, args.apply_all_trans) == ("run1", 2, True)
    with pytest.raises(gr.ParameterError, match="did you mean macro-cycles"):
        translate(["refinement.macro_cyles=2"], parser)


def test_rsr_of_an_ensemble_with_a_weight_grid(example, tmp_path):
    """A multi-model file is a batch of starts; weight=W1,W2 refines each with each weight;
    the .params file reruns the grid."""
    st = gr.model.gemmi.read_structure(str(example / "helix.cif"))
    second = st[0].clone()
    for k, cra in enumerate(second.all()):
        cra.atom.pos = cra.atom.pos + gr.model.gemmi.Position(0.2 * (-1) ** k, 0.1, -0.1)
    second.num = 2
    st.add_model(second)
    st.write_pdb(str(tmp_path / "two.pdb"))
    prefix = tmp_path / "g"
    rc, out, err = cli("rsr", tmp_path / "two.pdb", example / "helix_3A.mrc", "resolution=3",
                       "weight=2,8", "strategy=minimization_global", "macro_cycles=1",
                       "backend=numpy", f"output.prefix={prefix}")
    assert rc == 0, err
    assert "2 models, each a start" in out and "4 model(s) (2 start(s) x 2 weights)" in out
    r = json.loads((tmp_path / "g.json").read_text())
    assert [(m["start"], m["weight"]) for m in r["models"]] == [(1, 2.0), (1, 8.0), (2, 2.0),
                                                                (2, 8.0)]
    assert len(gr.model.gemmi.read_structure(str(tmp_path / "g.cif"))) == 4
    assert (tmp_path / "g_best.cif").is_file()
    assert "weight=2.0,8.0" in (tmp_path / "g.params").read_text().splitlines()
    rc, out, err = cli("rsr", tmp_path / "g.params", f"output.prefix={tmp_path / 'again'}",
                       "backend=numpy")
    assert rc == 0, err
    assert len(json.loads((tmp_path / "again.json").read_text())["models"]) == 4
    rc, _, err = cli("rsr", tmp_path / "two.pdb", example / "helix_3A.mrc", "resolution=3",
                     "weight=2,-8", f"output.prefix={tmp_path / 'bad'}")
    _one_line_error(rc, err)
    assert "weight must be positive" in err and not list(tmp_path.glob("bad*"))


def test_rsr_against_mtz_map_coefficients(tmp_path):
    """An X-ray user's inputs: a model and the map coefficients of its crystal (an MTZ whose
    columns are named with labels=; its d_min is the default resolution); the small cell is
    refined whole, with its mates."""
    st = helix_structure("AEAKA")
    model = gr.Model.from_gemmi(st)
    map_data = crystal_map(model, (18.0, 21.0, 24.0, 90.0, 104.0, 90.0), "P 1 21 1")
    write_mtz(tmp_path / "x.mtz", map_data, 3.0, (("F2", "F"), ("PHI2", "P")))
    st.write_pdb(str(tmp_path / "x.pdb"))
    prefix = tmp_path / "x_rsr"
    rc, out, err = cli("rsr", tmp_path / "x.pdb", tmp_path / "x.mtz",
                       "labels=F2,PHI2", "shake=0.3", "macro_cycles=1", "backend=numpy",
                       f"output.prefix={prefix}")
    assert rc == 0, err
    assert "F2,PHI2" in out and "the whole cell (P 1 21 1, symmetry mates included)" in out
    r = json.loads((tmp_path / "x_rsr.json").read_text())
    assert r["models"][0]["cc_mask_final"] > 0.95
    params = (tmp_path / "x_rsr.params").read_text()
    assert "labels=F2,PHI2" in params
    assert float(params.split("resolution=")[1].split()[0]) == pytest.approx(3.0, abs=0.01)
    rc, out, err = cli("validate", tmp_path / "x.pdb", tmp_path / "x.mtz", "labels=F2,PHI2",
                       "backend=numpy")
    assert rc == 0, err
    assert "map from" in (tmp_path / "x_rsr.log").read_text().splitlines()[2]
