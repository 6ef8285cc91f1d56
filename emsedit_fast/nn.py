"""Hypernetwork parameters and state. All compute goes through emsedit_fast.ops (backend chosen per call).

One `HyperNet` serves one shape group (all edited layers with the same (d_in, d_out, layout)) at one MSBP step
(sequential mode) or at every step (batch mode). It owns a running normaliser over D = d_in + d_out, n_blocks
residual low-rank blocks, and per-layer rows: s_b, t_b (scale/shift per block), eta (step size) and log_ridge.
See docs/method.md, "Running normaliser" and "Hypernetwork".
"""

from __future__ import annotations

import math

import torch
from torch import nn

from emsedit_fast import ops


class RunningStats(nn.Module):
    """Buffers of the running normaliser: count (1,) float64, mean, var, std (D,) fp32. No gradients."""

    def __init__(self, dim: int, std_floor: float = 0.0):
        super().__init__()
        self.std_floor = std_floor
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def update_(self, keys: torch.Tensor, value_grads: torch.Tensor, backend: str | None = None) -> None:
        ops.running_stats_update_(self.count, self.mean, self.var, self.std, keys, value_grads, backend=backend)

    def scale(self) -> torch.Tensor:
        """The std used to normalise: std, clamped from below by std_floor when set (docs/method.md, Running
        normaliser)."""
        return self.std.clamp_min(self.std_floor) if self.std_floor > 0 else self.std


# Merging normaliser states that diverged from a common base (data-parallel training: every rank updates its own copy
# with its own rows, then the copies are merged as if one normaliser had seen every row). The same algebra as the
# batch merge of ops.running_stats_update_, written in moments about the base mean so the per-rank terms can be summed
# by one all-reduce.
STATS_FIELDS = ("count", "mean", "var", "std")


def new_rows_moments(base: dict, cur: dict) -> torch.Tensor:
    """[m, P (D), Q (D)] fp64: rows added since `base`, as moments about base's mean.

    P = sum over new rows of (x - mu0) = N1 (mu1 - mu0);  Q = sum (x - mu0)^2 = N1 (v1 + (mu1 - mu0)^2) - N0 v0."""
    n0, n1 = base["count"].double(), cur["count"].double()
    mu0, v0 = base["mean"].double(), base["var"].double()
    d = cur["mean"].double() - mu0
    p = n1 * d
    q = n1 * (cur["var"].double() + d * d) - n0 * v0
    return torch.cat([n1 - n0, p, q])


def finish_merge(base: dict, moments: torch.Tensor) -> dict[str, torch.Tensor]:
    """Statistics of base's rows plus rows with summed moments [m, P, Q] (see `new_rows_moments`)."""
    dim = base["mean"].shape[0]
    m, p, q = moments[0], moments[1:1 + dim], moments[1 + dim:]
    n0 = base["count"].double()[0]
    n = n0 + m
    mu0, v0 = base["mean"].double(), base["var"].double()
    shift = p / n
    m2 = (n0 * v0 + q - n * shift * shift).clamp_min(0)
    return {"count": n.reshape(1).to(base["count"].dtype), "mean": (mu0 + shift).float(),
            "var": (m2 / max(float(n), 1.0)).float(), "std": torch.sqrt(m2 / (n - 1.0 + 1e-8)).float()}


def merge_running_stats(base: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]]
                        ) -> dict[str, torch.Tensor]:
    """One normaliser's statistics after every state in `states` (each = `base` updated with its own rows) is merged:
    count, mean, population var and sample std of base's rows plus all new rows. fp64 inside; count fp64, rest fp32.
    If no state added rows, `base` is returned unchanged."""
    total = sum(new_rows_moments(base, s) for s in states)
    if float(total[0]) == 0:
        return {f: base[f].clone() for f in STATS_FIELDS}
    return finish_merge(base, total)



