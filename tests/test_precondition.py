"""The sites' change of variables (gpu_refine/restraints/precondition.py) and its kernel,
banded_solve: GPU vs NumPy parity, the factor against the dense matrix, the gradient of the
wrapped objective against finite differences, on both backends."""
import numpy as np
import pytest
from scipy.linalg import solve_triangular

import gpu_refine as gr
import gpu_refine.examples  # noqa: F401  (gr.examples)
from gpu_refine.restraints.precondition import (SitesPreconditioner, banded_cholesky,
                                                restraint_laplacian)
from gpu_refine.restraints.topology import build_topology


@pytest.fixture(scope="module")
def helix_topology():
    model = gr.Model.from_gemmi(gr.examples.helix_structure("AEAKAEAKA"))
    return model, build_topology(model)


def _random_band(rng, n, k):
    """A lower-triangular banded matrix (LAPACK storage) with a dominant diagonal."""
    band = rng.normal(size=(k + 1, n))
    band[0] = rng.uniform(1.0, 3.0, n) * rng.choice([-1, 1], n)
    for d in range(1, k + 1):
        band[d, n - d:] = 0.0        # outside the matrix
    return band


def _dense(band):
    k, n = band.shape[0] - 1, band.shape[1]
    m = np.zeros((n, n))
    for d in range(k + 1):
        m[np.arange(d, n), np.arange(n - d)] = band[d, :n - d]
    return m


@pytest.mark.parametrize("transpose", [False, True])
def test_banded_solve_equals_the_dense_triangular_solve(rng, transpose):
    """Each (model, coordinate) column solved, its rows read and written through the maps."""
    import cpu_fallback
    n = 37
    band = _random_band(rng, n, 5)
    rhs = rng.normal(size=(4, n, 3))
    rows_in, rows_out = rng.permutation(n), rng.permutation(n)
    out = np.full_like(rhs, np.nan)
    cpu_fallback.banded_solve(band, rhs, transpose, out, rhs_rows=rows_in, out_rows=rows_out)
    cols = rhs[:, rows_in].transpose(1, 0, 2).reshape(n, -1)
    ref = solve_triangular(_dense(band), cols, lower=True, trans="T" if transpose else "N")
    np.testing.assert_allclose(out[:, rows_out].transpose(1, 0, 2).reshape(n, -1), ref,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("maps", [False, True])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_banded_solve_parity(gpu, rng, transpose, dtype, rtol, maps):
    from gpu_refine.backend import get_backend
    n, k = int(rng.integers(20, 60)), int(rng.integers(0, 8))
    n_models, width = int(rng.integers(1, 50)), int(rng.integers(1, 5))
    band = _random_band(rng, n, k)
    rhs = rng.normal(size=(n_models, n, width)).astype(dtype)
    rows = {"rhs_rows": rng.permutation(n).astype(np.int32),
            "out_rows": rng.permutation(n).astype(np.int32)} if maps else {}
    outs = []
    for bk in (get_backend("numpy"), gpu):
        out = bk.xp.full(rhs.shape, np.nan, dtype=dtype)         # poisoned
        bk.ops.banded_solve(bk.asarray(band), bk.asarray(rhs), transpose, out,
                            **{key: bk.asarray(v) for key, v in rows.items()})
        outs.append(bk.to_numpy(out))
    assert not np.isnan(outs[1]).any(), "rows left unwritten"
    np.testing.assert_allclose(outs[1], outs[0], rtol=rtol, atol=rtol * np.abs(outs[0]).max())


def test_the_factor_is_that_of_the_restraints_laplacian(helix_topology):
    model, topo = helix_topology
    m = restraint_laplacian(topo, shift=30.0)
    dense = m.toarray()
    assert np.allclose(dense, dense.T)
    # Rows sum to the shift: a Laplacian, plus shift × I.
    assert np.allclose(dense.sum(axis=1), 30.0)
    order, band = banded_cholesky(m)
    lower = _dense(band)
    assert np.allclose(lower @ lower.T, dense[np.ix_(order, order)])
    assert band.shape[0] - 1 < model.n_atoms // 4       # reordered into a narrow band


def test_change_of_variables_and_its_adjoint(helix_topology, backend, rng):
    """step(gradient(g)) = M⁻¹ g, and <C⁻ᵀ z, g> = <z, C⁻¹ g>: the minimiser's gradient in z is
    the exact chain rule of its map to x."""
    model, topo = helix_topology
    pc = SitesPreconditioner(topo, backend)
    g = rng.normal(size=(2, model.n_atoms, 3))
    z = rng.normal(size=(2, model.n_atoms * 3))
    gz = backend.to_numpy(pc.gradient(backend.asarray(g)))
    dx = backend.to_numpy(pc.step(backend.asarray(z)))
    assert np.sum(dx * g) == pytest.approx(np.sum(z * gz), rel=1e-9)
    m = restraint_laplacian(topo).toarray()
    back = backend.to_numpy(pc.step(backend.asarray(gz)))
    np.testing.assert_allclose(np.einsum("ij,bjk->bik", m, back), g, atol=1e-8)


def test_wrapped_objective_gradient_matches_finite_differences(helix_topology, backend, rng):
    """The restraints' energy as a function of z (x = x0 + C⁻ᵀ z) against central differences."""
    from gpu_refine.restraints.geometry import GeometryRestraints
    model, topo = helix_topology
    restraints = GeometryRestraints(topo, backend=backend, dtype=np.float64)
    x0 = backend.asarray(model.xyz[None] + rng.normal(scale=0.1, size=(1,) + model.xyz.shape))
    shape = x0.shape

    def fg(x):
        f, g = restraints.energy_and_gradient(x.reshape(shape))
        return f, g.reshape(shape[0], -1)
    fg_z, z0, x_of = SitesPreconditioner(topo, backend).wrap(fg, x0.reshape(1, -1))
    z = z0 + backend.asarray(rng.normal(scale=0.5, size=z0.shape))
    _, gz = fg_z(z)
    gz = backend.to_numpy(gz)[0]
    h = 1e-5
    for j in rng.choice(z.shape[1], 12, replace=False):
        e = np.zeros(z.shape)
        e[0, j] = h
        e = backend.asarray(e)
        fd = (backend.to_numpy(fg_z(z + e)[0])[0] - backend.to_numpy(fg_z(z - e)[0])[0]) / (2 * h)
        assert fd == pytest.approx(gz[j], rel=1e-5, abs=1e-6 * np.abs(gz).max())
    assert np.allclose(backend.to_numpy(x_of(z0)), backend.to_numpy(x0).reshape(1, -1))
