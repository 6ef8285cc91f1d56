"""Export edits: as a PEFT LoRA adapter (`export_lora`), or the whole edited model (`save_model`).

Load the adapter with `PeftModel.from_pretrained(base_model, dir)` on the UNEDITED model.

A dual/outer step changes layer l by dW_l = M_l^T K_l (d_out, d_in) with M_l (n, d_out) and K_l (n, d_in), so its rank
is at most n. Several steps and edits sum: concatenating their factors gives

    dW_l = B_l A_l,   B_l = [M_1^T | M_2^T | ...]  (d_out, N),   A_l = [K_1; K_2; ...]  (N, d_in),   N = sum of n

which is LoRA's form with lora_B = B_l, lora_A = A_l and scaling lora_alpha / r = 1 (lora_alpha = r per layer, through
peft's rank_pattern / alpha_pattern). That export is exact: the adapter model computes x W0^T + (x A^T) B^T, the
edited model x (W0 + dW)^T rounded to the model dtype, so outputs agree to rounding (fp32: ~1e-6 relative).

`rank=R` below N truncates by SVD: with reduced QR factorisations B = Q_b R_b and A^T = Q_a R_a, the SVD of the small
core R_b R_a^T = U S V^T gives dW = (Q_b U) S (Q_a V)^T, and the adapter keeps B = Q_b U_R S_R^(1/2),
A = S_R^(1/2) V_R^T Q_a^T, the best rank-R approximation (Eckart-Young). The relative Frobenius error
||dW - B A||_F / ||dW||_F = sqrt(sum_{i>R} s_i^2 / sum_i s_i^2) is reported per layer and over all layers.

Primal-form steps store a dense S_l (d_in, d_out), dW_l = S_l^T; any layer with one is exported by SVD of its dense
total, at rank min(R or N, d_out, d_in), where N (the rows behind the edit) bounds its rank. GPT-2 Conv1D layers store
W as (d_in, d_out): the adapter sets fan_in_fan_out=True; lora_A / lora_B keep linear orientation either way.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import asdict
from dataclasses import dataclass

import torch

from emsedit_fast.editfiles import atomic_save_safetensors
from emsedit_fast.updates import AppliedEdit
from emsedit_fast.updates import lowrank_norm
from emsedit_fast.updates import total_deltas

log = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class LoraLayer:
    """One exported layer: its LoRA rank, the rank of the exact factorisation (N), the method, the relative error."""

    name: str
    rank: int
    full_rank: int
    method: str  # "exact" (concatenated factors) or "svd"
    rel_error: float
    delta_norm: float


@dataclass
class LoraExport:
    """What `export_lora` wrote: the folder, per-layer details and the overall relative Frobenius error."""

    path: str
    layers: list[LoraLayer]
    rel_error: float

    def to_dict(self) -> dict:
        return {"path": self.path, "rel_error": self.rel_error, "layers": [asdict(x) for x in self.layers]}


def _truncate(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` factors of B A (fp64) and the singular values of B A."""
    qb, rb = torch.linalg.qr(b)  # (d_out, p), (p, N)
    qa, ra = torch.linalg.qr(a.t())  # (d_in, q), (q, N)
    u, s, vh = torch.linalg.svd(rb @ ra.t(), full_matrices=False)  # core (p, q)
    root = s[:rank].sqrt()
    return (qb @ u[:, :rank]) * root, root[:, None] * (vh[:rank] @ qa.t()), s


def _dense_truncate(d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank], s


def _tail_error(s: torch.Tensor, rank: int) -> tuple[float, float]:
    total = float((s * s).sum())
    tail = float((s[rank:] * s[rank:]).sum())
    return math.sqrt(tail), math.sqrt(total)


def lora_factors(edits: list[AppliedEdit], rank: int | None = None
                 ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[LoraLayer]]:
    """{layer: (lora_B (d_out, r_l), lora_A (r_l, d_in)) fp32} for the sum of `edits`, and per-layer details.

    rank None: exact (r_l = N, the concatenated factors; dense layers by SVD at r_l = min(N, d_out, d_in)).
    rank R: r_l = min(R, N); below N by SVD truncation, with the relative error reported.
    """
    rows: dict[str, int] = {}
    for edit in edits:
        for step in edit.steps:
            for g in step:
                n = g.factor_keys.shape[1] if g.low_rank else (g.n_rows or min(g.solution.shape[1:]))
                for name in g.names:
                    rows[name] = rows.get(name, 0) + n
    out, layers = {}, []
    for name, delta in total_deltas(edits).items():
        if isinstance(delta, tuple):
            b, a = delta
            full = b.shape[1]
            r = full if rank is None else min(rank, full)
            if r == full:
                norm = lowrank_norm(b, a)
                out[name] = (b.float().contiguous(), a.float().contiguous())
                layers.append(LoraLayer(name, r, full, "exact", 0.0, norm))
                continue
            b2, a2, s = _truncate(b, a, r)
        else:
            full = min(rows[name], *delta.shape)
            r = full if rank is None else min(rank, full)
            b2, a2, s = _dense_truncate(delta, r)
        err, norm = _tail_error(s, r)
        out[name] = (b2.float().contiguous(), a2.float().contiguous())
        layers.append(LoraLayer(name, r, full, "svd", err / norm if norm > 0 else 0.0, norm))
    return out, layers


