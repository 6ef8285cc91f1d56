"""MALMEN (Tan et al., ICLR 2024): value targets from the pseudo pairs, then one ridge least-squares shift per layer
(METHOD.md 7.2-7.5). Batch regime with a KL locality loss. With n_steps = 2 it is MALMEN^2 (MSBP plug-in): one shared
network, updated after every step."""

from emsedit_fast.editors.base import Editor


class MALMEN(Editor):
    aggregation = "ridge"
    default_regime = "batch"
    default_loss = "kl"
