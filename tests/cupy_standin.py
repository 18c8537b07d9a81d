"""A stand-in for CuPy on machines without a GPU, strict where CuPy is strict.

Its arrays hold NumPy arrays but behave towards host code as ``cupy.ndarray`` does: NumPy,
SciPy or gemmi cannot take them implicitly (``np.asarray(a)`` raises TypeError, as CuPy's
``__array__`` does), a NumPy array as the operand of a device function or ufunc raises
TypeError, and data come back only through ``.get()`` / ``asnumpy``.  As in CuPy, indexing and
item assignment accept NumPy arrays, ``float()`` / ``int()`` / ``bool()`` of one element sync,
and ``ascontiguousarray`` takes device arrays only.  Running the engine's GPU branches on it
finds host/device mix-ups without a GPU; the kernels come from ``host_cuda.py``.

Only what CuPy has is there: names, keywords and positional counts of functions, ufunc methods
and ndarray members are checked against ``cupy_api.json`` (made from CuPy itself by
``tools/cupy_api_snapshot.py``), so a NumPy-only call in a GPU branch raises here as on CuPy.

``allocation_limit`` (bytes, None for none) makes any larger device array raise
``cuda.memory.OutOfMemoryError``, to exercise batch splitting.

``cost`` counts what a GPU would be asked to do (bench/gpu_cost.py's cost model): device→host
synchronisations (``.get()``, ``asnumpy``, ``float/int/bool`` of a device value, ``.item()``),
host→device uploads and their bytes, launches (each raw kernel, each elementwise or reduction
call, each FFT; views and allocations are free) with the bytes each reads and writes (the
sizes of its array operands and result), and the raw kernels' own work as ``cost.work``
reports it (``host_cuda`` adds the density kernels' atom × grid-point pairs).
"""
import functools
import json
import pathlib
import types

import numpy as np
import numpy.lib.mixins
import scipy.fft

allocation_limit = None

# Members and functions that make no launch: views, metadata, allocations without a fill.
_FREE = {"reshape", "transpose", "swapaxes", "view", "squeeze", "T", "shape", "dtype", "ndim",
         "size", "nbytes", "flags", "strides", "itemsize", "real", "imag", "empty",
         "empty_like", "result_type", "broadcast_to", "expand_dims", "moveaxis", "shares_memory",
         "may_share_memory", "can_cast", "iscomplexobj", "isscalar", "atleast_1d",
         "atleast_2d", "atleast_3d", "broadcast_arrays", "base"}


class Cost:
    """Counters of device work (see the module's text); ``reset()`` zeroes them."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.syncs = 0
        self.uploads = 0
        self.upload_bytes = 0
        self.launches = 0
        self.bytes = 0           # read and written by launches
        self.pairs = 0           # atom × grid-point pairs of the density kernels
        self.by_name = {}        # launch name -> [count, bytes]

    def snapshot(self):
        return {"syncs": self.syncs, "uploads": self.uploads, "upload_bytes": self.upload_bytes,
                "launches": self.launches, "bytes": self.bytes, "pairs": self.pairs}

    def launch(self, name, nbytes, pairs=0):
        self.launches += 1
        self.bytes += int(nbytes)
        self.pairs += int(pairs)
        entry = self.by_name.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += int(nbytes)


cost = Cost()


def _nbytes(*objs):
    """Bytes of the device arrays in ``objs`` (through lists, tuples and dicts)."""
    total = 0
    for x in objs:
        if isinstance(x, ndarray):
            total += x._a.nbytes
        elif isinstance(x, (list, tuple)):
            total += _nbytes(*x)
        elif isinstance(x, dict):
            total += _nbytes(*x.values())
    return total

API = json.loads((pathlib.Path(__file__).with_name("cupy_api.json")).read_text())


def _member(table, owner, name):
    """CuPy's signature record of ``owner.name``; AttributeError where CuPy has no such name."""
    if name not in API[table]:
        raise AttributeError(f"{owner} has no attribute {name!r} (NumPy has it, CuPy "
                             f"{API['cupy_version']} does not: tests/cupy_api.json)")
    return API[table][name] or {}


def _check_call(spec, where, args, kwargs):
    """TypeError for more positional arguments or other keywords than CuPy's signature takes."""
    most = spec.get("positional")
    if most is not None and len(args) > most:
        raise TypeError(f"{where}() takes at most {most} positional arguments on CuPy "
                        f"({len(args)} given)")
    allowed = spec.get("keywords")
    if allowed is not None:
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise TypeError(f"{where}() got keyword arguments CuPy does not take: "
                            f"{', '.join(unknown)}")


class OutOfMemoryError(MemoryError):
    """What ``cupy.cuda.memory.OutOfMemoryError`` is to the engine: a MemoryError subclass."""


