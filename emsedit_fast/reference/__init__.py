"""Pure-PyTorch reference implementations of every emsedit_fast op.

These functions define the semantics of the fused kernels: the C++ (`csrc/`) and Triton (`kernels/`) backends must
match them within the tolerances of `emsedit_fast.testing`. They compute the method as published: one hypernetwork
call per edited layer, a primal d_in x d_in solve, a dense fp32 weight delta. They also serve as the fallback backend
and as the baseline of every benchmark.
"""

from emsedit_fast.reference.apply_deltas import apply_deltas_
from emsedit_fast.reference.apply_deltas import apply_deltas_dense_
from emsedit_fast.reference.hypernet_block import hypernet_block
from emsedit_fast.reference.hypernet_block import hypernet_block_backward
from emsedit_fast.reference.restore import restore_
from emsedit_fast.reference.ridge import ridge_solve
from emsedit_fast.reference.ridge import ridge_solve_backward
from emsedit_fast.reference.running_stats import running_stats_normalize
from emsedit_fast.reference.running_stats import running_stats_update_
from emsedit_fast.reference.value_targets import value_targets
from emsedit_fast.reference.value_targets import value_targets_backward

__all__ = [
    "apply_deltas_",
    "apply_deltas_dense_",
    "hypernet_block",
    "hypernet_block_backward",
    "restore_",
    "ridge_solve",
    "ridge_solve_backward",
    "running_stats_normalize",
    "running_stats_update_",
    "value_targets",
    "value_targets_backward",
]
