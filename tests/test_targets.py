"""Data targets: gradients against finite differences on both backends, GPU/NumPy parity."""
import dataclasses
import logging

import numpy as np
import pytest

import cupy_standin
import gpu_refine as gr
import gpu_refine.examples
from gpu_refine.backend import get_backend
from gpu_refine.density import DensitySettings
from gpu_refine.mapprep import prepare_map
from gpu_refine.targets import MapValueTarget, ModelMapTarget, Target
from helpers import crystal_map


@pytest.fixture(scope="module")
def case():
    """A small helix, its simulated 2.5 Å map, and the map prepared around the model."""
    model = gr.Model.from_gemmi(gr.examples.helix_structure("AEAKA"))
    data, spec = gr.examples.simulated_map(model, 2.5, noise=0.2, backend="numpy", padding=6.0)
    prepared = prepare_map(gr.MapData(data, spec), model.xyz, cushion=3.0)
    return model, prepared


@pytest.fixture(scope="module")
def crystal_case():
    """The helix by the 4-fold axis of a P 4 cell larger than its box: the prepared box
    carries the atoms of the mates near it (rotations that are not their own transpose)."""
    model = gr.Model.from_gemmi(gr.examples.helix_structure("AEAKAEAKA"))
    map_data = crystal_map(model, (56.0, 56.0, 50.0, 90.0, 90.0, 90.0), "P 4")
    prepared = prepare_map(map_data, model.xyz)
    assert prepared.copies and not prepared.spec.periodic
    return model, prepared


def _batch(model, backend, rng, n=2):
    batch = gr.Batch.from_model(model, n, backend=backend, dtype=np.float64)
    batch.xyz += backend.asarray(rng.normal(scale=0.3, size=batch.xyz.shape))
    batch.b += backend.asarray(rng.uniform(-10, 20, size=batch.b.shape))
    batch.occ -= backend.asarray(rng.uniform(0, 0.4, size=batch.occ.shape))
    return batch


def _check_fd(target, batch, wrt, picks, h, rel):
    bk = batch.backend
    _, grads = target.value_and_gradient(batch, wrt)
    for name, idx in picks:
        arr = getattr(batch, name)
        analytic = float(bk.to_numpy(getattr(grads, name))[idx])
        arr[idx] += h
        fp = bk.to_numpy(target.value(batch))[idx[0]]
        arr[idx] -= 2 * h
        fm = bk.to_numpy(target.value(batch))[idx[0]]
        arr[idx] += h
        assert analytic == pytest.approx((fp - fm) / (2 * h), rel=rel, abs=1e-7), (name, idx)


def test_map_value_gradient(case, backend, rng):
    model, prepared = case
    target = MapValueTarget(prepared, model, backend=backend)
    assert isinstance(target, Target)
    batch = _batch(model, backend, rng)
    picks = [("xyz", (0, int(i), int(k))) for i, k in zip(rng.integers(0, model.n_atoms, 4),
                                                          rng.integers(0, 3, 4))]
    _check_fd(target, batch, ("xyz",), picks, 1e-5, 1e-4)
    with pytest.raises(gr.ParameterError):
        target.value_and_gradient(batch, ("b",))


def test_model_map_cc_gradient(case, backend, rng):
    model, prepared = case
    settings = DensitySettings(blur=30.0, cutoff=1e-9, dtype="float64")
    target = ModelMapTarget(prepared, 2.5, backend=backend, settings=settings)
    batch = _batch(model, backend, rng)
    picks = [("xyz", (1, int(rng.integers(model.n_atoms)), int(rng.integers(3)))),
             ("xyz", (0, int(rng.integers(model.n_atoms)), int(rng.integers(3)))),
             ("b", (0, int(rng.integers(model.n_atoms)))),
             ("occ", (1, int(rng.integers(model.n_atoms))))]
    _check_fd(target, batch, ("xyz", "b", "occ"), picks, 1e-4, 1e-3)
    cc = target.stats(batch)["cc_target"]
    assert cc.shape == (2,) and np.all((cc > 0.3) & (cc < 1))


