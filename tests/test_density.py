"""Model maps against gemmi's DensityCalculator, and the Fourier image's adjoint."""
import gemmi
import numpy as np
import pytest

import gpu_refine as gr
import gpu_refine.examples
from gpu_refine.density import DensitySettings, ModelMapper

CASES = [("xray/5e5z/5e5z.pdb", "xray", 1.5), ("xray/1l2h/1l2h.cif.gz", "xray", 2.0),
         ("xray/4hg7/4hg7.cif", "xray", 3.0), ("cryoem/emd2566_3j6b_chain9/3J6B_9.pdb", "electron", 2.0)]


@pytest.mark.parametrize("path,table,d", CASES)
def test_density_agrees_with_gemmi(shared, backend, path, table, d):
    model = gr.read_model(shared / path)
    st = model.structure
    if not st.cell.is_crystal():
        st.cell = gemmi.UnitCell(60, 70, 65, 90, 90, 90)
        st.spacegroup_hm = "P 1"
        model = gr.Model.from_gemmi(st)
    dc = gemmi.DensityCalculatorX() if table == "xray" else gemmi.DensityCalculatorE()
    dc.d_min = d
    dc.blur = 12.0
    dc.grid.setup_from(st)
    dc.put_model_density_on_grid(st[0])
    ref = np.array(dc.grid, copy=False)
    c = st.cell
    spec = gr.GridSpec(cell=(c.a, c.b, c.c, c.alpha, c.beta, c.gamma), sampling=ref.shape,
                       shape=ref.shape, spacegroup=st.spacegroup_hm)
    batch = gr.Batch.from_model(model, 2, backend=backend, dtype=np.float32)
    mapper = ModelMapper(spec, None, DensitySettings(table=table, blur=12.0), backend=backend)
    ours = backend.to_numpy(mapper.exact(batch, 12.0))
    for m in ours:
        rel = np.sqrt(((m - ref) ** 2).mean() / (ref**2).mean())
        assert rel <= 1e-3, rel


def test_image_adjoint_matches_finite_differences(backend, rng):
    """d/dx of sum(w * image(x)) through spread -> FFT filter -> inverse FFT."""
    model = gr.Model.from_gemmi(gr.examples.helix_structure("AEAK"))
    spec = gr.box_around(model.xyz, 0.8, 4.0)
    batch = gr.Batch.from_model(model, 2, backend=backend, dtype=np.float64)
    batch.xyz += backend.asarray(rng.normal(scale=0.2, size=batch.xyz.shape))
    mapper = ModelMapper(spec, 2.5, DensitySettings(blur=20.0, dtype="float64", cutoff=1e-9),
                         backend=backend)
    w = backend.asarray(rng.normal(size=(2,) + spec.shape))
    gx, gb, _, go = (None if a is None else backend.to_numpy(a)
                     for a in mapper.image_adjoint(batch, w))

    def total():
        return float(backend.to_numpy((mapper.image(batch) * w).sum()))

    for arr, grad, idx, h in ((batch.xyz, gx, (1, 3, 2), 1e-4), (batch.b, gb, (0, 5), 1e-3),
                              (batch.occ, go, (1, 7), 1e-4)):
        arr[idx] += h
        fp = total()
        arr[idx] -= 2 * h
        fm = total()
        arr[idx] += h
        assert grad[idx] == pytest.approx((fp - fm) / (2 * h), rel=2e-4, abs=1e-8)


def test_fourier_image_has_no_terms_beyond_resolution(backend):
    model = gr.Model.from_gemmi(gr.examples.helix_structure("AAAA"))
    spec = gr.box_around(model.xyz, 0.7, 4.0)
    mapper = ModelMapper(spec, 3.0, DensitySettings(dtype="float64"), backend=backend)
    img = mapper.image(gr.Batch.from_model(model, 1, backend=backend, dtype=np.float64))
    f = np.abs(np.fft.rfftn(backend.to_numpy(img)[0]))
    s2 = backend.to_numpy(spec.s2(backend.xp))
    assert f[s2 > 1 / 3.0**2 * 1.0001].max() < 1e-8 * f.max()
    assert f[s2 <= 1 / 3.0**2].max() > 0


def test_radii_follow_b_changed_in_place(backend):
    """The mapper keeps the last cutoff radii; B changed in place (as refinement does) gives
    the map a fresh mapper computes."""
    model = gr.Model.from_gemmi(gr.examples.helix_structure("AEAK"))
    spec = gr.box_around(model.xyz, 0.8, 4.0)
    batch = gr.Batch.from_model(model, 2, backend=backend)
    mapper = ModelMapper(spec, 2.5, DensitySettings(blur=20.0), backend=backend)
    before = backend.to_numpy(mapper.exact(batch, 20.0))
    batch.b[1] += 60.0
    after = backend.to_numpy(mapper.exact(batch, 20.0))
    fresh = ModelMapper(spec, 2.5, DensitySettings(blur=20.0), backend=backend)
    assert np.array_equal(after, backend.to_numpy(fresh.exact(batch, 20.0)))
    assert np.array_equal(after[0], before[0]) and not np.allclose(after[1], before[1])