def _check_size(a):
    if allocation_limit is not None and a.nbytes > allocation_limit:
        raise OutOfMemoryError(f"out of memory allocating {a.nbytes} bytes (stand-in limit "
                               f"{allocation_limit})")


def _unwrap(x, where):
    """The NumPy array inside device arrays, recursively through lists and tuples; a NumPy
    array given where CuPy wants a device array raises TypeError."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} in {where} (a NumPy array where the "
                        "device wants a device array)")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, where) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v, where) for k, v in x.items()}
    return x


def _wrap(x):
    """Device arrays for what NumPy returned; NumPy scalars become 0-d arrays, as on CuPy."""
    if isinstance(x, np.generic):
        x = np.asarray(x)
    if isinstance(x, np.ndarray):
        _check_size(x)
        return ndarray._of(x)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


class ndarray(numpy.lib.mixins.NDArrayOperatorsMixin):  # noqa: N801 (cupy's name)
    __slots__ = ("_a",)

    @classmethod
    def _of(cls, a):
        obj = cls.__new__(cls)
        obj._a = a
        return obj

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use "
                        "`.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"{ufunc.__name__}.{method}"
        result = _wrap(getattr(ufunc, method)(*_unwrap(inputs, where), **_unwrap(kwargs, where)))
        if "out" not in kwargs:
            cost.launch(where, _nbytes(inputs, result))
        else:
            cost.launch(where, _nbytes(inputs, kwargs["out"]))
        return result

    def __array_function__(self, func, types_, args, kwargs):
        where = func.__name__
        result = _wrap(func(*_unwrap(args, where), **_unwrap(kwargs, where)))
        if where not in _FREE:
            cost.launch(where, _nbytes(args, kwargs, result))
        return result

    def get(self, stream=None, order="C", out=None):
        cost.syncs += 1
        return np.array(self._a, order=order)

    def __getitem__(self, key):
        result = _wrap(self._a[_unwrap_index(key)])
        if _advanced(key):      # a gather; a basic index is a view
            cost.launch("getitem", 2 * _nbytes(result) + _nbytes(key))
        return result

    def __setitem__(self, key, value):
        target = self._a[_unwrap_index(key)] if not _advanced(key) else None
        self._a[_unwrap_index(key)] = value._a if isinstance(value, ndarray) else value
        written = target.nbytes if target is not None else np.asarray(
            value._a if isinstance(value, ndarray) else value).nbytes
        cost.launch("setitem", written + _nbytes(value, key))

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def __bool__(self):
        cost.syncs += 1
        return bool(self._a)

    def __int__(self):
        cost.syncs += 1
        return int(self._a)

    def __float__(self):
        cost.syncs += 1
        return float(self._a)

    def __complex__(self):
        cost.syncs += 1
        return complex(self._a)

    def __repr__(self):
        return f"standin.{self._a!r}"

    def __str__(self):
        return str(self._a)

    def __format__(self, spec):
        return format(self._a[()] if self._a.ndim == 0 else self._a, spec)

    def __getattr__(self, name):
        # NumPy-only attributes (buffer and interface protocols, ctypes) are absent, as on CuPy.
        if name.startswith("__") or name in ("ctypes", "tofile", "tobytes", "data"):
            raise AttributeError(name)
        spec = _member("ndarray", "cupy.ndarray", name)
        value = getattr(self._a, name)
        if not callable(value):
            return _wrap(value)
        if name in ("item", "tolist"):
            cost.syncs += 1
        free = name in _FREE or (name == "ravel" and self._a.flags.c_contiguous)
        return _device_function(value, f"ndarray.{name}", spec, counted=not free,
                                operand=self)


def _unwrap_index(key):
    """Index keys: device arrays unwrapped, NumPy arrays accepted (CuPy copies them over)."""
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, tuple):
        return tuple(_unwrap_index(k) for k in key)
    return key


def _from_host(x):
    """Data for asarray / array: host data as they are, device arrays inside lists unwrapped."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, (list, tuple)):
        return type(x)(_from_host(v) for v in x)
    return x


def _advanced(key):
    """True for an index that gathers (an array or a list in it), False for a view."""
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (ndarray, np.ndarray, list)) for k in keys)


def _same_data(result, source):
    """A result that is its source's memory (asarray of a device array, astype(copy=False)
    to its own dtype): made without a launch."""
    return (isinstance(result, ndarray) and isinstance(source, ndarray)
            and np.may_share_memory(result._a, source._a))


def _device_function(fn, where, spec, host_input=False, counted=True, operand=None):

    @functools.wraps(fn)
    def call(*args, **kwargs):
        _check_call(spec, where, args, kwargs)
        if host_input and args and not isinstance(args[0], ndarray):
            # a copy from the host, never a view of host memory
            host = np.array(_from_host(args[0]))
            result = _wrap(fn(host, *_unwrap(args[1:], where), **_unwrap(kwargs, where)))
            cost.uploads += 1
            cost.upload_bytes += _nbytes(result)
            return result
        raw = fn(*_unwrap(args, where), **_unwrap(kwargs, where))
        if args and isinstance(args[0], ndarray) and raw is args[0]._a:
            return args[0]    # CuPy too gives the very array back (asarray of its dtype)
        result = _wrap(raw)
        if counted and where.rsplit(".", 1)[-1] not in _FREE and not _same_data(
                result, operand if operand is not None else (args[0] if args else None)):
            cost.launch(where, _nbytes(operand, args, kwargs, result))
        return result
    return call