@pytest.mark.parametrize("kind", ["cc", "map_value"])
def test_weights_scale_each_models_value_and_gradient(case, backend, rng, kind):
    """value_and_gradient(..., weight): each model's value and gradient times its weight
    (the sites objective's data term, weighed inside the kernels)."""
    model, prepared = case
    target = (ModelMapTarget(prepared, 2.5, backend=backend) if kind == "cc"
              else MapValueTarget(prepared, model, backend=backend))
    batch = _batch(model, backend, rng, n=3)
    weight = backend.asarray(np.array([0.5, 0.0, 7.0]))
    f, g = target.value_and_gradient(batch, ("xyz",))
    fw, gw = target.value_and_gradient(batch, ("xyz",), weight)
    w = backend.to_numpy(weight)
    np.testing.assert_allclose(backend.to_numpy(fw), w * backend.to_numpy(f), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(gw.xyz), w[:, None, None] * backend.to_numpy(
        g.xyz), rtol=1e-5, atol=1e-7 * np.abs(backend.to_numpy(g.xyz)).max())


def test_model_map_cc_gradient_through_symmetry_mates(crystal_case, backend, rng):
    """Atoms with a copy in the box: their gradient gathers the copy's, rotated back."""
    model, prepared = crystal_case
    settings = DensitySettings(blur=30.0, cutoff=1e-9, dtype="float64")
    target = ModelMapTarget(prepared, 3.0, backend=backend, settings=settings)
    batch = _batch(model, backend, rng)
    quarter = [c for c in prepared.copies if not np.allclose(c.rot, c.rot.T)]
    copied = quarter[0].atoms
    picks = [("xyz", (m, int(rng.choice(copied)), k)) for m, k in ((0, 0), (1, 1), (0, 2))]
    picks += [("b", (1, int(rng.choice(copied)))), ("occ", (0, int(rng.choice(copied))))]
    _check_fd(target, batch, ("xyz", "b", "occ"), picks, 1e-4, 1e-3)


def test_each_model_is_compared_inside_its_own_starts_mask(case, backend, rng):
    """Two starts: a model with mask_index k has the value and gradient of a target whose
    map holds start k's mask alone (same box), and its gradient is still the value's."""
    model, _ = case
    data, spec = gr.examples.simulated_map(model, 2.5, noise=0.2, backend="numpy", padding=6.0)
    moved = model.xyz + np.where(np.arange(model.n_atoms) % 3 == 0, 1.5, -0.5)[:, None]
    both = prepare_map(gr.MapData(data, spec), np.stack([model.xyz, moved]), cushion=3.0)
    assert not np.allclose(both.masks[0], both.masks[1])
    settings = DensitySettings(blur=30.0, cutoff=1e-9, dtype="float64")
    batch = _batch(model, backend, rng, n=3)
    batch = gr.Batch(model, batch.xyz, batch.b, batch.occ, backend=backend, mask_index=[1, 0, 1])
    target = ModelMapTarget(both, 2.5, backend=backend, settings=settings)
    f, g = target.value_and_gradient(batch, ("xyz", "b"))
    for k in (0, 1):
        alone = dataclasses.replace(both, masks=both.masks[k:k + 1])
        plain = gr.Batch(model, batch.xyz, batch.b, batch.occ, backend=backend)
        f_k, g_k = ModelMapTarget(alone, 2.5, backend=backend,
                                  settings=settings).value_and_gradient(plain, ("xyz", "b"))
        rows = np.nonzero(batch.mask_index == k)[0]
        np.testing.assert_allclose(backend.to_numpy(f)[rows], backend.to_numpy(f_k)[rows],
                                   rtol=1e-12)
        for name in ("xyz", "b"):
            np.testing.assert_allclose(backend.to_numpy(getattr(g, name))[rows],
                                       backend.to_numpy(getattr(g_k, name))[rows], rtol=1e-10,
                                       atol=1e-12)
    picks = [("xyz", (2, int(rng.integers(model.n_atoms)), int(rng.integers(3)))),
             ("b", (2, int(rng.integers(model.n_atoms))))]
    _check_fd(target, batch, ("xyz", "b"), picks, 1e-4, 1e-3)
    # A subset keeps each model's mask.
    np.testing.assert_allclose(backend.to_numpy(target.value(batch.subset([2, 1]))),
                               backend.to_numpy(f)[[2, 1]], rtol=1e-12)
    with pytest.raises(gr.ParameterError, match="mask_index 2"):
        target.value(gr.Batch(model, batch.xyz[:1], batch.b[:1], batch.occ[:1],
                              backend=backend, mask_index=[2]))


