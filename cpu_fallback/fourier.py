"""NumPy twin of gpu_refine/cuda.py ``fourier_filter`` (cuFFT there, pocketfft here)."""
import functools

from scipy import fft

_rfftn = functools.partial(fft.rfftn, workers=-1)
_irfftn = functools.partial(fft.irfftn, workers=-1)


def fourier_filter(maps, filt):
    """Maps (B, n0, n1, n2) with their rfft terms multiplied by the real filter ``filt``
    (n0, n1, n2 // 2 + 1), which carries the inverse transform's 1/N; float32 stays float32."""
    f = _rfftn(maps, axes=(1, 2, 3))
    f *= filt[None]
    return _irfftn(f, s=maps.shape[1:], axes=(1, 2, 3), norm="forward",
                   overwrite_x=True).astype(maps.dtype, copy=False)
