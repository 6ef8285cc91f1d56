"""The key prior of the ridge solve: keep an update small where ordinary inputs and earlier edits live.

For one edited layer the solve becomes (docs/method.md, "Ridge least squares")

    min_S  sum_j ||S^T u_j - v_j||^2 + beta ||S||^2
           + beta ( gamma E_x ||S^T x||^2 + gamma_e sum_{e, i} ||S^T u_{e,i}||^2 )

with x the layer's inputs on ordinary prompts (Sigma = E[x x^T], estimated once: `fit`) and u_{e,i} the keys of
the edits applied so far (E = sum u u^T, kept up to date: `set_edit_keys`). With C = I + gamma Sigma + gamma_e E and
its Cholesky factor C = L L^T it is the plain ridge problem on keys U L^-T:

    M = (U C^-1 U^T + beta I)^-1 V,      dW = M^T (U C^-1)

so `transform` returns the Gram keys U L^-T (what the dual solve's Gram is built from) and the factor keys U C^-1
(what the update applies and the journal records). The first term keeps unrelated predictions (locality); the second
keeps earlier edits in place when later ones arrive (less forgetting). Both are statistics, not trained parameters;
they live in the editor's state (checkpoints). The edit term is rebuilt from the edits' recorded keys, so undo and
journal replay keep it consistent.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class KeyPrior(nn.Module):
    """Per shape group g: key_moment_g (m, d_in, d_in) = Sigma of each layer, edit_moment_g (m, d_in, d_in) = E of
    each layer (when gamma_e > 0), and the number of tokens Sigma was estimated from."""

    def __init__(self, groups, gamma: float, gamma_edits: float, device=None):
        super().__init__()
        self.gamma, self.gamma_edits = float(gamma), float(gamma_edits)
        self.names = [list(g.names) for g in groups]
        for g, group in enumerate(groups):
            shape = (len(group), group.d_in, group.d_in)
            self.register_buffer(f"key_moment_{g}", torch.zeros(shape, device=device))
            if self.gamma_edits > 0:
                self.register_buffer(f"edit_moment_{g}", torch.zeros(shape, device=device))
        self.register_buffer("key_tokens", torch.zeros(1, dtype=torch.float64, device=device))
        self._factors: dict[int, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return self.gamma > 0 or self.gamma_edits > 0

    def ready(self) -> bool:
        """False while a key-statistics prior is configured but was never estimated."""
        return self.gamma == 0 or float(self.key_tokens) > 0

    def _changed(self) -> None:
        self._factors.clear()

    def _load_from_state_dict(self, *args, **kwargs):
        self._changed()
        return super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def fit(self, moments: dict[str, torch.Tensor], tokens: int) -> None:
        """Set Sigma of every layer from {layer name: (d_in, d_in)} estimated over `tokens` tokens."""
        for g, names in enumerate(self.names):
            getattr(self, f"key_moment_{g}").copy_(torch.stack([moments[n] for n in names]))
        self.key_tokens.fill_(tokens)
        self._changed()

    @torch.no_grad()
    def take_key_statistics(self, other: "KeyPrior") -> None:
        """Set Sigma of every layer (and its token count) from `other`, an estimated prior over the same layers: an
        editor rebuilt for a model whose statistics another editor already holds needs no capture passes."""
        if other.names != self.names:
            raise ValueError(f"take_key_statistics: the priors cover different layers ({other.names} vs {self.names})")
        for g in range(len(self.names)):
            getattr(self, f"key_moment_{g}").copy_(getattr(other, f"key_moment_{g}"))
        self.key_tokens.copy_(other.key_tokens)
        self._changed()

    @torch.no_grad()
    def set_edit_keys(self, edits: list[dict[str, torch.Tensor]], base: dict[str, torch.Tensor] | None = None) -> None:
        """E <- base + sum over `edits` (each {layer name: keys (n, d_in)}) of U^T U, accumulated in order in fp64
        (the same edits give the same bytes). No-op without an edit term."""
        if self.gamma_edits <= 0:
            return
        for g, names in enumerate(self.names):
            buf = getattr(self, f"edit_moment_{g}")
            total = torch.zeros(buf.shape, dtype=torch.float64, device=buf.device)
            for i, name in enumerate(names):
                if base is not None and name in base:
                    total[i] += base[name].to(total)
                for keys in edits:
                    if name in keys:
                        u = keys[name].to(total)
                        total[i] += u.t() @ u
            buf.copy_(total)
        self._changed()

    @torch.no_grad()
    def add_edit_keys(self, keys: dict[str, torch.Tensor]) -> None:
        """E += U^T U for one edit's keys {layer name: (n, d_in)} (meta-training's running sequence of edits)."""
        if self.gamma_edits <= 0:
            return
        for g, names in enumerate(self.names):
            buf = getattr(self, f"edit_moment_{g}")
            for i, name in enumerate(names):
                if name in keys:
                    u = keys[name].to(buf)
                    buf[i] += u.t() @ u
        self._changed()

    @torch.no_grad()
    def clear_edits(self) -> None:
        if self.gamma_edits > 0:
            for g in range(len(self.names)):
                getattr(self, f"edit_moment_{g}").zero_()
            self._changed()

    def edit_moments(self) -> dict[str, torch.Tensor]:
        """{layer name: E (d_in, d_in)}: what a journal's compacted base keeps for the edits it folds."""
        if self.gamma_edits <= 0:
            return {}
        return {name: getattr(self, f"edit_moment_{g}")[i].detach().clone()
                for g, names in enumerate(self.names) for i, name in enumerate(names)}

    def key_moments(self) -> dict[str, torch.Tensor]:
        """{layer name: Sigma (d_in, d_in)}, views of the fitted statistics (the drift penalty's metric)."""
        return {name: getattr(self, f"key_moment_{g}")[i]
                for g, names in enumerate(self.names) for i, name in enumerate(names)}

    def _cholesky(self, g: int) -> torch.Tensor:
        """L (m, d_in, d_in), C = L L^T = I + gamma Sigma + gamma_e E in fp64 (cached until the statistics change)."""
        if g not in self._factors:
            sigma = getattr(self, f"key_moment_{g}").double()
            c = torch.eye(sigma.shape[-1], dtype=torch.float64, device=sigma.device) + self.gamma * sigma
            if self.gamma_edits > 0:
                c = c + self.gamma_edits * getattr(self, f"edit_moment_{g}").double()
            self._factors[g] = torch.linalg.cholesky(c)
        return self._factors[g]

    def transform(self, g: int, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Gram keys U L^-T, factor keys U C^-1) for keys (m, n, d_in) of group g, fp32."""
        chol = self._cholesky(g)
        gram = torch.linalg.solve_triangular(chol, keys.double().transpose(1, 2), upper=False)  # L^-1 U^T
        factor = torch.linalg.solve_triangular(chol.transpose(1, 2), gram, upper=True)  # L^-T L^-1 U^T = C^-1 U^T
        return gram.transpose(1, 2).float().contiguous(), factor.transpose(1, 2).float().contiguous()
