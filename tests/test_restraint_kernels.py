"""Restraint kernels: GPU vs NumPy parity (fresh random inputs, poisoned outputs) and
finite-difference checks of every gradient, on both backends."""
import numpy as np
import pytest

import cpu_fallback

KINDS = ["bond", "nonbonded", "angle", "torsion", "chiral", "plane", "adp1", "adp6"]


def random_case(rng, kind, n_models=3, n_atoms=40, n_restr=25, dtype=np.float64):
    """(function name, positional arguments before energy/grad, values array, delta width)."""
    xyz = rng.normal(scale=3.0, size=(n_models, n_atoms, 3)).astype(dtype)
    w = rng.uniform(0.5, 2.0, n_restr).astype(dtype)

    def tuples(k):
        return np.array([rng.choice(n_atoms, k, replace=False) for _ in range(n_restr)],
                        dtype=np.int32).reshape(n_restr, k)

    if kind in ("bond", "nonbonded"):
        atoms = tuples(2)
        d = np.linalg.norm(xyz[:, atoms[:, 0]] - xyz[:, atoms[:, 1]], axis=-1)
        ideal = d[0] + rng.uniform(-0.5, 0.5, n_restr)
        if kind == "nonbonded":
            # Repulsion acts only below dmin: the first pairs are too close in every model
            # (each model has energy), the others are random (some pairs inactive).
            ideal[:n_restr // 2] = d.max(axis=0)[:n_restr // 2] + 0.3
        ideal = ideal.astype(dtype)
        return f"{kind}_terms", (xyz, atoms, ideal, w), xyz, n_restr
    if kind == "angle":
        return "angle_terms", (xyz, tuples(3), rng.uniform(1.0, 2.5, n_restr).astype(dtype), w), \
            xyz, n_restr
    if kind == "torsion":
        period = rng.integers(0, 4, n_restr).astype(np.int32)
        ideal = rng.uniform(-np.pi, np.pi, n_restr).astype(dtype)
        return "torsion_terms", (xyz, tuples(4), ideal, w, period), xyz, n_restr
    if kind == "chiral":
        sign = rng.integers(-1, 2, n_restr).astype(np.int8)
        ideal = rng.uniform(1.0, 3.0, n_restr).astype(dtype)
        return "chiral_terms", (xyz, tuples(4), ideal, w, sign), xyz, n_restr
    if kind == "plane":
        sizes = rng.integers(3, 8, n_restr)
        ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
        atoms = np.concatenate([_plane_atoms(rng, xyz, s) for s in sizes]
                               + [np.zeros(0)]).astype(np.int32)
        pw = rng.uniform(0.5, 2.0, len(atoms)).astype(dtype)
        return "plane_terms", (xyz, ptr, atoms, pw), xyz, len(atoms)
    k = 1 if kind == "adp1" else 6
    values = rng.uniform(10, 60, (n_models, n_atoms, k)).astype(dtype)
    return "adp_similarity_terms", (values, tuples(2), w), values, n_restr


def _plane_atoms(rng, xyz, size):
    """Atoms for one plane restraint, redrawn while they are nearly collinear in some model:
    there the normal is ill-defined (the two smallest eigenvalues of the scatter nearly
    coincide) and no two methods agree on it to 1e-9 (about 1 draw in 6000 of three atoms)."""
    while True:
        atoms = rng.choice(xyz.shape[1], size, replace=False)
        d = xyz[:, atoms] - xyz[:, atoms].mean(axis=1, keepdims=True)
        ev = np.linalg.eigvalsh(np.swapaxes(d, 1, 2) @ d)
        if np.all(ev[:, 1] - ev[:, 0] > 1e-3 * ev[:, 2]):
            return atoms


def evaluate(bk, name, args, values, n_delta, seed_energy=None, seed_grad=None, delta=True):
    xp = bk.xp
    args = tuple(bk.asarray(a) for a in args)
    n_models = values.shape[0]
    # Copies: on NumPy asarray would hand back the seed itself, and two evaluations would then
    # add into (and compare) the same array.
    energy = (xp.zeros(n_models, xp.float64) if seed_energy is None
              else bk.asarray(seed_energy).copy())
    grad = xp.zeros(values.shape, values.dtype) if seed_grad is None else bk.asarray(seed_grad).copy()
    d = xp.full((n_models, n_delta), np.nan, values.dtype) if delta else None
    getattr(bk.ops, name)(*args, energy, grad, d)
    return (bk.to_numpy(energy), bk.to_numpy(grad), None if d is None else bk.to_numpy(d))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-9), (np.float32, 2e-3)])
