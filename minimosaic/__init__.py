"""minimosaic: Memory Mosaics and the deep-learning stack under them, from scratch in NumPy/CuPy."""
from . import ops
from .backend import array_module, asnumpy, get_array_module, gpu_available, to_device
from .errors import MinimosaicError
from .gradcheck import GradcheckError, gradcheck
from .tensor import Tensor, no_grad

__version__ = "0.1.0"

__all__ = ["Tensor", "no_grad", "ops", "gradcheck", "GradcheckError", "MinimosaicError",
           "array_module", "get_array_module", "asnumpy", "to_device", "gpu_available"]
