"""The public ops: each picks a backend (reference, cpp, triton) per call and records which one ran.

See emsedit_fast.ops._dispatch for the selection rules and emsedit_fast.reference for the semantics.
"""

from emsedit_fast.ops._dispatch import BACKENDS
from emsedit_fast.ops._dispatch import availability
from emsedit_fast.ops._dispatch import record_backends
from emsedit_fast.ops._dispatch import requested_backend
from emsedit_fast.ops._dispatch import use_backend
from emsedit_fast.ops.apply_deltas import apply_deltas_
from emsedit_fast.ops.apply_deltas import apply_deltas_dense_
from emsedit_fast.ops.hypernet_block import hypernet_block
from emsedit_fast.ops.hypernet_block import hypernet_block_backward
from emsedit_fast.ops.restore import restore_
from emsedit_fast.ops.restore import snapshot
from emsedit_fast.ops.ridge import choose_form
from emsedit_fast.ops.ridge import ridge_solve
from emsedit_fast.ops.ridge import ridge_solve_backward
from emsedit_fast.ops.running_stats import running_stats_normalize
from emsedit_fast.ops.running_stats import running_stats_update_
from emsedit_fast.ops.value_targets import value_targets
from emsedit_fast.ops.value_targets import value_targets_backward

# Every public op, by stem: tests/test_layout.py checks each has its reference, C++, Triton, test and benchmark twins.
OPS_BY_STEM = {
    "running_stats": ("running_stats_update_", "running_stats_normalize"),
    "hypernet_block": ("hypernet_block", "hypernet_block_backward"),
    "value_targets": ("value_targets", "value_targets_backward"),
    "ridge": ("ridge_solve", "ridge_solve_backward"),
    "apply_deltas": ("apply_deltas_", "apply_deltas_dense_"),
    "restore": ("restore_",),
}

__all__ = [
    "BACKENDS",
    "OPS_BY_STEM",
    "apply_deltas_",
    "apply_deltas_dense_",
    "availability",
    "choose_form",
    "hypernet_block",
    "hypernet_block_backward",
    "record_backends",
    "requested_backend",
    "restore_",
    "ridge_solve",
    "ridge_solve_backward",
    "running_stats_normalize",
    "running_stats_update_",
    "snapshot",
    "use_backend",
    "value_targets",
    "value_targets_backward",
]
