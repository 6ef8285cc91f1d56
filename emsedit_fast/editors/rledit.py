"""RLEdit (Li et al., ICML 2025): MALMEN's least-squares editor trained for lifelong editing with a time-decayed loss
over the last `back_depth` batches and an r_S penalty on the shifts (METHOD.md 9.4). With n_steps = 2 it is RLEdit^2:
step-specific networks of rank r / k."""

from emsedit_fast.editors.base import Editor


class RLEdit(Editor):
    aggregation = "ridge"
    default_regime = "sequential"
    default_loss = "rledit_decay"