def test_model_map_cc_is_highest_at_the_true_model(case):
    model, prepared = case
    target = ModelMapTarget(prepared, 2.5, backend="numpy")
    batch = gr.Batch.from_model(model, 2, backend="numpy", dtype=np.float64)
    batch.xyz[1] += 0.5
    cc = target.stats(batch)["cc_target"]
    assert cc[0] > 0.9 and cc[0] > cc[1] + 0.1


def test_targets_gpu_matches_numpy(case, gpu, rng):
    model, prepared = case
    cpu = get_backend("numpy")
    b_cpu = _batch(model, cpu, rng, n=3)
    b_gpu = gr.Batch(model, b_cpu.xyz, b_cpu.b, b_cpu.occ, backend=gpu)
    for make in (lambda bk: MapValueTarget(prepared, model, backend=bk),
                 lambda bk: ModelMapTarget(prepared, 2.5, backend=bk,
                                           settings=DensitySettings(blur=30.0, dtype="float64"))):
        wrt = ("xyz",)
        f_c, g_c = make(cpu).value_and_gradient(b_cpu, wrt)
        f_g, g_g = make(gpu).value_and_gradient(b_gpu, wrt)
        np.testing.assert_allclose(gpu.to_numpy(f_g), f_c, rtol=1e-6)
        np.testing.assert_allclose(gpu.to_numpy(g_g.xyz), g_c.xyz, rtol=1e-5,
                                   atol=1e-6 * np.abs(g_c.xyz).max())


def test_model_map_target_splits_the_batch_when_device_memory_runs_out(case, standin, rng,
                                                                      monkeypatch, caplog):
    """With no device array allowed larger than 2.5 model maps, a batch of 8 is evaluated two
    models at a time (8 -> 4 -> 2), with the values and gradients of the whole batch."""
    model, prepared = case
    settings = DensitySettings(blur=30.0, dtype="float64")
    batch = _batch(model, standin, rng, n=8)
    whole = ModelMapTarget(prepared, 2.5, backend=standin, settings=settings)
    f_all, g_all = whole.value_and_gradient(batch, ("xyz", "b"))
    target = ModelMapTarget(prepared, 2.5, backend=standin, settings=settings)
    map_bytes = 8 * int(np.prod(prepared.spec.shape))
    monkeypatch.setattr(cupy_standin, "allocation_limit", int(2.5 * map_bytes))
    with pytest.raises(cupy_standin.OutOfMemoryError):
        standin.xp.zeros((3,) + tuple(prepared.spec.shape))
    with caplog.at_level(logging.WARNING, logger="gpu_refine.density"):
        f, g = target.value_and_gradient(batch, ("xyz", "b"))
    assert target.chunk == 2
    assert "continuing with 2 models at a time" in caplog.text
    for got, want in ((f, f_all), (g.xyz, g_all.xyz), (g.b, g_all.b)):
        np.testing.assert_allclose(standin.to_numpy(got), standin.to_numpy(want), rtol=1e-12,
                                   atol=1e-12 * float(abs(standin.to_numpy(want)).max()))
    np.testing.assert_allclose(target.stats(batch)["cc_target"], whole.stats(batch)["cc_target"],
                               rtol=1e-12)
