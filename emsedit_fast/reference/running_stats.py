"""Running normaliser over hypernetwork input rows x = [u ; delta] (docs/method.md, "Running normaliser").

State per hypernetwork: count N (1,) float64, mean mu (D,), population variance v (D,), sample std sigma (D,), all
fp32 except the count. An update merges a batch X (m x D) with the parallel formula of Chan, Golub and LeVeque:

    xbar = mean(X); v_b = mean((X - xbar)^2); N' = N + m; d = xbar - mu
    mu <- mu + d * m / N'
    M2  = v * N + v_b * m + d^2 * N * m / N'
    v   <- M2 / max(N', 1);  sigma <- sqrt(M2 / (N' - 1 + 1e-8));  N <- N'

so after any sequence of merges (mu, v) are the mean and population variance of every row seen, independent of the
order and grouping of the batches. The batch X is never concatenated by the fast paths: keys (m x d_in) fill the first
d_in columns, value-grads (m x d_out) the rest.
"""

import torch

# fp32 machine epsilon, 2^-23: the normaliser's denominator guard, z = (x - mu) / (sigma + EPS). Public name:
# emsedit_fast.ops.NORM_EPS.
EPS = 2.0**-23


def running_stats_update_(
    count: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    std: torch.Tensor,
    keys: torch.Tensor,
    value_grads: torch.Tensor,
) -> None:
    """Merge the rows [keys | value_grads] into (count, mean, var, std), in place.

    count: (1,) float64. mean, var, std: (D,) fp32 with D = d_in + d_out. Mutated.
    keys: (m, d_in), value_grads: (m, d_out), any float dtype, m >= 1. Read only.
    The reference accumulates in float64 (it is the oracle), then stores fp32.
    """
    x = torch.cat([keys.double(), value_grads.double()], dim=1)  # (m, D)
    m = x.shape[0]
    n_old = count.double().item()
    n_new = n_old + m
    xbar = x.mean(0)
    v_b = ((x - xbar) ** 2).mean(0)
    mu = mean.double()
    d = xbar - mu
    m2 = var.double() * n_old + v_b * m + d * d * (n_old * m / n_new)
    mean.copy_(mu + d * (m / n_new))
    var.copy_(m2 / max(n_new, 1.0))
    std.copy_(torch.sqrt(m2 / (n_new - 1.0 + 1e-8)))
    count.fill_(n_new)


def running_stats_normalize(
    keys: torch.Tensor,
    value_grads: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    eps: float = EPS,
) -> torch.Tensor:
    """Z = ([keys | value_grads] - mean) / (std + eps), elementwise.

    keys: (m, d_in), value_grads: (m, d_out), any float dtype. mean, std: (D,) fp32.
    Returns Z: (m, D) fp32, a new tensor.
    """
    x = torch.cat([keys.float(), value_grads.float()], dim=1)  # (m, D)
    return (x - mean) / (std + eps)
