"""Triangular solves with a banded lower-triangular matrix (twin of ``kernels/banded.cu``)."""
import numpy as np
from scipy.linalg import lapack


def banded_solve(band, rhs, transpose, out):
    """``out`` (n, ncol) = L^-1 rhs, or L^-T rhs where ``transpose``, for the lower-triangular
    L in LAPACK band storage ``band`` (k+1, n) float64: band[d, j] = L[j + d, j].  Each column
    of ``rhs`` (n, ncol) is one right-hand side; solved in float64, written in out's dtype."""
    if rhs.shape[0] == 0 or rhs.shape[1] == 0:
        return out
    x, info = lapack.dtbtrs(band, np.asarray(rhs, dtype=np.float64), uplo="L",
                            trans="T" if transpose else "N")
    if info != 0:
        raise ValueError(f"banded_solve: LAPACK dtbtrs returned info={info} (a zero on the "
                         "diagonal)")
    out[...] = x
    return out
