"""The kernel set: GPU vs NumPy parity (fresh random inputs, poisoned outputs) and
finite-difference checks of every gradient, on both backends."""
import dataclasses

import numpy as np
import pytest

import cpu_fallback
from helpers import (hexagonal_box_spec, monoclinic_spec, ortho_box_spec, random_atoms,
                     triclinic_slab_spec, triclinic_spec)

BLUR = 5.0
SPECS = {"triclinic-periodic": triclinic_spec(True), "triclinic-box": triclinic_spec(False),
         "triclinic-slab": triclinic_slab_spec(), "ortho-box": ortho_box_spec()}


def _radius(b, u, flag, stype, coefs):
    return cpu_fallback.cutoff_radii(b, u, flag, stype, coefs, BLUR, 1e-5, np.empty_like(b))


def _inputs(rng, spec, n_models=3, n_atoms=40, aniso=True, dtype=np.float64):
    xyz, b, u, flag, occ, stype, coefs = random_atoms(rng, n_models, n_atoms, spec, aniso, dtype)
    return xyz, b, u, flag, occ, stype, coefs, _radius(b, u, flag, stype, coefs)


def _to(bk, arrays):
    return tuple(a if a is None or isinstance(a, (float, bool)) or a.dtype == np.int32
                 or a.dtype == bool else bk.asarray(a) for a in arrays)


@pytest.mark.parametrize("aniso", [True, False])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-9), (np.float32, 2e-4)])
@pytest.mark.parametrize("name", SPECS)
def test_spread_and_adjoint_parity(gpu, rng, name, dtype, rtol, aniso):
    spec = SPECS[name]
    xyz, b, u, flag, occ, stype, coefs, radius = _inputs(rng, spec, aniso=aniso, dtype=dtype)
    args = (xyz, b, u, flag, occ, stype, coefs, radius, spec.geom, BLUR, spec.periodic_axes)
    shape = (xyz.shape[0],) + spec.shape
    ref = cpu_fallback.spread_density(*args, np.full(shape, np.nan, dtype))
    out = gpu.xp.full(shape, np.nan, dtype)
    gpu_args = (gpu.asarray(xyz), gpu.asarray(b), gpu.asarray(u), flag, gpu.asarray(occ), stype,
                coefs, gpu.asarray(radius), spec.geom, BLUR, spec.periodic_axes)
    got = gpu.to_numpy(gpu.ops.spread_density(*gpu_args, out))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max())

    dmap = rng.normal(size=shape).astype(dtype)
    ref_g = cpu_fallback.density_adjoint(*args, dmap)
    poisoned = tuple(gpu.xp.full(r.shape, np.nan, dtype) for r in ref_g)
    got_g = gpu.ops.density_adjoint(*gpu_args, gpu.asarray(dmap), out=poisoned)
    for r, g in zip(ref_g, got_g):
        g = gpu.to_numpy(g)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, r, rtol=10 * rtol, atol=10 * rtol * (np.abs(r).max() + 1e-30))


@pytest.mark.parametrize("name,periodic", [("ortho", False), ("ortho", True),
                                            ("ortho", (True, False, True)), ("monoclinic", True),
                                            ("monoclinic", (False, True, True)),
                                            ("hexagonal-box", False)])
def test_factorised_numpy_path_equals_the_general_one(rng, monkeypatch, name, periodic):
    """Where one grid axis is perpendicular to the others NumPy factorises each Gaussian into a
    line and a plane factor; it must give what the general path (whole boxes of exp(-δ^T H δ),
    the one for a triclinic cell and for anisotropic atoms) gives."""
    spec = {"ortho": ortho_box_spec(), "monoclinic": monoclinic_spec(),
            "hexagonal-box": hexagonal_box_spec()}[name]
    fac = cpu_fallback.density._factorisation(spec.geom)
    assert fac is not None and fac.perm[0] == {"ortho": 0, "monoclinic": 1,
                                               "hexagonal-box": 2}[name]
    assert fac.plane_separable == (name == "ortho")
    xyz, b, u, flag, occ, stype, coefs, radius = _inputs(rng, spec, aniso=False)
    b[0, :5] = 400.0       # a few wide atoms: boxes of several sizes
    radius = _radius(b, None, None, stype, coefs)
    args = (xyz, b, None, None, occ, stype, coefs, radius, spec.geom, BLUR, periodic)
    shape = (xyz.shape[0],) + spec.shape
    dmap = rng.normal(size=shape)
    fast = (cpu_fallback.spread_density(*args, np.full(shape, np.nan)),
            *cpu_fallback.density_adjoint(*args, dmap))
    monkeypatch.setattr(cpu_fallback.density, "_factorisation", lambda geom: None)
    general = (cpu_fallback.spread_density(*args, np.full(shape, np.nan)),
               *cpu_fallback.density_adjoint(*args, dmap))
    for f, g in zip(fast, general):
        assert np.isfinite(f).all()
        np.testing.assert_allclose(f, g, rtol=1e-10, atol=1e-12 * (np.abs(g).max() + 1e-30))


