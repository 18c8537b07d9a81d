"""Form-factor tables from gemmi as (T, 2, 5) arrays of Gaussian a and b coefficients.

X-ray: International Tables 1992 (4 Gaussians + constant; the constant becomes a fifth Gaussian
with b = 0, which is how gemmi's DensityCalculatorX places it).  Electron: gemmi's 5-Gaussian
table from International Tables Vol. C 4.3.2.2 (``c4322``), as in DensityCalculatorE.
"""
import gemmi
import numpy as np

from .errors import ParameterError

TABLES = ("electron", "xray")
NGAUSS = 5


def _coefs(element, table):
    el = gemmi.Element(element)
    if table == "electron":
        c = el.c4322.get_coefs()
        return np.array([c[:5], c[5:10]], dtype=np.float64)
    c = el.it92.get_coefs()
    return np.array([c[:4] + [c[8]], c[4:8] + [0.0]], dtype=np.float64)


def form_factor_table(elements, table="electron"):
    """Coefficients for each element name in ``elements`` (T names) -> (T, 2, 5) float64."""
    if table not in TABLES:
        raise ParameterError(f"unknown scattering table {table!r}; choose one of {', '.join(TABLES)}")
    return np.stack([_coefs(e, table) for e in elements]) if len(elements) else np.zeros((0, 2, 5))


def form_factor(coefs, s2):
    """f(s) for each type at s² = 1/d² (Å⁻²): sum_g a_g exp(-b_g s²/4) -> (T, len(s2))."""
    s2 = np.asarray(s2, dtype=np.float64)
    return np.einsum("tg,tgs->ts", coefs[:, 0], np.exp(-coefs[:, 1, :, None] * s2[None, None] / 4))
