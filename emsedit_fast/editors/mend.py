"""MEND (Mitchell et al., ICLR 2022): dW_l = -eta_l sum_j delta~_j u~_j^T, the sum of the pseudo pairs' outer products
(METHOD.md 7.1). Two blocks in MEND's affine-then-ReLU order; trained in the batch regime with a KL locality loss."""

from emsedit_fast.editors.base import Editor


class MEND(Editor):
    aggregation = "outer"
    default_regime = "batch"
    default_loss = "kl"