def test_a_grid_periodic_along_some_axes_is_a_slab_of_the_whole_cell(backend, rng):
    """A box that holds whole periods along a and c wraps there: its density and adjoint are
    those of the whole (periodic) cell at the same points.  Atoms lie anywhere along a and c
    (across the faces) and in the middle of the cell along b, so the cell's wrap along b
    does not reach the slab."""
    cell = triclinic_spec(True)
    slab = dataclasses.replace(cell, shape=(20, 12, 22), start=(0, 6, 0), wrap=(True, False, True))
    xyz, b, u, flag, occ, stype, coefs = random_atoms(rng, 2, 30, cell)
    frac = rng.random((2, 30, 3)) * [1.4, 0.2, 1.4] + [-0.2, 0.4, -0.2]
    xyz = cell.origin_xyz + frac @ (cell.xyz_from_index * np.asarray(cell.shape)).T
    radius = _radius(b, None, None, stype, coefs)
    bk = backend
    dmap_cell = rng.normal(size=(2,) + cell.shape)
    part = (slice(None), slice(None), slice(6, 18), slice(None))
    results = []
    for spec, dmap in ((cell, dmap_cell), (slab, dmap_cell[part])):
        args = (bk.asarray(xyz), bk.asarray(b), None, None, bk.asarray(occ), stype, coefs,
                bk.asarray(radius), spec.geom, BLUR, spec.periodic_axes)
        rho = bk.ops.spread_density(*args, bk.xp.full((2,) + spec.shape, np.nan))
        grads = bk.ops.density_adjoint(*args, bk.asarray(np.ascontiguousarray(dmap)))
        results.append([bk.to_numpy(rho)] + [bk.to_numpy(g) for g in grads])
    assert slab.periodic_axes == (True, False, True) and not slab.periodic
    whole, cut = results
    np.testing.assert_allclose(cut[0], whole[0][part], rtol=1e-9, atol=1e-12 * whole[0].max())
    assert whole[0][part].max() > 0.1 * whole[0].max()
    # The adjoint sees only the slab's points: compare against the cell's with w = 0 elsewhere.
    dmap_zero = np.zeros_like(dmap_cell)
    dmap_zero[part] = dmap_cell[part]
    args = (xyz, b, None, None, occ, stype, coefs, radius, cell.geom, BLUR, True)
    ref = cpu_fallback.density_adjoint(*args, dmap_zero)
    for r, g in zip(ref, cut[1:]):
        np.testing.assert_allclose(g, r, rtol=1e-8, atol=1e-10 * (np.abs(r).max() + 1e-30))


def test_triclinic_grids_are_not_factorised():
    assert cpu_fallback.density._factorisation(triclinic_spec().geom) is None


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-4)])
@pytest.mark.parametrize("name", SPECS)
def test_interpolation_parity(gpu, rng, name, order, dtype, rtol):
    spec = SPECS[name]
    maps = rng.normal(size=(2,) + spec.shape).astype(dtype)
    xyz = random_atoms(rng, 5, 30, spec, dtype=dtype)[0]
    map_index = rng.integers(0, 2, 5).astype(np.int32)
    ref = cpu_fallback.interpolate_at_atoms(maps, map_index, xyz, spec.geom, spec.periodic_axes, order)
    poisoned = (gpu.xp.full((5, 30), np.nan, dtype), gpu.xp.full((5, 30, 3), np.nan, dtype))
    got = gpu.ops.interpolate_at_atoms(gpu.asarray(maps), map_index, gpu.asarray(xyz), spec.geom,
                                       spec.periodic_axes, order, out=poisoned)
    for r, g in zip(ref, got):
        g = gpu.to_numpy(g)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol * np.abs(r).max())