def export_lora(edits: list[AppliedEdit], modules: list[dict], path: str, *, rank: int | None = None,
                base_model: str | None = None) -> LoraExport:
    """Write `edits` (their summed update) as a PEFT LoRA adapter folder: adapter_config.json and
    adapter_model.safetensors (+ emsedit_export.json with the per-layer ranks and errors).

    modules: [{"name", "d_in", "d_out", "transposed"}] of the edited layers (an edit file's or journal's header).
    rank: None = exact; R = truncate to rank R by SVD. base_model: recorded as base_model_name_or_path.
    """
    from peft import LoraConfig

    if not edits:
        raise ValueError("export_lora: no edits to export")
    if rank is not None and rank < 1:
        raise ValueError(f"export_lora: rank must be >= 1, got {rank}")
    layouts = {m["name"]: m for m in modules}
    factors, layers = lora_factors(edits, rank)
    transposed = {bool(layouts[name]["transposed"]) for name in factors}
    if len(transposed) > 1:
        raise ValueError("export_lora: the edited layers mix nn.Linear and Conv1D layouts; peft takes one "
                         "fan_in_fan_out per adapter")
    ranks = {name: b.shape[1] for name, (b, _) in factors.items()}
    for name, (b, a) in factors.items():
        m = layouts[name]
        if b.shape[0] != m["d_out"] or a.shape[1] != m["d_in"]:
            raise ValueError(f"export_lora: {name}: factors {tuple(b.shape)} x {tuple(a.shape)} do not fit "
                             f"(d_out={m['d_out']}, d_in={m['d_in']})")
    top = max(ranks.values())
    # rank_pattern / alpha_pattern keys are regexes matched against the end of module names: escape the dots.
    config = LoraConfig(r=top, lora_alpha=top, target_modules=sorted(factors), lora_dropout=0.0, bias="none",
                        fan_in_fan_out=transposed.pop(), task_type="CAUSAL_LM", init_lora_weights=True,
                        rank_pattern={re.escape(n): r for n, r in ranks.items()},
                        alpha_pattern={re.escape(n): r for n, r in ranks.items()},
                        base_model_name_or_path=base_model)
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    tensors = {}
    for name, (b, a) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a  # (r, d_in)
        tensors[f"base_model.model.{name}.lora_B.weight"] = b  # (d_out, r)
    atomic_save_safetensors(tensors, os.path.join(path, WEIGHTS_NAME), {"format": "pt"})
    num = sum((x.rel_error * x.delta_norm) ** 2 for x in layers)
    den = sum(x.delta_norm ** 2 for x in layers)
    result = LoraExport(os.path.abspath(path), layers, math.sqrt(num / den) if den > 0 else 0.0)
    with open(os.path.join(path, "emsedit_export.json"), "w") as f:
        json.dump({**result.to_dict(), "requested_rank": rank,
                   "edits": [e.info.get("id") for e in edits]}, f, indent=2)
    log.info("exported %d layer(s) as LoRA to %s (ranks %s, relative error %.3g)", len(layers), path,
             sorted(set(ranks.values())), result.rel_error)
    return result


def save_model(model, tokenizer, path: str, extra: dict | None = None) -> str:
    """save_pretrained (safetensors) of the model and its tokenizer into `path`, plus emsedit_edits.json.

    Atomic: everything is written into a temporary sibling folder, fsynced, then renamed into place (a previous save at
    `path` is renamed aside first and deleted last), so a crash leaves `path` as it was or complete, never a new model
    next to an old emsedit_edits.json. An existing `path` must be an earlier save (or empty): it is replaced whole.
    """
    import shutil
    import tempfile

    path = os.path.abspath(path)
    ours = os.path.isdir(path) and (not os.listdir(path) or os.path.exists(os.path.join(path, "emsedit_edits.json")))
    if os.path.exists(path) and not ours:
        raise ValueError(f"--save-model {path}: exists and is not a model saved by this command; choose a new folder")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "emsedit_edits.json"), "w") as f:
            json.dump(extra or {}, f, indent=2)
        for name in os.listdir(tmp):
            file = os.path.join(tmp, name)
            if os.path.isfile(file):
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if os.path.exists(path):
            old = f"{path}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