class _Ufunc:
    """A NumPy ufunc as CuPy's: its call keywords and its methods (``at``, ``reduce`` ...)
    are those CuPy's ufuncs have."""

    def __init__(self, ufunc, where, spec):
        self._call = _device_function(ufunc, where, spec)
        self._ufunc = ufunc
        self._where = where

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        spec = _member("ufunc_methods", f"ufunc {self._where}", name)
        return _device_function(getattr(self._ufunc, name), f"{self._where}.{name}", spec)


def _namespace(name, source, host_input=()):
    module = types.ModuleType(name)

    def lookup(attr):
        spec = _member(name, name, attr)
        value = getattr(source, attr)
        if isinstance(value, types.ModuleType):
            raise AttributeError(f"the stand-in has no {name}.{attr}")
        if isinstance(value, np.ufunc):
            return _Ufunc(value, attr, spec)
        if callable(value) and not isinstance(value, type):
            return _device_function(value, f"{name}.{attr}", spec, attr in host_input)
        return value
    module.__getattr__ = lookup
    return module


def _fft_namespace(name="cupy.fft"):
    """cupy.fft on scipy.fft (as cuFFT, float32 stays single precision), with the passes
    CuPy adds to a transform counted as launches: the scaling by 1/N (or 1/sqrt N) where
    ``norm`` asks it of this direction, and the copy of a complex-to-real transform's input,
    which cuFFT overwrites (unless ``overwrite_x``, which only cupyx.scipy.fft takes)."""
    module = _namespace("cupy.fft", scipy.fft)
    module.__name__ = name
    plain = module.__getattr__
    scipy_like = name != "cupy.fft"

    def lookup(attr):
        fn = plain(attr)
        if not callable(fn) or not attr.endswith(("fft", "fft2", "fftn")):
            return fn
        inverse = attr.startswith(("i", "h")) and attr != "ihfft" or attr == "hfft"

        @functools.wraps(fn)
        def call(a, *args, overwrite_x=False, **kwargs):
            if overwrite_x and not scipy_like:
                raise TypeError(f"cupy.fft.{attr}() got an unexpected keyword 'overwrite_x'")
            if (attr.startswith("irfft") or attr == "hfft") and not overwrite_x:
                cost.launch(f"{name}.{attr} input copy", 2 * _nbytes(a))
            out = fn(a, *args, **kwargs)
            norm = kwargs.get("norm") or "backward"
            if norm == "ortho" or (norm == "backward") == inverse:
                cost.launch(f"{name}.{attr} scaling", 2 * _nbytes(out))
            return out
        return call
    module.__getattr__ = lookup
    return module


def cupyx_modules():
    """sys.modules entries that stand for cupyx, cupyx.scipy and cupyx.scipy.fft (the
    transforms with ``overwrite_x``; their signatures are not in cupy_api.json)."""
    fft = _fft_namespace("cupyx.scipy.fft")
    scipy_ns = types.ModuleType("cupyx.scipy")
    scipy_ns.fft = fft
    root = types.ModuleType("cupyx")
    root.scipy = scipy_ns
    return {"cupyx": root, "cupyx.scipy": scipy_ns, "cupyx.scipy.fft": fft}


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def _ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise TypeError(f"Argument 'a' has incorrect type (expected cupy.ndarray, got "
                        f"{type(a).__name__})")
    raw = np.ascontiguousarray(a._a, dtype=dtype)
    if raw is a._a:
        return a
    result = _wrap(raw)
    if not _same_data(result, a):
        cost.launch("ascontiguousarray", 2 * result._a.nbytes)
    return result


def module(raw_module=None):
    """A module object that stands for ``cupy`` (``RawModule`` from ``raw_module``)."""
    cp = _namespace("cupy", np, host_input=("asarray", "array"))
    cp.ndarray = ndarray
    cp.asnumpy = asnumpy
    cp.ascontiguousarray = _ascontiguousarray
    cp.fft = _fft_namespace()
    cp.RawModule = raw_module
    pool = types.SimpleNamespace(free_all_blocks=lambda: None)
    cp.get_default_memory_pool = lambda: pool
    synchronize = (lambda: None)   # work is done when a call returns
    cp.cuda = types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(id=0, synchronize=synchronize),
        Stream=types.SimpleNamespace(null=types.SimpleNamespace(synchronize=synchronize)),
        memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError))
    return cp
