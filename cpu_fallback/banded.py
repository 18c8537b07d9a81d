"""Triangular solves with a banded lower-triangular matrix (twin of ``kernels/banded.cu``)."""
import numpy as np
from scipy.linalg import lapack


def banded_solve(band, rhs, transpose, out, rhs_rows=None, out_rows=None):
    """``out`` = L^-1 rhs, or L^-T rhs where ``transpose``, for the lower-triangular L in
    LAPACK band storage ``band`` (k+1, n) float64: band[d, j] = L[j + d, j].  rhs and out are
    (B, n, w): B * w right-hand sides, row i of the factor at row rhs_rows[i] of rhs and
    out_rows[i] of out (None: the same row).  Solved in float64, written in out's dtype."""
    n_models, n, width = rhs.shape
    if n == 0 or n_models * width == 0:
        return out
    cols = np.asarray(rhs if rhs_rows is None else rhs[:, rhs_rows], dtype=np.float64)
    cols = cols.transpose(1, 0, 2).reshape(n, -1)
    x, info = lapack.dtbtrs(band, cols, uplo="L", trans="T" if transpose else "N")
    if info != 0:
        raise ValueError(f"banded_solve: LAPACK dtbtrs returned info={info} (a zero on the "
                         "diagonal)")
    y = x.reshape(n, n_models, width).transpose(1, 0, 2)
    if out_rows is None:
        out[...] = y
    else:
        out[:, out_rows] = y
    return out
