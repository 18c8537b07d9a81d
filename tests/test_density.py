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
    # Cutoff 1e-12: each atom's radius follows its B, so a B step moves points across the
    # cutoff; at 1e-9 that shifted the finite difference by up to 1.4x the tolerance (seed 37
    # of 40), at 1e-12 by 3e-4 of it.
    mapper = ModelMapper(spec, 2.5, DensitySettings(blur=20.0, dtype="float64", cutoff=1e-12),
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
    # Same radii, same map: to float32 rounding, since a GPU adds atoms in any order.
    np.testing.assert_allclose(after, backend.to_numpy(fresh.exact(batch, 20.0)),
                               rtol=1e-5, atol=1e-6 * np.abs(after).max())
    np.testing.assert_allclose(after[0], before[0], rtol=1e-5, atol=1e-6 * np.abs(after).max())
    assert not np.allclose(after[1], before[1])


@pytest.mark.parametrize("cell,spacegroup,sampling", [
    ((30.0, 30.0, 36.0, 90, 90, 90), "P 43", (30, 30, 36)),
    ((44.0, 22.0, 26.0, 90, 104, 90), "C 1 2 1", (44, 22, 26)),
    ((34.0, 34.0, 42.0, 90, 90, 120), "P 65 2 2", (36, 36, 42))])
def test_mates_summed_on_the_grid_equal_copies_of_the_atoms(backend, rng, cell, spacegroup,
                                                            sampling):
    """On a crystal's cell whose sampling suits its space group the mates are a sum over the
    group on the grid; map and gradients equal those of the mates' atoms placed again."""
    from gpu_refine.density import crystal_copies
    spec = gr.GridSpec(cell=cell, sampling=sampling, shape=sampling, start=(3, -2, 5),
                       spacegroup=spacegroup)
    assert spec.symmetry_sources() is not None
    model = gr.Model.from_gemmi(gr.examples.helix_structure("AEAKAEA"))
    batch = gr.Batch.from_model(model, 2, backend=backend, dtype=np.float64)
    batch.xyz += backend.asarray(rng.normal(scale=0.3, size=batch.xyz.shape))
    batch.b += backend.asarray(rng.uniform(-10, 20, size=batch.b.shape))
    settings = DensitySettings(blur=10.0, dtype="float64")
    on_grid = ModelMapper(spec, 3.0, settings, backend=backend)
    as_atoms = ModelMapper(spec, 3.0, settings, backend=backend, copies=crystal_copies(spec))
    assert as_atoms.copies and not on_grid.copies
    a, b = (backend.to_numpy(m.image(batch)) for m in (on_grid, as_atoms))
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * np.abs(b).max())
    w = backend.asarray(rng.normal(size=a.shape))
    grads = zip(on_grid.image_adjoint(batch, w), as_atoms.image_adjoint(batch, w))
    for ga, gb in ((ga, gb) for ga, gb in grads if gb is not None):
        ga, gb = backend.to_numpy(ga), backend.to_numpy(gb)
        np.testing.assert_allclose(ga, gb, rtol=1e-8, atol=1e-8 * np.abs(gb).max())


def test_a_sampling_that_does_not_suit_the_space_group_places_the_atoms_again():
    spec = gr.GridSpec(cell=(20.0, 21.0, 24.0, 90, 101, 90), sampling=(20, 21, 24),
                       shape=(20, 21, 24), spacegroup="P 1 21 1")
    assert spec.symmetry_sources() is None        # 21 points along the 2_1 axis
    mapper = ModelMapper(spec, 3.0, backend="numpy")
    assert len(mapper.copies) == 1


def test_a_mapper_without_a_resolution_keeps_every_term():
    """resolution=None: the filter only undoes the blur (it raised a TypeError)."""
    model = gr.Model.from_gemmi(gr.examples.helix_structure("AEAK"))
    spec = gr.box_around(model.xyz, 1.0, 4.0)
    f = ModelMapper(spec, None, backend="numpy").fourier_filter(10.0, np.float64)
    np.testing.assert_allclose(f * np.prod(spec.shape), np.exp(10.0 * spec.s2(np) / 4.0))