def test_restraint_parity(gpu, rng, kind, dtype, tol):
    from gpu_refine.backend import get_backend
    name, args, values, n_delta = random_case(rng, kind, dtype=dtype)
    seed_e = rng.normal(size=values.shape[0])
    seed_g = rng.normal(size=values.shape).astype(dtype)
    ref = evaluate(get_backend("numpy"), name, args, values, n_delta, seed_e, seed_g)
    got = evaluate(gpu, name, args, values, n_delta, seed_e, seed_g)
    assert not np.isnan(got[2]).any(), "delta left unwritten"
    scale = np.abs(ref[0]).max()
    np.testing.assert_allclose(got[0], ref[0], rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(got[1], ref[1], rtol=tol, atol=tol * np.abs(ref[1]).max())
    np.testing.assert_allclose(got[2], ref[2], rtol=tol, atol=tol * np.abs(ref[2]).max())
    assert hasattr(cpu_fallback, name)


@pytest.mark.parametrize("kind", KINDS)
def test_restraint_gradient_matches_finite_differences(backend, rng, kind):
    name, args, values, n_delta = random_case(rng, kind, n_models=2, n_atoms=12, n_restr=6)
    energy, grad, delta = evaluate(backend, name, args, values, n_delta)
    assert np.isfinite(delta).all()
    assert (energy > 0).all()
    h = 1e-6
    fd = np.zeros_like(grad)
    for idx in np.ndindex(values.shape):
        plus, minus = values.copy(), values.copy()
        plus[idx] += h
        minus[idx] -= h
        e_plus = evaluate(backend, name, (plus,) + args[1:], plus, n_delta, delta=False)[0]
        e_minus = evaluate(backend, name, (minus,) + args[1:], minus, n_delta, delta=False)[0]
        fd[idx] = (e_plus[idx[0]] - e_minus[idx[0]]) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-5 * np.abs(fd).max())


@pytest.mark.parametrize("kind", KINDS)
def test_no_restraints_of_a_kind(backend, rng, kind):
    """A model without restraints of one kind (a water has no planes): energy and gradient
    stay as they were."""
    name, args, values, n_delta = random_case(rng, kind, n_restr=0)
    assert n_delta == 0
    seed_e = rng.normal(size=values.shape[0])
    seed_g = rng.normal(size=values.shape).astype(values.dtype)
    energy, grad, delta = evaluate(backend, name, args, values, 0, seed_e, seed_g)
    assert np.array_equal(energy, seed_e) and np.array_equal(grad, seed_g)
    assert delta.shape == (values.shape[0], 0)


def test_energy_is_weighted_sum_of_squared_deltas(backend, rng):
    name, args, values, n_delta = random_case(rng, "bond")
    energy, _, delta = evaluate(backend, name, args, values, n_delta)
    np.testing.assert_allclose(energy, (args[3] * delta ** 2).sum(axis=1), rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moved_beyond_parity(gpu, rng, dtype):
    """The pair list's staleness test on the device and in NumPy: set where one atom of one
    model moved past the allowance, left alone otherwise."""
    ref = rng.normal(size=(3, 50, 3)).astype(dtype)
    still = (ref + rng.uniform(-0.1, 0.1, ref.shape)).astype(dtype)   # at most 0.18 Å
    moved = still.copy()
    moved[2, 17] += np.array([0.5, 0.0, 0.0], dtype)
    for xyz, want in ((still, 0), (moved, 1)):
        ref_out = cpu_fallback.moved_beyond(xyz, ref, 0.25, np.zeros((), np.int32))
        got = gpu.ops.moved_beyond(gpu.asarray(xyz), gpu.asarray(ref), 0.25,
                                   gpu.xp.zeros((), np.int32))
        assert int(ref_out) == int(gpu.to_numpy(got)) == want