class HyperNet(nn.Module):
    """g_phi for one shape group: z0 = (x - mu) / (sigma + eps); z_b = z_{b-1} + h_b(z_{b-1}); output z_B.

    Initialisation: A ~ N(0, 1) (a_init "normal", as published) or N(0, 1 / D) ("fan_in"), B = 0, c = 0, s = 1,
    t = 0, eta = eta_init, log_ridge = lambda_init, so the untrained network is exactly the identity on normalised rows
    (docs/method.md, "Hypernetwork"). A's scale sets how far one Adam step on B moves the output: each entry of B
    moves by about the learning rate, the output by about that times r |z0 A|, and |z0 A| ~ sqrt(D) |A_ij| for
    unit-scale rows.

    eta_param "linear" learns eta itself (it may change sign, as published); "log" learns log eta (eta = e^{log eta}
    stays positive), so that Adam, which moves every parameter by about its learning rate per step whatever its scale,
    changes eta by a relative amount: eta ~ 1e-3 and log-ridge then train at a rate that fits their scale.
    """

    def __init__(self, d_in: int, d_out: int, n_layers: int, rank: int, n_blocks: int = 4,
                 relu_first: bool = True, eta_init: float = 1e-6, lambda_init: float = 0.0, std_floor: float = 0.0,
                 eta_param: str = "linear", generator: torch.Generator | None = None, a_init: str = "normal"):
        super().__init__()
        d = d_in + d_out
        if a_init not in ("normal", "fan_in"):
            raise ValueError(f"a_init must be 'normal' or 'fan_in', got {a_init!r}")
        a_std = 1.0 if a_init == "normal" else d ** -0.5
        self.d_in, self.d_out, self.n_layers, self.rank, self.relu_first = d_in, d_out, n_layers, rank, relu_first
        self.stats = RunningStats(d, std_floor)
        self.a = nn.ParameterList([nn.Parameter(torch.randn(d, rank, generator=generator) * a_std)
                                   for _ in range(n_blocks)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(rank, d)) for _ in range(n_blocks)])
        self.c = nn.ParameterList([nn.Parameter(torch.zeros(d)) for _ in range(n_blocks)])
        self.s = nn.ParameterList([nn.Parameter(torch.ones(n_layers, d)) for _ in range(n_blocks)])
        self.t = nn.ParameterList([nn.Parameter(torch.zeros(n_layers, d)) for _ in range(n_blocks)])
        if eta_param == "log":
            if eta_init <= 0:
                raise ValueError(f"eta_param 'log' needs eta_init > 0, got {eta_init}")
            self.log_eta = nn.Parameter(torch.full((n_layers,), math.log(eta_init)))
        elif eta_param == "linear":
            self.eta = nn.Parameter(torch.full((n_layers,), float(eta_init)))
        else:
            raise ValueError(f"eta_param must be 'linear' or 'log', got {eta_param!r}")
        self.eta_param = eta_param
        self.log_ridge = nn.Parameter(torch.full((n_layers,), float(lambda_init)))

    def step_size(self) -> torch.Tensor:
        """eta (n_layers,): the per-layer step sizes, differentiable in the learned parameter (eta or log eta)."""
        return self.log_eta.exp() if self.eta_param == "log" else self.eta

    def scalar_parameters(self) -> list[nn.Parameter]:
        """The learned step size (eta or log eta) and log_ridge: per-layer scalars whose learning rate may differ."""
        return [self.log_eta if self.eta_param == "log" else self.eta, self.log_ridge]

    def forward(self, keys: torch.Tensor, value_grads: torch.Tensor, idx: torch.Tensor, *,
                mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                backend: str | None = None) -> torch.Tensor:
        """Pseudo pairs z = [u~ | delta~] (N, D) fp32 for rows (keys (N, d_in), value_grads (N, d_out)).

        mean/std default to the current statistics; the meta-gradient passes the ones the edit used.
        """
        mean = self.stats.mean if mean is None else mean
        std = self.stats.scale() if std is None else std
        if not self.a:  # the identity network (UltraEdit): z = z0
            return ops.running_stats_normalize(keys, value_grads, mean, std, ops.NORM_EPS, backend=backend)
        # the normaliser is folded into the first block: z0 = (x - mean) / (std + eps) is never materialised
        z = torch.cat([keys, value_grads], dim=1)
        for b, (a, bb, c, s, t) in enumerate(zip(self.a, self.b, self.c, self.s, self.t)):
            fold = {"mean": mean, "std": std} if b == 0 else {}
            z = ops.hypernet_block(z, a, bb, c, s, t, idx, relu_first=self.relu_first, backend=backend, **fold)
        return z