def _fd(f, x, idx, h):
    xp_, xm = x.copy(), x.copy()
    xp_[idx] += h
    xm[idx] -= h
    return (f(xp_) - f(xm)) / (2 * h)


@pytest.mark.parametrize("name", ["triclinic-periodic", "triclinic-slab", "ortho-box"])
def test_density_adjoint_matches_finite_differences(backend, rng, name):
    """T = sum(w * rho): analytic gradients vs central differences (radius held fixed)."""
    spec = SPECS[name]
    xyz, b, u, flag, occ, stype, coefs, radius = _inputs(rng, spec, n_models=2, n_atoms=12)
    # Generous radius so that truncation does not bias the differences.
    radius = radius + 3.0
    w = rng.normal(size=(2,) + spec.shape)
    bk = backend

    def total(xyz_, b_, u_, occ_):
        out = bk.xp.zeros((2,) + spec.shape)
        bk.ops.spread_density(bk.asarray(xyz_), bk.asarray(b_), bk.asarray(u_), flag,
                              bk.asarray(occ_), stype, coefs, bk.asarray(radius), spec.geom,
                              BLUR, spec.periodic_axes, out)
        return float((bk.to_numpy(out) * w).sum())

    g = bk.ops.density_adjoint(bk.asarray(xyz), bk.asarray(b), bk.asarray(u), flag,
                               bk.asarray(occ), stype, coefs, bk.asarray(radius), spec.geom, BLUR,
                               spec.periodic_axes, bk.asarray(w))
    gx, gb, gu, go = (bk.to_numpy(a) for a in g)
    iso = int(np.nonzero(~flag)[0][0])
    ani = int(np.nonzero(flag)[0][0])
    checks = []
    for atom in (iso, ani):
        for c in range(3):
            checks.append((gx[1, atom, c], _fd(lambda x: total(x, b, u, occ), xyz, (1, atom, c), 1e-4)))
        checks.append((go[0, atom], _fd(lambda o: total(xyz, b, u, o), occ, (0, atom), 1e-4)))
    checks.append((gb[0, iso], _fd(lambda bb: total(xyz, bb, u, occ), b, (0, iso), 1e-3)))
    for c in range(6):
        checks.append((gu[1, ani, c], _fd(lambda uu: total(xyz, b, uu, occ), u, (1, ani, c), 1e-5)))
    assert gb[0, ani] == 0 and np.all(gu[1, iso] == 0)
    for i, (analytic, numeric) in enumerate(checks):
        assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-6 * (abs(numeric) + 1)), i


@pytest.mark.parametrize("order", [1, 3])
def test_interpolation_gradient_matches_finite_differences(backend, rng, order):
    spec = SPECS["triclinic-periodic"]
    maps = rng.normal(size=(1,) + spec.shape)
    xyz = random_atoms(rng, 1, 6, spec)[0]
    mi = np.zeros(1, np.int32)
    bk = backend
    _, grad = (bk.to_numpy(a) for a in bk.ops.interpolate_at_atoms(
        bk.asarray(maps), mi, bk.asarray(xyz), spec.geom, True, order))

    def value(x, atom):
        v, _ = bk.ops.interpolate_at_atoms(bk.asarray(maps), mi, bk.asarray(x), spec.geom, True, order)
        return float(bk.to_numpy(v)[0, atom])

    for atom in range(3):
        for c in range(3):
            fd = _fd(lambda x: value(x, atom), xyz, (0, atom, c), 1e-6)
            assert grad[0, atom, c] == pytest.approx(fd, rel=1e-5, abs=1e-7)


def test_interpolation_matches_gemmi(rng):
    import gemmi
    spec = SPECS["triclinic-periodic"]
    data = rng.normal(size=spec.shape).astype(np.float32)
    grid = gemmi.FloatGrid(data, gemmi.UnitCell(*spec.cell))
    xyz = random_atoms(rng, 1, 20, spec)[0]
    # gemmi places point (0,0,0) at the cell origin; ours is shifted by spec.origin.
    shifted = xyz[0] - spec.origin_xyz
    for order, fn in ((3, grid.tricubic_interpolation), (1, grid.interpolate_value)):
        v, _ = cpu_fallback.interpolate_at_atoms(data[None], np.zeros(1, np.int32), xyz,
                                                 spec.geom, True, order)
        ref = [fn(gemmi.Position(*p)) for p in shifted]
        np.testing.assert_allclose(v[0], ref, rtol=1e-5, atol=1e-5)


