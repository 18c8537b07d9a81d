"""gpu_refine: batched refinement of macromolecular models against cryo-EM maps and X-ray data."""
__version__ = "0.1.0"

from .backend import Backend, available_backends, get_backend
from .density import DensitySettings, ModelMapper
from .errors import BackendError, GpuRefineError, InputError, ParameterError
from .grid import GridSpec, box_around
from .maps import MapData, read_map, write_map
from .model import Batch, Model, read_batch, read_model, write_model
from .workflows.rsr import RSRSettings, refine_real_space

__all__ = ["Backend", "Batch", "BackendError", "DensitySettings", "GpuRefineError", "GridSpec",
           "InputError", "MapData", "Model", "ModelMapper", "ParameterError", "available_backends",
           "RSRSettings", "box_around", "get_backend", "read_batch", "read_map", "read_model",
           "refine_real_space",
           "write_map", "write_model", "__version__"]
