"""CUDA kernel provider: loads ``kernels/*.cu`` through CuPy and exposes the same functions, with
the same signatures, as ``cpu_fallback``.  Imported only by ``backend`` once CuPy has been seen
to work.

Each ``.cu`` file is a real CUDA source; the only generated text is ``#define REAL <type>``
(``kernel_source``).  Modules are memoized per (file, dtype, device).
"""
import functools
import math

import cupy as cp
import cupyx.scipy.fft as cufft
import numpy as np

from cpu_fallback.density import periodic_axes

from .kernel_source import (COMPILE_OPTIONS, THREADS_PER_BLOCK as _BLOCK, module_source,
                            real_dtype as _real)


@functools.lru_cache(maxsize=None)
def _module(name, dtype_name, device_id):
    return cp.RawModule(code=module_source(name, dtype_name), options=COMPILE_OPTIONS)


def get_kernel(name, function, dtype):
    """The compiled ``function`` of ``kernels/<name>.cu`` for ``dtype`` on the current device."""
    return _module(name, np.dtype(dtype).name, cp.cuda.Device().id).get_function(function)


def _c(a, dtype):
    return cp.ascontiguousarray(cp.asarray(a, dtype=dtype))


def _launch(kernel, n_threads, args):
    if n_threads > 0:
        kernel(((n_threads + _BLOCK - 1) // _BLOCK,), (_BLOCK,), args)


def _periodic_mask(periodic):
    """The kernels' bit mask (bit a: axis a wraps) from ``periodic`` as the NumPy twins take
    it (one bool, or one per axis)."""
    return np.int32(sum(1 << a for a, wrap in enumerate(periodic_axes(periodic)) if wrap))


@functools.lru_cache(maxsize=64)
def _constant(data, dtype_name, device_id):
    """A device copy of small constant host data (a grid's geometry, a placeholder), made
    once: not an upload per launch."""
    return cp.asarray(np.frombuffer(data, dtype=dtype_name))


def _on_device(a, dtype):
    a = np.ascontiguousarray(a, dtype=dtype)
    return _constant(a.tobytes(), a.dtype.name, cp.cuda.Device().id)


def _atom_args(xyz, b, u, is_aniso, occ, stype, coefs, radius, geom, dtype, radius_max):
    n_models, n_atoms = xyz.shape[:2]
    has_aniso = u is not None and is_aniso is not None
    u_arr = _c(u, dtype) if has_aniso else _on_device(np.zeros(1), dtype)
    flag = _c(is_aniso, cp.uint8) if has_aniso else _on_device(np.zeros(1), np.uint8)
    geom_np = np.asarray(geom.get() if hasattr(geom, "get") else geom, dtype=np.float64)
    # Slabs along the first grid axis: the widest bounding box over all atoms (radius.max(),
    # a device→host sync, unless the caller gives it: an upper bound of the radii).
    if radius_max is None:
        radius_max = float(radius.max()) if radius.size else 0.0
    rmax = float(radius_max)
    row0 = float(np.sqrt((geom_np[:3] ** 2).sum()))
    n_slabs = int(math.floor(2 * rmax * row0)) + 1
    args = (_c(xyz, dtype), _c(b, dtype), u_arr, flag, _c(occ, dtype), _c(stype, cp.int32),
            _c(coefs, cp.float64), _c(radius, dtype), _on_device(geom_np, np.float64))
    return args, has_aniso, n_models, n_atoms, n_slabs


def spread_density(xyz, b, u, is_aniso, occ, stype, coefs, radius, geom, blur, periodic, out,
                   radius_max=None):
    """GPU twin of cpu_fallback.spread_density."""
    dtype = _real(out.dtype)
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    args, has_aniso, nm, na, ns = _atom_args(xyz, b, u, is_aniso, occ, stype, coefs, radius,
                                             geom, dtype, radius_max)
    out.fill(0)
    n0, n1, n2 = out.shape[1:]
    kernel = "spread_density_kernel" if has_aniso else "spread_density_iso_kernel"
    _launch(get_kernel("density", kernel, dtype), nm * na * ns,
            args + (np.float64(blur), _periodic_mask(periodic), np.int32(has_aniso),
                    np.int64(nm), np.int64(na), np.int32(ns), np.int32(n0), np.int32(n1),
                    np.int32(n2), out))
    return out


def cutoff_radii(b, u, is_aniso, stype, coefs, blur, cutoff, out, max_steps=64):
    """GPU twin of cpu_fallback.cutoff_radii."""
    dtype = _real(out.dtype)
    if not out.flags.c_contiguous or out.shape != b.shape:
        raise ValueError("out must be C-contiguous and shaped as b")
    has_aniso = u is not None and is_aniso is not None
    u_arr = _c(u, dtype) if has_aniso else _on_device(np.zeros(1), dtype)
    flag = _c(is_aniso, cp.uint8) if has_aniso else _on_device(np.zeros(1), np.uint8)
    nm, na = b.shape
    _launch(get_kernel("density", "cutoff_radius_kernel", dtype), nm * na,
            (_c(b, dtype), u_arr, flag, _c(stype, cp.int32), _c(coefs, cp.float64),
             np.float64(blur), np.int32(has_aniso), np.float64(cutoff), np.int32(max_steps),
             np.int64(nm), np.int64(na), out))
    return out


def density_adjoint(xyz, b, u, is_aniso, occ, stype, coefs, radius, geom, blur, periodic, dmap,
                    out=None, radius_max=None):
    """GPU twin of cpu_fallback.density_adjoint."""
    dtype = _real(xyz.dtype)
    args, has_aniso, nm, na, ns = _atom_args(xyz, b, u, is_aniso, occ, stype, coefs, radius,
                                             geom, dtype, radius_max)
    if out is None:
        # One zeroed buffer, cut into the four (contiguous) outputs: one launch, not four.
        flat = cp.zeros(nm * na * 11, dtype)
        parts = np.cumsum([0, 3, 1, 6, 1]) * nm * na
        out = tuple(flat[a:b].reshape((nm, na) + tail) for a, b, tail in
                    zip(parts[:-1], parts[1:], ((3,), (), (6,), ())))
    else:
        for o in out:
            o.fill(0)
    n0, n1, n2 = dmap.shape[1:]
    kernel = "density_adjoint_kernel" if has_aniso else "density_adjoint_iso_kernel"
    _launch(get_kernel("density", kernel, dtype), nm * na * ns,
            args + (np.float64(blur), _periodic_mask(periodic), np.int32(has_aniso),
                    np.int64(nm), np.int64(na), np.int32(ns), np.int32(n0), np.int32(n1),
                    np.int32(n2), _c(dmap, dtype)) + tuple(out))
    return out


def interpolate_at_atoms(maps, map_index, xyz, geom, periodic, order, out=None):
    """GPU twin of cpu_fallback.interpolate_at_atoms."""
    dtype = _real(xyz.dtype)
    nm, na = xyz.shape[:2]
    if out is None:
        out = (cp.empty((nm, na), dtype), cp.empty((nm, na, 3), dtype))
    n0, n1, n2 = maps.shape[1:]
    geom_np = np.asarray(geom.get() if hasattr(geom, "get") else geom, dtype=np.float64)
    _launch(get_kernel("interpolate", "interpolate_at_atoms_kernel", dtype), nm * na,
            (_c(maps, dtype), _c(map_index, cp.int32), _c(xyz, dtype),
             _on_device(geom_np, np.float64), _periodic_mask(periodic), np.int32(order), np.int64(nm), np.int64(na),
             np.int32(n0), np.int32(n1), np.int32(n2)) + tuple(out))
    return out


def _restraint_launch(function, dtype, n_models, n_restr, args, energy, grad, delta):
    """Grid (restraints, models); ``energy`` and ``grad`` are added to, ``delta`` filled."""
    if energy.dtype != cp.float64 or not energy.flags.c_contiguous:
        raise ValueError("energy must be a C-contiguous float64 array")
    if grad.dtype != dtype or not grad.flags.c_contiguous:
        raise ValueError(f"grad must be a C-contiguous {dtype} array")
    if delta is not None and (delta.dtype != dtype or not delta.flags.c_contiguous):
        raise ValueError(f"delta must be a C-contiguous {dtype} array")
    if n_restr == 0 or n_models == 0:
        return
    want = delta is not None
    out = delta if want else cp.empty(1, dtype)
    grid = ((n_restr + _BLOCK - 1) // _BLOCK, n_models)
    get_kernel("restraints", function, dtype)(
        grid, (_BLOCK,), args + (np.int32(n_restr), np.int32(want), energy, grad, out))


def _indexed_terms(function, xyz, atoms, ideal, weight, energy, grad, delta, extra=()):
    dtype = _real(xyz.dtype)
    xyz = _c(xyz, dtype)
    args = (xyz, _c(atoms, cp.int32), _c(ideal, dtype), _c(weight, dtype)) + extra + (
        np.int32(xyz.shape[1]),)
    _restraint_launch(function, dtype, xyz.shape[0], len(atoms), args, energy, grad, delta)


def bond_terms(xyz, atoms, ideal, weight, energy, grad, delta=None):
    """GPU twin of cpu_fallback.bond_terms."""
    _indexed_terms("bond_terms_kernel", xyz, atoms, ideal, weight, energy, grad, delta)


def nonbonded_terms(xyz, atoms, dmin, weight, energy, grad, delta=None):
    """GPU twin of cpu_fallback.nonbonded_terms."""
    _indexed_terms("nonbonded_terms_kernel", xyz, atoms, dmin, weight, energy, grad, delta)


def angle_terms(xyz, atoms, ideal, weight, energy, grad, delta=None):
    """GPU twin of cpu_fallback.angle_terms."""
    _indexed_terms("angle_terms_kernel", xyz, atoms, ideal, weight, energy, grad, delta)


def torsion_terms(xyz, atoms, ideal, weight, period, energy, grad, delta=None):
    """GPU twin of cpu_fallback.torsion_terms."""
    _indexed_terms("torsion_terms_kernel", xyz, atoms, ideal, weight, energy, grad, delta,
               (_c(period, cp.int32),))


def chiral_terms(xyz, atoms, ideal, weight, sign, energy, grad, delta=None):
    """GPU twin of cpu_fallback.chiral_terms."""
    _indexed_terms("chiral_terms_kernel", xyz, atoms, ideal, weight, energy, grad, delta,
               (_c(sign, cp.int8),))


def plane_terms(xyz, ptr, atoms, weight, energy, grad, delta=None):
    """GPU twin of cpu_fallback.plane_terms."""
    dtype = _real(xyz.dtype)
    xyz = _c(xyz, dtype)
    args = (xyz, _c(ptr, cp.int32), _c(atoms, cp.int32), _c(weight, dtype),
            np.int32(xyz.shape[1]))
    _restraint_launch("plane_terms_kernel", dtype, xyz.shape[0], len(ptr) - 1, args, energy,
                      grad, delta)


def moved_beyond(xyz, ref, allowed, out):
    """GPU twin of cpu_fallback.moved_beyond."""
    dtype = _real(xyz.dtype)
    if out.dtype != cp.int32 or out.shape != ():
        raise ValueError("out must be a 0-d int32 array")
    n = xyz.shape[0] * xyz.shape[1]
    _launch(get_kernel("restraints", "moved_beyond_kernel", dtype), n,
            (_c(xyz, dtype), _c(ref, dtype), np.int64(n), np.float64(allowed * allowed), out))
    return out


def adp_similarity_terms(values, atoms, weight, energy, grad, delta=None):
    """GPU twin of cpu_fallback.adp_similarity_terms."""
    dtype = _real(values.dtype)
    values = _c(values, dtype)
    n_models, n_atoms, n_values = values.shape
    args = (values, _c(atoms, cp.int32), _c(weight, dtype), np.int32(n_atoms),
            np.int32(n_values))
    _restraint_launch("adp_similarity_terms_kernel", dtype, n_models, len(atoms), args, energy,
                      grad, delta)


def banded_solve(band, rhs, transpose, out, rhs_rows=None, out_rows=None):
    """GPU twin of cpu_fallback.banded_solve."""
    dtype = _real(out.dtype)
    if not out.flags.c_contiguous or out.shape != rhs.shape or rhs.ndim != 3:
        raise ValueError("rhs and out must be (B, n, w), out C-contiguous")
    n_models, n, width = rhs.shape
    band = _c(band, cp.float64)
    none = _on_device(np.zeros(1), np.int32)
    rows = [(none, np.int32(0)) if r is None else (_c(r, cp.int32), np.int32(1))
            for r in (rhs_rows, out_rows)]
    _launch(get_kernel("banded", "banded_solve_kernel", dtype), n_models * width,
            (band, np.int32(n), np.int32(band.shape[0] - 1), _c(rhs, dtype), *rows[0],
             np.int32(n_models), np.int32(width), np.int32(bool(transpose)), *rows[1], out))
    return out


def _voxel_blocks(n_voxels):
    """Blocks per model of the CC kernels: each thread some 8 voxels, at most 64 blocks (the
    partial sums are 64 × 4 warps per model)."""
    return max(1, min(64, -(-n_voxels // (_BLOCK * 8))))


def _cc_args(image, masks, mask_index, y, my):
    dtype = _real(image.dtype)
    n = image.shape[0]
    n_voxels = int(np.prod(image.shape[1:]))
    if masks.dtype != cp.float32 or int(np.prod(masks.shape[1:])) != n_voxels:
        raise ValueError("masks must be float32 grids of the image's size")
    return dtype, n, n_voxels, (_c(image, dtype), _c(masks, cp.float32), _c(mask_index, cp.int32),
                                _c(y, cp.float64), _c(my, cp.float64))


def cc_statistics(image, masks, mask_index, y, my, w_sum, syy, scale, out, value):
    """GPU twin of cpu_fallback.cc_statistics."""
    dtype, n, n_voxels, args = _cc_args(image, masks, mask_index, y, my)
    if out.dtype != cp.float64 or not out.flags.c_contiguous or out.shape != (n, 4):
        raise ValueError("out must be a C-contiguous (B, 4) float64 array")
    blocks = _voxel_blocks(n_voxels)
    warps = blocks * (_BLOCK // 32)
    partial = cp.empty((n, warps, 3), cp.float64)
    get_kernel("cc_target", "cc_sums_kernel", dtype)(
        (blocks, n), (_BLOCK,), args + (np.int64(n_voxels), partial))
    _launch(get_kernel("cc_target", "cc_finish_kernel", dtype), n,
            (partial, np.int32(warps), args[2], _c(w_sum, cp.float64), _c(syy, cp.float64),
             _c(scale, cp.float64), np.int32(n), out, value))
    return out


def cc_gradient_map(image, masks, mask_index, y, my, syy, stats, scale, out):
    """GPU twin of cpu_fallback.cc_gradient_map."""
    dtype, n, n_voxels, args = _cc_args(image, masks, mask_index, y, my)
    if out.dtype != dtype or not out.flags.c_contiguous or out.shape != image.shape:
        raise ValueError("out must be C-contiguous, shaped and typed as image")
    get_kernel("cc_target", "cc_gradient_map_kernel", dtype)(
        (_voxel_blocks(n_voxels), n), (_BLOCK,),
        args + (_c(syy, cp.float64), _c(stats, cp.float64), _c(scale, cp.float64),
                np.int64(n_voxels), out))
    return out


def _check_history(gram, rho):
    m = rho.shape[1]
    if m > 32:
        raise ValueError("the L-BFGS kernels keep at most 32 pairs (MAX_HISTORY)")
    for name, a in (("gram", gram), ("rho", rho)):
        if a.dtype != cp.float64 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous float64 array")
    return m


def lbfgs_direction(gram, gv, rho, gamma, gmax, active, head, check_descent, coef, dg):
    """GPU twin of cpu_fallback.lbfgs_direction."""
    m = _check_history(gram, rho)
    n = rho.shape[0]
    _launch(get_kernel("lbfgs", "lbfgs_direction_kernel", gmax.dtype), n,
            (gram, _c(gv, cp.float64), rho, _c(gamma, cp.float64), _c(gmax, _real(gmax.dtype)),
             _c(active, cp.bool_), np.int32(head), np.int32(m), np.int32(bool(check_descent)),
             np.int32(n), coef, dg))
    return coef, dg


def lbfgs_update(gram, rho, gamma, cols, head, active, pending, f, f_new, g_new, gtol, ftol,
                 failures, slow, iterations, gmax):
    """GPU twin of cpu_fallback.lbfgs_update (one warp per model)."""
    m = _check_history(gram, rho)
    dtype = _real(g_new.dtype)
    n, n_par = g_new.shape
    if n:
        get_kernel("lbfgs", "lbfgs_update_kernel", dtype)(
            (n,), (32,),
            (gram, rho, gamma, _c(cols, cp.float64), np.int32(head), np.int32(m), active,
             _c(pending, cp.bool_), _c(f, cp.float64), _c(f_new, cp.float64), _c(g_new, dtype),
             np.int64(n_par), np.float64(gtol), np.float64(ftol), failures, slow, iterations,
             gmax))


def lbfgs_step(d, active, max_step, out):
    """GPU twin of cpu_fallback.lbfgs_step (one warp per model)."""
    n, n_par = d.shape
    if n:
        get_kernel("lbfgs", "lbfgs_step_kernel", cp.float64)(
            (n,), (32,), (_c(d, cp.float64), np.int64(n_par), _c(active, cp.bool_),
                          np.float64(max_step), out))
    return out


def _bound(v):
    """(values, count) of a bound for the kernels: count 0 (none), 1 (one for all) or P."""
    if v is None:
        return _on_device(np.zeros(1), np.float64), np.int32(0)
    if isinstance(v, cp.ndarray):
        v = _c(v, cp.float64).reshape(-1)
    else:   # a host number or array: moved once
        v = _on_device(np.atleast_1d(np.asarray(v, np.float64)), np.float64)
    return v, np.int32(v.size)


def lbfgs_trial(x, d, step, pending, x_last, lower, upper, out):
    """GPU twin of cpu_fallback.lbfgs_trial."""
    dtype = _real(x.dtype)
    n_models, n_par = x.shape
    (lo, n_lo), (hi, n_hi) = _bound(lower), _bound(upper)
    _launch(get_kernel("lbfgs", "lbfgs_trial_kernel", dtype), n_models * n_par,
            (_c(x, dtype), _c(d, cp.float64), _c(step, cp.float64), _c(pending, cp.bool_),
             _c(x_last, dtype), lo, n_lo, hi, n_hi, np.int64(n_par), np.int64(n_models * n_par),
             out))
    return out


def lbfgs_accept(f_t, g_t, trial, f, step, slope, pending, armijo, f_last, g_last, x_last,
                 f_out, g_out, x_out, ok_out, pending_out):
    """GPU twin of cpu_fallback.lbfgs_accept."""
    dtype = _real(trial.dtype)
    n_models, n_par = trial.shape
    _launch(get_kernel("lbfgs", "lbfgs_accept_kernel", dtype), n_models * n_par,
            (_c(f_t, cp.float64), _c(g_t, dtype), _c(trial, dtype), _c(f, cp.float64),
             _c(step, cp.float64), _c(slope, cp.float64), _c(pending, cp.bool_),
             np.float64(armijo),
             _c(f_last, cp.float64), _c(g_last, dtype), _c(x_last, dtype), np.int64(n_par),
             np.int64(n_models * n_par), f_out, g_out, x_out, ok_out, pending_out))
    return ok_out


def lbfgs_pair(x_new, x, g_new, g, vectors, head):
    """GPU twin of cpu_fallback.lbfgs_pair."""
    dtype = _real(x.dtype)
    n_models, n_par = x.shape
    if vectors.dtype != cp.float64 or not vectors.flags.c_contiguous:
        raise ValueError("vectors must be a C-contiguous float64 array")
    m = (vectors.shape[1] - 1) // 2
    _launch(get_kernel("lbfgs", "lbfgs_pair_kernel", dtype), n_models * n_par,
            (_c(x_new, dtype), _c(x, dtype), _c(g_new, dtype), _c(g, dtype), np.int32(head),
             np.int32(m), np.int64(n_par), np.int64(n_models * n_par), vectors))
    return vectors


def fourier_filter(maps, filt):
    """GPU twin of cpu_fallback.fourier_filter: cuFFT, the inverse's input overwritten (no
    copy) and left unscaled (norm='forward': the 1/N is in the filter)."""
    f = cufft.rfftn(maps, axes=(1, 2, 3))
    f *= filt[None]
    return cufft.irfftn(f, s=maps.shape[1:], axes=(1, 2, 3), norm="forward",
                        overwrite_x=True).astype(maps.dtype, copy=False)


def lbfgs_project_gradient(x, g, lower, upper, out):
    """GPU twin of cpu_fallback.lbfgs_project_gradient."""
    dtype = _real(x.dtype)
    n_models, n_par = x.shape
    (lo, n_lo), (hi, n_hi) = _bound(lower), _bound(upper)
    _launch(get_kernel("lbfgs", "lbfgs_project_gradient_kernel", dtype), n_models * n_par,
            (_c(x, dtype), _c(g, dtype), lo, n_lo, hi, n_hi, np.int64(n_par),
             np.int64(n_models * n_par), out))
    return out


def lbfgs_bound_direction(d, x, g, lower, upper, active, gamma, gmax, rho, dg):
    """GPU twin of cpu_fallback.lbfgs_bound_direction (one warp per model)."""
    dtype = _real(x.dtype)
    n_models, n_par = x.shape
    if d.dtype != cp.float64 or not d.flags.c_contiguous:
        raise ValueError("d must be a C-contiguous float64 array")
    (lo, n_lo), (hi, n_hi) = _bound(lower), _bound(upper)
    if n_models:
        get_kernel("lbfgs", "lbfgs_bound_direction_kernel", dtype)(
            (n_models,), (32,),
            (d, _c(x, dtype), _c(g, dtype), lo, n_lo, hi, n_hi, _c(active, cp.bool_),
             _c(gamma, cp.float64), _c(gmax, dtype), rho, np.int32(rho.shape[1]),
             np.int64(n_par), dg))
    return d, dg


def lbfgs_slope(trial, x, g, out):
    """GPU twin of cpu_fallback.lbfgs_slope (one warp per model)."""
    dtype = _real(x.dtype)
    n_models, n_par = x.shape
    if n_models:
        get_kernel("lbfgs", "lbfgs_slope_kernel", dtype)(
            (n_models,), (32,), (_c(trial, dtype), _c(x, dtype), _c(g, dtype), np.int64(n_par),
                                 out))
    return out
