"""emsedit_fast: custom-kernel accelerated hypernetwork knowledge editing of LLMs.

EMSEdit (multi-step backpropagation, MSBP) and the editors it builds on (MEND, MALMEN, RLEdit) on fused ops with a
pure-PyTorch reference path. Importing the package never imports Triton and never needs CUDA.
"""

from emsedit_fast import _ext  # noqa: F401  (loads the C++ ops when they were built)
from emsedit_fast.ops import record_backends
from emsedit_fast.ops import use_backend
from emsedit_fast.version import __version__

__all__ = ["__version__", "record_backends", "use_backend"]
