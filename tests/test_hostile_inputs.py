"""Bad or hostile input as a user gives it, grouped by the rule each case falls under:

1. every number a user gives (parameters, map header fields, coordinates, B, U, occupancy) is
   checked for being finite and in a physical range before any allocation or work;
2. piles of atoms (copies at one spot) are refused in seconds, not squared in memory;
3. every result that will be reported is finite, or the run stops with exit 1 and says where;
4. the command line says what is wrong in one line, with the documented exit code;
5. a failed or interrupted run leaves its log, which says why, and nothing else; one run owns
   an output prefix at a time.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import gemmi
import mrcfile
import numpy as np
import pytest

import gpu_refine as gr
from gpu_refine.cli import rsr_cmd
from gpu_refine.errors import InputError, ResultError
from gpu_refine.examples import helix_structure
from gpu_refine.io import output_lock
from gpu_refine.workflows.rsr import RealSpaceRefinement, check_finite_result
from helpers import cli, one_line_error

FAST = ("macro_cycles=1", "weight=50", "regularize_iterations=0", "sites_iterations=3",
        "adp_iterations=2", "backend=numpy")


@pytest.fixture(scope="module")
def ex(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    rc, _, err = cli("example", f"directory={d}", "backend=numpy")
    assert rc == 0, err
    return d


def _model(tmp_path, name, edit):
    st = helix_structure()
    edit(st)
    path = tmp_path / name
    st.setup_entities()
    st.make_mmcif_document().write_file(str(path))
    return path


def _map(ex, tmp_path, name, edit_header=None, raw=None):
    path = tmp_path / name
    path.write_bytes((ex / "helix_3A.mrc").read_bytes())
    if edit_header:
        with mrcfile.open(path, "r+", permissive=True) as m:
            edit_header(m.header)
    if raw:
        data = bytearray(path.read_bytes())
        for offset, value in raw.items():
            data[offset:offset + 4] = np.int32(value).tobytes()
        path.write_bytes(bytes(data))
    return path


# 1. Numbers a user gives --------------------------------------------------------------------

def test_map_headers_are_checked_before_anything_is_allocated(ex, tmp_path):
    model = ex / "helix.cif"

    def cell(value):
        def edit(h):
            h.cella = (value, value, value)
        return edit
    for name, path, words in (
            ("cell 1e30", _map(ex, tmp_path, "big.mrc", cell(1e30)), "larger than any map"),
            ("NaN cell", _map(ex, tmp_path, "nan.mrc", cell(np.nan)), "not finite"),
            ("no points", _map(ex, tmp_path, "zero.mrc", raw={0: 0}), "has no points"),
            ("NSYMBT 1e9", _map(ex, tmp_path, "ext.mrc", raw={92: 10 ** 9}),
             "header asks for")):
        for command in ("validate", "rsr"):
            rc, _, err = cli(command, model, path, "resolution=3",
                             f"output.prefix={tmp_path / 'p'}", *FAST[-1:]) \
                if command == "rsr" else cli(command, model, path, "resolution=3")
            one_line_error(rc, err)
            assert words in err, (name, err)
    assert not list(tmp_path.glob("p*"))


@pytest.mark.parametrize("case", ["b_1e6", "anisou_negative", "x_1e20"])
def test_atom_values_outside_physics_are_refused_naming_the_atom(ex, tmp_path, case):
    def b_1e6(st):
        for cra in st[0].all():
            cra.atom.b_iso = 1e6

    def b_minus_500(st):
        st[0][0][0][0].b_iso = -500

    def anisou_negative(st):
        st[0][0][0][0].aniso = gemmi.SMat33f(-9, -9, -9, 0, 0, 0)

    def x_1e20(st):
        st[0][0][0][0].pos = gemmi.Position(1e20, 0, 0)
    path = _model(tmp_path, f"{case}.cif", locals()[case])
    emap = ex / "helix_3A.mrc"
    words = {"b_1e6": "B above", "b_minus_500": "B below", "anisou_negative":
             "far from positive-definite",
             "x_1e20": "from the origin"}[case]
    for args in (("map", path, "resolution=3", f"output={tmp_path / 'm.mrc'}"),
                 ("validate", path, emap, "resolution=3"),
                 ("rsr", path, emap, "resolution=3", "strategy=minimization_global",
                  f"output.prefix={tmp_path / 'p'}")):
        rc, _, err = cli(*args)
        one_line_error(rc, err)
        assert words in err and "A/ALA 1/N" in err, err
    assert not list(tmp_path.glob("p*")) and not (tmp_path / "m.mrc").exists()


def test_a_huge_coordinate_is_one_line_with_no_warnings(ex, tmp_path):
    """In a real process: no RuntimeWarning lines before the error."""
    path = _model(tmp_path, "far.cif",
                  lambda st: setattr(st[0][0][0][0], "pos", gemmi.Position(1e20, 0, 0)))
    rc, _, err = cli("map", path, "resolution=3", f"output={tmp_path / 'm.mrc'}", child=True)
    one_line_error(rc, err)


def test_a_deposited_u_just_short_of_positive_definite_is_taken_with_a_warning(tmp_path,
                                                                             caplog):
    """As in 5e5z: a U whose smallest eigenvalue is a little below 0 (no displacement has
    it, but deposited files do): a warning naming the atom, and a finite model map."""
    def tilt(st):
        st[0][0][1][1].aniso = gemmi.SMat33f(1e-4, 0.002, 0.0024, 4e-4, 4e-4, 0.0022)
    model = gr.read_model(_model(tmp_path, "tilt.cif", tilt))
    assert "A/GLU 2/CA ANISOU" in caplog.text and "not positive-definite" in caplog.text
    maps, _ = gr.workflows.compute_model_map(gr.Batch.from_model(model, backend="numpy",
                                                                 dtype=np.float64), 3.0)
    assert np.isfinite(maps).all() and maps.max() > 0


def test_altloc_occupancies_over_1_are_pointed_out(ex, tmp_path, caplog):
    def split(st):
        res = st[0][0][4]
        copies = [a.clone() for a in res]
        for a in res:
            a.altloc, a.occ = "A", 0.9
        for a in copies:
            a.altloc, a.occ = "B", 0.9
            a.pos = a.pos + gemmi.Position(0.3, 0, 0)
            res.add_atom(a)
    path = _model(tmp_path, "alt.cif", split)
    rc, out, err = cli("validate", path, ex / "helix_3A.mrc", "resolution=3")
    assert rc == 0, err
    assert "add up to more than 1: A/ALA 5 (1.80)" in out


@pytest.mark.parametrize("args, words", [
    (("resolution=3", "atom_radius=1e6"), "atom_radius=1e+06 Å is out of range"),
    (("resolution=abc",), "invalid float value"),
    (("resolution=nan",), "not plausible"),
])
def test_validate_parameters_are_bounded(ex, args, words):
    rc, _, err = cli("validate", ex / "helix.cif", ex / "helix_3A.mrc", *args)
    one_line_error(rc, err)
    assert words in err and "gpu-refine: error: gpu-refine" not in err, err


@pytest.mark.parametrize("arg, words", [
    ("weight=abc", "weight must be a number"),
    ("resolution=abc", "invalid float value"),
    ("nmodels=10000000", "nmodels=1e+07 is out of range"),
    ("shake=1e9", "shake=1e+09 Å is out of range"),
    ("mask_radius=1e6", "mask_radius=1e+06 Å is out of range"),
    ("cushion=nan", "cushion=nan Å is out of range"),
])
def test_rsr_parameters_are_bounded(ex, tmp_path, arg, words):
    given = ("resolution=3", arg) if not arg.startswith("resolution") else (arg,)
    rc, _, err = cli("rsr", ex / "helix.cif", ex / "helix_3A.mrc", *given,
                     f"output.prefix={tmp_path / 'p'}")
    one_line_error(rc, err)
    assert words in err, err
    assert not list(tmp_path.glob("p*"))


# 2. Piles of atoms --------------------------------------------------------------------------

def _waters_at_one_point(n):
    def add(st):
        chain = gemmi.Chain("W")
        for k in range(n):
            res = gemmi.Residue()
            res.name, res.seqid = "HOH", gemmi.SeqId(k + 1, " ")
            atom = gemmi.Atom()
            atom.name, atom.element, atom.occ, atom.b_iso = "O", gemmi.Element("O"), 1.0, 30.0
            atom.pos = gemmi.Position(20.0, 20.0, 20.0)
            res.add_atom(atom)
            chain.add_residue(res)
        st[0].add_chain(chain)
    return add


def test_a_pile_of_waters_is_refused_by_geometry_and_rsr(ex, tmp_path):
    path = _model(tmp_path, "w.cif", _waters_at_one_point(10000))
    rc, _, err = cli("geometry", path)
    one_line_error(rc, err)
    assert "packed more densely than in any molecule" in err and "W/HOH 1/O" in err
    rc, _, err = cli("rsr", path, ex / "helix_3A.mrc", "resolution=3",
                     f"output.prefix={tmp_path / 'p'}")
    one_line_error(rc, err)
    assert not list(tmp_path.glob("p*"))


def test_copies_of_one_atom_are_refused_by_validate(ex, tmp_path):
    def copies(st):
        res = st[0][0][0]
        atom = res[0].clone()
        for _ in range(100000):
            res.add_atom(atom)
    path = _model(tmp_path, "copies.cif", copies)
    rc, _, err = cli("validate", path, ex / "helix_3A.mrc", "resolution=3")
    one_line_error(rc, err)
    assert "lie on each other" in err and "A/ALA 1/N" in err


# 3. Results are finite ----------------------------------------------------------------------

def _stub_run(job_result):
    def run(self, progress=None):
        return job_result(self)
    return run


def _refine_once(ex):
    model = gr.read_model(ex / "helix.cif")
    job = RealSpaceRefinement(model, gr.read_map(ex / "helix_3A.mrc"),
                              gr.RSRSettings(resolution=3.0, macro_cycles=1, weight=50.0,
                                             regularize_iterations=0, sites_iterations=2,
                                             strategy="minimization_global"),
                              backend="numpy")
    return job.run()


def test_a_non_finite_result_names_the_model_and_atom(ex):
    result = _refine_once(ex)
    check_finite_result(result)
    result.batch.xyz[0, 7, 1] = np.nan
    with pytest.raises(ResultError, match=r"non-finite coordinate in model 1 at A/\w+ \d+/"):
        check_finite_result(result)
    result.batch.xyz[0, 7, 1] = 0.0
    result.stats[0]["cc_mask_final"] = float("nan")
    with pytest.raises(ResultError, match="non-finite cc_mask_final for model 1"):
        check_finite_result(result)


def test_rsr_writes_nothing_but_its_log_when_a_result_is_not_finite(ex, tmp_path, monkeypatch):
    result = _refine_once(ex)
    result.batch.b[0, 3] = np.inf
    monkeypatch.setattr(RealSpaceRefinement, "run", _stub_run(lambda job: result))
    rc, _, err = cli("rsr", ex / "helix.cif", ex / "helix_3A.mrc", "resolution=3",
                     f"output.prefix={tmp_path / 'p'}", *FAST)
    one_line_error(rc, err)
    assert "non-finite B in model 1" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.log"]
    assert (tmp_path / "p.log").read_text().splitlines()[-1].startswith(
        "gpu-refine: stopped: error: the run produced a non-finite B")


# 4. The command line ------------------------------------------------------------------------

@pytest.mark.parametrize("args, key", [
    (("resolution=3", "resolution=4"), "resolution"),
    (("--resolution", "3", "resolution=5"), "resolution"),
    (("resolution=3", "output.prefix=a", "output.prefix=b"), "output.prefix"),
])
def test_a_key_given_twice_is_a_usage_error(ex, args, key):
    rc, _, err = cli("rsr", ex / "helix.cif", ex / "helix_3A.mrc", *args)
    one_line_error(rc, err, code=2)
    assert f"parameter {key} is given twice" in err


def test_a_typed_value_overrides_a_params_file_and_says_so(ex, tmp_path):
    params = tmp_path / "run.params"
    params.write_text(f"{ex / 'helix.cif'}\n{ex / 'helix_3A.mrc'}\nresolution=3\nmacro_cycles=4\n"
                      "weight=50\nregularize_iterations=0\nsites_iterations=2\n"
                      "adp_iterations=1\n")
    rc, out, err = cli("rsr", params, "macro_cycles=1", "backend=numpy",
                       f"output.prefix={tmp_path / 'o'}")
    assert rc == 0, err
    assert "macro_cycles=1 overrides macro_cycles=4 of run.params" in out
    assert "macro-cycle 1/1" in out


def test_usage_goes_to_stderr():
    rc, out, err = cli(child=True)
    assert rc == 2 and out == "" and "usage: gpu-refine" in err


def test_outputs_dictionaries_and_environment_are_checked(ex, tmp_path, monkeypatch):
    model, emap = ex / "helix.cif", ex / "helix_3A.mrc"
    rc, _, err = cli("map", model, emap, "resolution=3", f"output={tmp_path / 'm.cif'}")
    one_line_error(rc, err)
    assert "written as a map file" in err and not (tmp_path / "m.cif").exists()
    (tmp_path / "empty.cif").write_text("")
    for dictionary in (tmp_path / "empty.cif", model):
        rc, _, err = cli("geometry", model, f"dictionary={dictionary}")
        one_line_error(rc, err)
        assert "defines no monomer" in err
    for value in ("abc", "0", "-2"):
        monkeypatch.setenv("GPU_REFINE_THREADS", value)
        rc, _, err = cli("validate", model, emap, "resolution=3")
        one_line_error(rc, err)
        assert "GPU_REFINE_THREADS" in err


# 5. Failed runs and concurrent ones ---------------------------------------------------------

def _rsr(ex, tmp_path, *extra):
    return cli("rsr", ex / "helix.cif", ex / "helix_3A.mrc", "resolution=3",
               f"output.prefix={tmp_path / 'p'}", *FAST, *extra)


def test_an_interrupted_run_leaves_a_log_that_says_so_and_does_not_block_the_rerun(
        ex, tmp_path, monkeypatch):
    def interrupted(job):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(RealSpaceRefinement, "run", _stub_run(interrupted))
        rc, _, err = _rsr(ex, tmp_path)
    assert rc == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.log"]
    assert (tmp_path / "p.log").read_text().splitlines()[-1] == "gpu-refine: stopped: interrupted"
    rc, _, err = _rsr(ex, tmp_path)
    assert rc == 0, err
    log_text = (tmp_path / "p.log").read_text()
    assert "replaces the log of a run that stopped" in log_text
    assert "gpu-refine: stopped" not in log_text


def test_a_write_that_fails_removes_what_the_run_wrote(ex, tmp_path, monkeypatch):
    def full_disk(path, data, overwrite=False):
        raise InputError(f"cannot write {path}: No space left on device")
    monkeypatch.setattr(rsr_cmd, "write_atomically", full_disk)
    rc, _, err = _rsr(ex, tmp_path)
    one_line_error(rc, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.log"]
    last = (tmp_path / "p.log").read_text().splitlines()[-1]
    assert "No space left on device" in last and "removed" in last and "p.cif" in last


def test_sigterm_stops_a_run_as_ctrl_c_does(ex, tmp_path):
    args = [sys.executable, "-m", "gpu_refine", "rsr", str(ex / "helix.cif"),
            str(ex / "helix_3A.mrc"), "resolution=3", "nmodels=8", "shake=0.3",
            "backend=numpy", f"output.prefix={tmp_path / 'p'}"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "p.log").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal came")
    assert proc.returncode == 143 and err.strip() == "gpu-refine: terminated", err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.log"]
    assert (tmp_path / "p.log").read_text().splitlines()[-1] == "gpu-refine: stopped: terminated"


def test_one_run_owns_a_prefix(ex, tmp_path):
    with output_lock(tmp_path / "p") as lock:
        assert str(os.getpid()) in open(lock).read()
        rc, _, err = _rsr(ex, tmp_path, "--overwrite")
        one_line_error(rc, err)
        assert "being written by process" in err
    assert not (tmp_path / "p.lock").exists()
    # A lock whose process is gone is taken over.
    (tmp_path / "p.lock").write_text(f"{2 ** 22 + 12345} {socket.gethostname()}\n")
    rc, _, err = _rsr(ex, tmp_path)
    assert rc == 0, err
    assert not (tmp_path / "p.lock").exists()


def test_outputs_have_the_umask_mode(ex, tmp_path):
    old = os.umask(0o022)
    try:
        rc, _, err = _rsr(ex, tmp_path, "output.pdb=true")
    finally:
        os.umask(old)
    assert rc == 0, err
    for path in tmp_path.iterdir():
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path.name


def test_validate_of_a_flat_map_stops_instead_of_reporting_nan(ex, tmp_path):
    path = tmp_path / "flat.mrc"
    path.write_bytes((ex / "helix_3A.mrc").read_bytes())
    with mrcfile.open(path, "r+") as m:
        m.data[...] = 1.0
    rc, out, err = cli("validate", ex / "helix.cif", path, "resolution=3",
                       f"json={tmp_path / 'v.json'}")
    one_line_error(rc, err)
    assert "non-finite cc_mask in model 1" in err and "the map is flat" in out
    assert not (tmp_path / "v.json").exists()


def test_an_atom_far_from_its_neighbours_stops_rsr_naming_it(ex, tmp_path):
    """One atom 5,000 Å away (inside the coordinate range): a refinement would report bonds
    of 446 Å rmsd as a success; it is refused with the bond and its length."""
    path = _model(tmp_path, "far.cif", lambda st: setattr(
        st[0][0][0][0], "pos", st[0][0][0][0].pos + gemmi.Position(5000, 0, 0)))
    rc, _, err = cli("rsr", path, ex / "helix_3A.mrc", "resolution=3",
                     f"output.prefix={tmp_path / 'p'}")
    one_line_error(rc, err)
    assert "the bond A/ALA 1/N - A/ALA 1/CA is" in err and "Å long" in err
    assert not list(tmp_path.glob("p*"))
