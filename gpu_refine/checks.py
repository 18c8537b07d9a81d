"""The ranges that numbers from users must lie in, and the check that results are finite.

Every number a user gives (a parameter, a header field, a coordinate, B, U, occupancy) is
checked against a physical range before any allocation or work, so that nonsense is one line
of error and not a huge array or an overflow; every number a run reports is checked to be
finite before it is written.
"""
import numpy as np

from .errors import ParameterError, ResultError

# Model values (Å, Å²).  Coordinates: the PDB format stops at 10^4 Å, and no map is larger.
MAX_COORDINATE = 1.0e4
MAX_B = 1000.0            # an rms displacement of 3.6 Å; PDB files stop at 999.99
# A B below 0 is no displacement, but deposited files have a few near it (warned about);
# far below, the blur that keeps its Gaussian positive would wash out every other atom's.
MIN_B = -100.0
# Map headers: a cell edge beyond 10^4 Å or a voxel beyond 50 Å is no molecule's map.
MAX_CELL = 1.0e4
MAX_VOXEL = 50.0
MAX_MAP_POINTS = 2 ** 31 - 1
# A box the program makes around a model: 2^28 points, 1 GiB of float32 a model.
MAX_BOX_POINTS = 2 ** 28


def check_number(name, value, low, high, unit="", integer=False):
    """``value`` as a float (an int with ``integer``) if finite and within [low, high], else
    ParameterError naming the parameter and its range."""
    unit = f" {unit}" if unit else ""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be a number, not {value!r}") from None
    if not np.isfinite(x) or not low <= x <= high:
        raise ParameterError(f"{name}={x:g}{unit} is out of range ({low:g} to {high:g}{unit})")
    if integer:
        if x != int(x):
            raise ParameterError(f"{name} must be a whole number, not {value!r}")
        return int(x)
    return x


def check_finite_rows(rows):
    """ResultError naming the key and model where a row (one dict of statistics per model)
    holds a float that is not finite."""
    for i, row in enumerate(rows, start=1):
        for key, value in row.items():
            if isinstance(value, float) and not np.isfinite(value):
                raise ResultError(f"the run produced a non-finite {key} for model {i}; "
                                  "nothing was written")


def check_finite(what, array, where=None):
    """ResultError if ``array`` (B, ...) holds a non-finite number: names the first model and,
    given ``where`` (index -> text, e.g. an atom's name), the first element."""
    a = np.asarray(array, dtype=np.float64)
    bad = ~np.isfinite(a)
    if not bad.any():
        return
    index = np.argwhere(bad)[0]
    at = ""
    if a.ndim >= 2:
        at = f" in model {index[0] + 1}"
        if where is not None:
            at += f" at {where(int(index[1]))}"
    raise ResultError(f"the run produced a non-finite {what}{at} ({int(bad.sum())} values); "
                      "nothing was written")
