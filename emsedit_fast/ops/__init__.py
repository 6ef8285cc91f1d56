"""The public ops: each checks its inputs once, picks a backend (reference, cpp, triton) per call and records which
one ran.

See emsedit_fast.ops._dispatch for the selection rules and emsedit_fast.reference for the semantics. Every op stem
(OPS_BY_STEM) has the same twins: emsedit_fast/reference/<stem>.py, emsedit_fast/ops/<stem>.py, a schema in
csrc/ops.cpp with its CPU kernel in csrc/cpu/<stem>.cpp (and csrc/cuda/<stem>.cu), kernels/<stem>.py (Triton),
tests/ops/test_<stem>.py and benchmarks/bench_<stem>.py; tests/test_layout.py fails when one is missing.
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
from emsedit_fast.ops.running_stats import NORM_EPS
from emsedit_fast.ops.running_stats import running_stats_normalize
from emsedit_fast.ops.running_stats import running_stats_update_
from emsedit_fast.ops.value_targets import value_targets
from emsedit_fast.ops.value_targets import value_targets_backward

# Every public op, by stem: the one list of stems (STEMS); tests/test_layout.py checks each stem's twins.
OPS_BY_STEM = {
    "running_stats": ("running_stats_update_", "running_stats_normalize"),
    "hypernet_block": ("hypernet_block", "hypernet_block_backward"),
    "value_targets": ("value_targets", "value_targets_backward"),
    "ridge": ("ridge_solve", "ridge_solve_backward"),
    "apply_deltas": ("apply_deltas_", "apply_deltas_dense_"),
    "restore": ("restore_",),
}
STEMS = tuple(OPS_BY_STEM)

__all__ = [
    "BACKENDS",
    "NORM_EPS",
    "OPS_BY_STEM",
    "STEMS",
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
