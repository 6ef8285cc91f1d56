"""EMSEdit (Li et al., WWW 2026): multi-step backpropagation (K = 2) with the l2 drift penalty
c * sum_l ||W_l - W_l^0||^2 in place of the KL locality loss. Sequential editing uses step-specific networks of rank
r / k (Algorithm 1); batch editing one shared network updated after every step (Algorithm 2). METHOD.md 9.2, 11, 12."""

from emsedit_fast.editors.base import Editor


class EMSEdit(Editor):
    aggregation = "ridge"
    default_regime = "sequential"
    default_loss = "l2"