def _cc_inputs(rng, n_models=5, n_masks=2, shape=(7, 9, 11), dtype=np.float32):
    """Random model maps, soft masks with empty corners, and a map with its per-mask
    statistics (as ModelMapTarget keeps them)."""
    image = rng.normal(1.0, 2.0, size=(n_models,) + shape).astype(dtype)
    masks = np.clip(rng.uniform(-0.5, 1.5, size=(n_masks,) + shape), 0, 1).astype(np.float32)
    index = rng.integers(0, n_masks, n_models).astype(np.int32)
    y = rng.normal(0.5, 1.0, size=shape)
    w = masks.reshape(n_masks, -1).astype(np.float64)
    w_sum = w.sum(axis=1)
    my = w @ y.reshape(-1) / w_sum
    syy = (w * (y.reshape(-1)[None] - my[:, None]) ** 2).sum(axis=1)
    return image, masks, index, y, my, w_sum, syy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cc_statistics_are_the_weighted_correlation(rng, dtype):
    image, masks, index, y, my, w_sum, syy = _cc_inputs(rng, dtype=dtype)
    scale = rng.uniform(1, 9, len(image))
    value = np.full(len(image), np.nan)
    stats = cpu_fallback.cc_statistics(image, masks, index, y, my, w_sum, syy, scale,
                                       np.full((len(image), 4), np.nan), value)
    for m, k in enumerate(index):
        w, x = masks[k].astype(np.float64).ravel(), image[m].astype(np.float64).ravel()
        mx = (w * x).sum() / w.sum()
        dx, dy = x - mx, y.ravel() - my[k]
        sxx, sxy = (w * dx * dx).sum(), (w * dx * dy).sum()
        cc = sxy / np.sqrt(sxx * (w * dy * dy).sum())
        np.testing.assert_allclose(stats[m, :3], [cc, mx, sxx], rtol=1e-10)
        np.testing.assert_allclose(value[m], scale[m] * (1 - cc), rtol=1e-10)


