"""NumPy twins of kernels/cc_target.cu: the correlation of model maps with one map inside soft
masks (``cc_statistics``) and its gradient map (``cc_gradient_map``).  Arguments and formulas
are those of the .cu file's header; image and out may have any shape (B, ...)."""
import numpy as np

def _flat(a, n):
    return np.asarray(a).reshape(n, -1)


def cc_statistics(image, masks, mask_index, y, my, w_sum, syy, scale, out, value):
    """stats (B, 4) float64 written into ``out``: CC, mx, Sxx, Sxy of each model map; and
    ``value`` (B,) = scale (1 - CC)."""
    n = image.shape[0]
    x_all, w_all = _flat(image, n), _flat(masks, masks.shape[0])
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    for m in range(n):
        k = int(mask_index[m])
        w = w_all[k].astype(np.float64)
        x = x_all[m].astype(np.float64)
        wx = w * x
        sx, sxx, sxy = wx.sum(), wx @ x, wx @ (y - my[k])
        mx = sx / w_sum[k]
        s = sxx - mx * sx
        out[m] = (sxy / np.sqrt(max(s, 1e-300) * syy[k]), mx, s, sxy)
    value[:] = scale * (1.0 - out[:, 0])
    return out


def cc_gradient_map(image, masks, mask_index, y, my, syy, stats, scale, out):
    """scale[b] × dCC/d(image) of each model b, written into ``out`` (image's shape and
    dtype)."""
    n = image.shape[0]
    x_all, w_all, o_all = _flat(image, n), _flat(masks, masks.shape[0]), out.reshape(n, -1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    for m in range(n):
        k = int(mask_index[m])
        sxx = max(stats[m, 2], 1e-300)
        a, c = scale[m] / np.sqrt(sxx * syy[k]), scale[m] * stats[m, 0] / sxx
        w = w_all[k].astype(np.float64)
        o_all[m] = w * (a * (y - my[k]) - c * (x_all[m].astype(np.float64) - stats[m, 1]))
    return out
