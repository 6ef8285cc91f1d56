"""Model adapter, caching hooks, tiny test models and the offline SmolLM2 loader.

`tiny` and `smollm2` are not imported here (they pull in transformers model classes); import them by module path.
"""

from emsedit_fast.models.adapter import EditedModule
from emsedit_fast.models.adapter import ShapeGroup
from emsedit_fast.models.adapter import default_module_patterns
from emsedit_fast.models.adapter import fingerprint
from emsedit_fast.models.adapter import fingerprint_details
from emsedit_fast.models.adapter import group_by_shape
from emsedit_fast.models.adapter import module_layout
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.hooks import Capture
from emsedit_fast.models.hooks import FactoredGrads
from emsedit_fast.models.hooks import capture
from emsedit_fast.models.hooks import factored_weight_grads
from emsedit_fast.models.hooks import selection_mask

__all__ = [
    "Capture",
    "EditedModule",
    "FactoredGrads",
    "ShapeGroup",
    "capture",
    "default_module_patterns",
    "factored_weight_grads",
    "fingerprint",
    "fingerprint_details",
    "group_by_shape",
    "module_layout",
    "resolve_modules",
    "selection_mask",
]