def test_cc_gradient_map_matches_finite_differences(rng):
    image, masks, index, y, my, w_sum, syy = _cc_inputs(rng, n_models=2, dtype=np.float64)
    scale = np.array([-3.0, 5.0])

    def cc(img):
        return cpu_fallback.cc_statistics(img, masks, index, y, my, w_sum, syy, scale,
                                          np.empty((len(img), 4)), np.empty(len(img)))[:, 0]
    stats = cpu_fallback.cc_statistics(image, masks, index, y, my, w_sum, syy, scale,
                                       np.empty((2, 4)), np.empty(2))
    grad = cpu_fallback.cc_gradient_map(image, masks, index, y, my, syy, stats, scale,
                                        np.full(image.shape, np.nan))
    h = 1e-6
    for p in [(0, 1, 2, 3), (1, 4, 0, 7), (1, 6, 8, 10)]:
        up, down = image.copy(), image.copy()
        up[p] += h
        down[p] -= h
        fd = scale[p[0]] * (cc(up)[p[0]] - cc(down)[p[0]]) / (2 * h)
        np.testing.assert_allclose(grad[p], fd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_cc_kernels_parity(gpu, rng, dtype, rtol):
    image, masks, index, y, my, w_sum, syy = _cc_inputs(rng, dtype=dtype)
    n = len(image)
    scale = rng.uniform(-9, 9, n)
    ref = cpu_fallback.cc_statistics(image, masks, index, y, my, w_sum, syy, scale,
                                     np.full((n, 4), np.nan), value := np.full(n, np.nan))
    dev = [gpu.asarray(a) for a in (image, masks, index, y, my, w_sum, syy)]
    got_value = gpu.xp.full(n, np.nan)
    got = gpu.to_numpy(gpu.ops.cc_statistics(*dev, gpu.asarray(scale), gpu.xp.full((n, 4), np.nan),
                                             got_value))
    np.testing.assert_allclose(got, ref, rtol=rtol)
    np.testing.assert_allclose(gpu.to_numpy(got_value), value, rtol=rtol)
    ref_g = cpu_fallback.cc_gradient_map(image, masks, index, y, my, syy, ref, scale,
                                         np.full(image.shape, np.nan, dtype))
    got_g = gpu.to_numpy(gpu.ops.cc_gradient_map(*dev[:5], dev[6], gpu.asarray(ref),
                                                 gpu.asarray(scale),
                                                 gpu.xp.full(image.shape, np.nan, dtype)))
    assert np.isfinite(got_g).all()
    np.testing.assert_allclose(got_g, ref_g, rtol=rtol, atol=rtol * np.abs(ref_g).max())


def test_a_launch_sized_for_larger_radii_gives_the_same(gpu, rng):
    """radius_max only sizes the launch (slabs per atom): a bound above the radii (what a B
    refinement gives, sized for the widest atom its bounds allow) changes nothing."""
    spec = SPECS["triclinic-box"]
    xyz, b, u, flag, occ, stype, coefs, radius = _inputs(rng, spec, aniso=False)
    args = (gpu.asarray(xyz), gpu.asarray(b), None, None, gpu.asarray(occ), stype, coefs,
            gpu.asarray(radius), spec.geom, BLUR, spec.periodic_axes)
    shape = (xyz.shape[0],) + spec.shape
    dmap = gpu.asarray(rng.normal(size=shape))
    maps, grads = [], []
    for rmax in (None, 3.0 * float(radius.max())):
        maps.append(gpu.to_numpy(gpu.ops.spread_density(*args, gpu.xp.full(shape, np.nan),
                                                        radius_max=rmax)))
        grads.append([gpu.to_numpy(g) for g in gpu.ops.density_adjoint(*args, dmap,
                                                                       radius_max=rmax)])
    # Sums in another order: equal to rounding, relative to each array's largest value.
    np.testing.assert_allclose(maps[1], maps[0], rtol=1e-10, atol=1e-12 * np.abs(maps[0]).max())
    for large, exact in zip(*grads):
        np.testing.assert_allclose(large, exact, rtol=1e-10, atol=1e-12 * np.abs(exact).max())


@pytest.mark.parametrize("aniso", [True, False])
def test_cutoff_radii_parity(gpu, rng, aniso):
    """The radius kernel against its twin: both gemmi's search, the same radii."""
    spec = SPECS["ortho-box"]
    xyz, b, u, flag, occ, stype, coefs = random_atoms(rng, 3, 40, spec, aniso, np.float64)
    b[0, :3] = [0.5, 300.0, 2000.0]           # walks inwards and far outwards
    ref = cpu_fallback.cutoff_radii(b, u, flag, stype, coefs, BLUR, 1e-4,
                                    np.full(b.shape, np.nan))
    got = gpu.ops.cutoff_radii(gpu.asarray(b), None if u is None else gpu.asarray(u), flag,
                               stype, coefs, BLUR, 1e-4, gpu.xp.full(b.shape, np.nan))
    np.testing.assert_allclose(gpu.to_numpy(got), ref, rtol=1e-12)


def test_cutoff_radius_is_where_the_density_falls_to_the_cutoff(rng):
    """gemmi's radius: interpolated on a chord of the (convex) density over a 0.5 Å bracket
    that it crosses the cutoff in, so the density is below the cutoff there and above it
    0.5 Å further in."""
    spec = SPECS["ortho-box"]
    _, b, _, _, _, stype, coefs = random_atoms(rng, 1, 30, spec, False, np.float64)
    r = cpu_fallback.cutoff_radii(b, None, None, stype, coefs, BLUR, 1e-4, np.empty_like(b))
    c = coefs[stype]
    bt = c[:, 1, :] + b[0, :, None] + BLUR

    def rho(x):
        return (c[:, 0, :] * (4 * np.pi / bt) ** 1.5
                * np.exp(-4 * np.pi**2 * x[:, None] ** 2 / bt)).sum(axis=1)
    assert (rho(r[0]) <= 1e-4 * (1 + 1e-9)).all() and (rho(r[0] - 0.5) >= 1e-4).all()
