"""Caching pass: keys u and value-gradients δ of the edited modules (docs/method.md, Capture and Meta-gradient).

For a module ℓ with input u_t and output v_t = W_ℓ u_t at position t, and any loss L,

    ∂L/∂W_ℓ = Σ_t δ_t u_tᵀ   (d_out × d_in, linear orientation),   δ_t = ∂L/∂v_t.

`capture` runs ONE forward and ONE backward over the whole execution batch with the caching loss
L_cache = Σ_b mean_{t∈𝒫_b} −log p(label_t) (or the `mean` reduction) and returns, per module, the rows u_t and δ_t at
the selected positions, as fp32 (or `dtype`) buffers preallocated from the label mask (F6). Because sequences never
interact, the per-position δ of one pass equal those of separate micro-batch passes (F8).

No dense weight gradient is formed (F7): every model parameter has requires_grad = False during the pass (restored
afterwards, also on errors), and a forward hook turns each edited module's output into a grad-requiring leaf when it
does not already require grad, so autograd's graph starts at the lowest edited module and backward stops there. δ is
obtained with `torch.autograd.grad(L, [edited module outputs])`; nothing is written to any `.grad`.

`factored_weight_grads` is the meta-training variant: for an arbitrary loss of the logits it returns the
inputs X' and output-gradients Δ' at every selected (default: non-pad) position, so that G_ℓ = Δ'ᵀ X' (d_out × d_in)
without ever forming it. It returns FACTORS; `FactoredGrads.dense` builds the dense G when a caller really needs it.

Row order everywhere: (batch row, position), row-major over the (B, T) selection mask, identical for every module,
so row j of U_ℓ and Δ_ℓ refers to the same token for all ℓ. Batches are laid out micro-batch after micro-batch, so this
is also (micro-batch, sequence, position) order. Neither function calls `model.train()` or `model.eval()`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from emsedit_fast.losses import IGNORE_INDEX
from emsedit_fast.losses import Reduction
from emsedit_fast.losses import answer_ce
from emsedit_fast.models.adapter import EditedModule
from emsedit_fast.models.adapter import ShapeGroup

logger = logging.getLogger(__name__)

TokenMode = Literal["answer", "all"]


@dataclass
class Capture:
    """Result of one caching pass.

    keys: name -> U_ℓ (n, d_in). value_grads: name -> Δ_ℓ (n, d_out). Both in `dtype` (fp32 by default) on the
    cache device, one row per selected position in (batch row, position) order, identical for every module.
    rows, positions: (n,) int64, the batch row and position of each cached row. row_micro_batch: (n,) int64 micro-batch
    id of each cached row (None when no micro_batch was given). loss: the caching loss (float). n_rows: n.
    """

    keys: dict[str, torch.Tensor]
    value_grads: dict[str, torch.Tensor]
    loss: float
    n_rows: int
    rows: torch.Tensor
    positions: torch.Tensor
    row_micro_batch: torch.Tensor | None
    token_mode: str

    def stack(self, group: ShapeGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of every module of a shape group, module after module.

        Returns U (m·n, d_in), Δ (m·n, d_out) in the cache dtype, and idx (m·n,) int64 with idx = i_ℓ (the module's
        index within the group) for each row. Copies once (torch.cat).
        """
        u = torch.cat([self.keys[m.name] for m in group.modules])
        d = torch.cat([self.value_grads[m.name] for m in group.modules])
        idx = torch.arange(len(group.modules), device=u.device).repeat_interleave(self.n_rows)
        return u, d, idx


@dataclass
class FactoredGrads:
    """Weight gradients of the edited modules in factored form: G_ℓ = Δ'_ℓᵀ X'_ℓ (d_out × d_in, linear orientation).

    inputs: name -> X'_ℓ (T', d_in). output_grads: name -> Δ'_ℓ (T', d_out). Rows as in `Capture` (batch row,
    position) over the selected positions. loss: float value of the loss. n_rows: T'.
    For a GPT-2 Conv1D (transposed) module the gradient of the stored weight is Gᵀ = X'ᵀ Δ'.
    """

    inputs: dict[str, torch.Tensor]
    output_grads: dict[str, torch.Tensor]
    loss: float
    n_rows: int

    def dense(self, name: str) -> torch.Tensor:
        """G_ℓ = Δ'ᵀ X' (d_out, d_in) fp32, linear orientation. Materialises the dense gradient: tests and debugging."""
        return self.output_grads[name].float().t() @ self.inputs[name].float()

    @staticmethod
    def merge(parts: Sequence[FactoredGrads]) -> FactoredGrads:
        """Rows of several passes concatenated (gradients add: G = Σ_p Δ'_pᵀ X'_p); losses add."""
        if not parts:
            raise ValueError("nothing to merge")
        names = list(parts[0].inputs)
        for p in parts[1:]:
            if list(p.inputs) != names:
                raise ValueError(f"cannot merge factored grads of different modules: {names} vs {list(p.inputs)}")
        return FactoredGrads(
            inputs={n: torch.cat([p.inputs[n] for p in parts]) for n in names},
            output_grads={n: torch.cat([p.output_grads[n] for p in parts]) for n in names},
            loss=sum(p.loss for p in parts),
            n_rows=sum(p.n_rows for p in parts),
        )


class _Tap:
    """Forward hooks on the edited modules: gather inputs at the selected rows, make outputs autograd roots.

    flat_index: (n,) int64 indices into the flattened (B·T) token axis. Each hook asserts one call per forward.
    """

    def __init__(self, modules: Sequence[EditedModule], flat_index: torch.Tensor, n_tokens: int,
                 dtype: torch.dtype, device: torch.device | None, pin_memory: bool):
        self.modules = list(modules)
        self.flat_index = flat_index
        self.n_tokens = n_tokens
        self.dtype = dtype
        self.device = device
        self.pin_memory = pin_memory
        self.calls = {m.name: 0 for m in self.modules}
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._index_on: dict[torch.device, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def index_on(self, device: torch.device) -> torch.Tensor:
        # One copy of the flat index per device the edited modules live on (models may be split across devices).
        if device not in self._index_on:
            self._index_on[device] = self.flat_index.to(device)
        return self._index_on[device]

    def buffer(self, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        device = self.device if self.device is not None else like.device
        pin = self.pin_memory and torch.device(device).type == "cpu" and like.device.type != "cpu"
        return torch.empty(rows, cols, dtype=self.dtype, device=device, pin_memory=pin)

    def gather(self, t: torch.Tensor, cols: int, what: str, name: str) -> torch.Tensor:
        if t.shape[-1] != cols or t.numel() != self.n_tokens * cols:
            raise RuntimeError(f"{what} of edited module {name!r} has shape {tuple(t.shape)}; expected "
                               f"{self.n_tokens} tokens x {cols} (the module must see the whole (B, T) batch)")
        rows = t.reshape(-1, cols).index_select(0, self.index_on(t.device))  # (n, cols), model dtype
        out = self.buffer(rows.shape[0], cols, t)
        out.copy_(rows.detach(), non_blocking=out.is_pinned())  # casts to the cache dtype
        return out

    def _hook(self, em: EditedModule) -> Callable:
        def hook(module, args, kwargs, output):
            self.calls[em.name] += 1
            if self.calls[em.name] > 1:
                raise RuntimeError(f"edited module {em.name!r} was called {self.calls[em.name]} times in one forward; "
                                   f"capture needs exactly one call per module per forward")
            x = args[0] if args else next(iter(kwargs.values()))
            self.inputs[em.name] = self.gather(x, em.d_in, "input", em.name)
            if not output.requires_grad:
                # Lowest edited module(s): the output becomes the autograd root, so backward stops here and no
                # gradient flows into anything below (parameters do not require grad either).
                output = output.detach().requires_grad_(True)
            self.outputs[em.name] = output
            return output

        return hook

    def __enter__(self) -> _Tap:
        try:
            for em in self.modules:
                self._handles.append(em.module.register_forward_hook(self._hook(em), with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def check_calls(self) -> None:
        missing = [name for name, c in self.calls.items() if c != 1]
        if missing:
            detail = ", ".join(f"{n!r}: {self.calls[n]}" for n in missing)
            raise RuntimeError(f"every edited module must be called exactly once per forward; calls: {detail}")


class _FrozenParameters:
    """Context: requires_grad = False on every parameter of the model; the previous flags come back on exit."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> _FrozenParameters:
        self.saved = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self.saved:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)


def _check_modules(model: nn.Module, modules: Sequence[EditedModule]) -> None:
    if not modules:
        raise ValueError("no edited modules given")
    names = [m.name for m in modules]
    if len(set(names)) != len(names):
        raise ValueError(f"edited module names must be unique, got {names}")
    owned = {id(m) for m in model.modules()}
    foreign = [m.name for m in modules if id(m.module) not in owned]
    if foreign:
        raise ValueError(f"edited modules {foreign} are not submodules of this {type(model).__name__} (resolved on "
                         f"another model instance?)")


@contextlib.contextmanager
def logits_at(model: nn.Module, keep: torch.Tensor | None):
    """Within the block, the model's language-model head runs only at sequence positions `keep` (T',) int64: its
    input hidden states (B, T, H) are cut to (B, T', H) by a forward pre-hook, so the model returns logits (B, T', V)
    for those positions, the same values full logits hold there. Losses and metrics read only answer positions, and
    the head (V x H per token, plus the softmax over V) is a large share of a small model's pass.

    Yields `cut(logits)`, which returns the logits at `keep` whether or not the head was cut (a model without an
    output-embedding module computes full logits; they are selected afterwards). keep None: full logits."""
    head = model.get_output_embeddings() if keep is not None and hasattr(model, "get_output_embeddings") else None
    fired = []

    def cut(logits: torch.Tensor) -> torch.Tensor:
        if keep is None or fired:
            return logits
        return logits.index_select(1, keep.to(logits.device))

    if head is None:
        yield cut
        return

    def pre_hook(module, args):
        hidden = args[0]
        if hidden.dim() != 3:
            return None
        fired.append(True)
        return (hidden.index_select(1, keep.to(hidden.device)),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield cut
    finally:
        handle.remove()


def answer_positions(*labels: torch.Tensor | None) -> torch.Tensor:
    """The sequence positions (T',) int64 where any row of any of `labels` (B, T) holds a label: what `logits_at`
    keeps for a loss or metric that reads answer positions only."""
    present = [lab != IGNORE_INDEX for lab in labels if lab is not None]
    return torch.stack(present).any(0).any(0).nonzero().squeeze(1)


def _logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out[0]


def _layer_stack(model: nn.Module, modules: Sequence[EditedModule]) -> tuple[nn.ModuleList | None, int]:
    """(layers, f): the outermost ModuleList that holds every edited module (the decoder stack, e.g. `model.layers`
    or `transformer.h`) and the index f of its lowest layer with an edited module; (None, 0) if there is none."""
    names = [m.name for m in modules]
    for prefix, child in model.named_modules():  # pre-order: outer lists come first
        if not isinstance(child, nn.ModuleList) or not prefix:
            continue
        index = []
        for name in names:
            head, _, rest = name[len(prefix) + 1:].partition(".") if name.startswith(prefix + ".") else ("", "", "")
            if not head.isdigit() or not rest:
                break
            index.append(int(head))
        else:
            return child, min(index)
    return None, 0


_NOTHING = object()


def _hidden_of(output):
    return output[0] if isinstance(output, (tuple, list)) and output else output


class PrefixReuse:
    """The decoder layers below the lowest edited module, run once per batch of tokens rather than once per pass.

    MSBP makes K caching passes over the same edit tokens, and between them only the edited modules change, so the
    decoder layers 0..f-1 below the lowest edited one (layer f) compute the same output h (B, T, H) every time. The
    first pass records it. In a later pass over the same input_ids and attention_mask those layers' forward returns
    h without computing (an instance attribute shadows the class's forward, so the layer objects, their attributes
    and their hooks stay in place), and the pass in effect starts at layer f. The backward already stops at the
    lowest edited module's output, so a later pass runs L - f layers forward instead of L: for SmolLM2-135M (L = 30)
    with the first edited module on layer 10 (15), a third (a half) of each later forward is skipped.

    Exact by construction: a later pass receives the very tensors the layers produced. It is used only where that
    holds. The first pass checks that layers 0..f-1 each ran once, that layer f's input is layer f-1's output (a
    sequential stack) and that it does not require grad. A later pass replays only if its input_ids and
    attention_mask equal the recorded ones and no parameter or buffer outside layers f.. (layers 0..f-1, the
    embeddings) has been written since (their version counters). Otherwise it runs the whole model and records
    again. Models whose edited modules do not all sit in one ModuleList of layers always run whole.
    """

    def __init__(self, model: nn.Module, modules: Sequence[EditedModule]):
        self.layers, self.first = _layer_stack(model, modules)
        self._output = None
        self._key = None
        self.replays = 0  # passes that skipped the prefix (tests and benchmarks read it)
        self._below: list[torch.Tensor] = []  # every parameter and buffer outside layers f.. (embeddings included)
        if self.layers is not None and self.first > 0:
            above = {id(t) for layer in self.layers[self.first:] for t in (*layer.parameters(), *layer.buffers())}
            self._below = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in above]

    def _versions(self) -> tuple[int, ...]:
        return tuple(t._version for t in self._below)

    def _matches(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
        if self._output is None:
            return False
        ids, mask, versions = self._key
        same_mask = (mask is None and attention_mask is None) or (
            mask is not None and attention_mask is not None and mask.shape == attention_mask.shape
            and torch.equal(mask, attention_mask))
        return (ids.shape == input_ids.shape and torch.equal(ids, input_ids) and same_mask
                and versions == self._versions())

    @contextlib.contextmanager
    def around(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """Context for one model call over (input_ids, attention_mask): replays the prefix if it can, records it
        otherwise."""
        if self.layers is None or self.first == 0:
            yield
            return
        if self._matches(input_ids, attention_mask):
            output = self._output
            prefix = [self.layers[i] for i in range(self.first)]
            shadowed = [layer.__dict__.get("forward", _NOTHING) for layer in prefix]  # e.g. accelerate's wrapper
            for layer in prefix:
                layer.forward = lambda *args, **kwargs: output
            try:
                yield
            finally:
                for layer, forward in zip(prefix, shadowed):
                    del layer.forward
                    if forward is not _NOTHING:
                        layer.forward = forward
            self.replays += 1
            return
        calls = [0] * self.first
        seen = {}

        def count(i):
            def hook(module, args, output):
                calls[i] += 1
                if i == self.first - 1:
                    seen["output"] = output
            return hook

        def entry(module, args, kwargs):
            seen["input"] = args[0] if args else kwargs.get("hidden_states")

        handles = [self.layers[i].register_forward_hook(count(i)) for i in range(self.first)]
        handles.append(self.layers[self.first].register_forward_pre_hook(entry, with_kwargs=True))
        self._output = self._key = None
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        output = seen.get("output")
        hidden = _hidden_of(output)
        sequential = (calls == [1] * self.first and isinstance(hidden, torch.Tensor)
                      and seen.get("input") is hidden and not hidden.requires_grad)
        if sequential:
            self._output = output
            mask = attention_mask.clone() if attention_mask is not None else None
            self._key = (input_ids.clone(), mask, self._versions())


def _tapped_backward(model: nn.Module, modules: Sequence[EditedModule], input_ids: torch.Tensor,
                     attention_mask: torch.Tensor | None, select: torch.Tensor,
                     loss_fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype,
                     device: torch.device | str | None, pin_memory: bool, keep: torch.Tensor | None = None,
                     prefix: PrefixReuse | None = None):
    """One forward + autograd.grad w.r.t. the edited outputs; rows gathered at `select` (B, T) bool. keep: the
    logits' positions (see `logits_at`; loss_fn then receives logits (B, T', V)). prefix: reuse of the layers
    below the lowest edited module across passes over the same tokens (`PrefixReuse`)."""
    _check_modules(model, modules)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, seq):
        raise ValueError(f"attention_mask must be {(batch, seq)}, got {tuple(attention_mask.shape)}")
    if tuple(select.shape) != (batch, seq):
        raise ValueError(f"position mask must be {(batch, seq)}, got {tuple(select.shape)}")
    flat_index = select.reshape(-1).nonzero().squeeze(1)  # (n,) row-major: (batch row, position) order
    n = flat_index.numel()
    if n == 0:
        raise ValueError("no positions selected: nothing to capture")
    device = torch.device(device) if device is not None else None

    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False  # a KV cache is useless here and costs memory
    tap = _Tap(modules, flat_index, batch * seq, dtype, device, pin_memory)
    reuse = prefix.around(input_ids, attention_mask) if prefix is not None else contextlib.nullcontext()
    with _FrozenParameters(model), tap, torch.enable_grad(), logits_at(model, keep) as cut:
        with reuse:
            logits = cut(_logits_of(model(**kwargs)))
        tap.check_calls()
        loss = loss_fn(logits)
        del logits
        if not loss.requires_grad:
            raise RuntimeError("the loss does not depend on any edited module output")
        outs = [tap.outputs[m.name] for m in modules]
        grads = torch.autograd.grad(loss, outs, allow_unused=True)
        value_grads = {}
        for m, out, g in zip(modules, outs, grads):
            if g is None:  # output does not reach the loss: its gradient is exactly zero
                logger.warning("edited module %r does not influence the loss; its value-gradients are zero", m.name)
                g = torch.zeros_like(out)
            value_grads[m.name] = tap.gather(g, m.d_out, "output gradient", m.name)
    inputs = {m.name: tap.inputs[m.name] for m in modules}
    return inputs, value_grads, float(loss.detach()), flat_index, n


def selection_mask(labels: torch.Tensor | None, attention_mask: torch.Tensor | None, token_mode: TokenMode,
                   shape: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, T) bool mask of the cached positions.

    token_mode "answer": labels ≠ −100. "all": every non-pad position, attention_mask ≠ 0 (every position if no mask).
    """
    if token_mode == "answer":
        if labels is None:
            raise ValueError("token_mode='answer' needs labels")
        return labels != IGNORE_INDEX
    if token_mode == "all":
        if attention_mask is not None:
            return attention_mask != 0
        if labels is not None:
            return torch.ones_like(labels, dtype=torch.bool)
        if shape is None:
            raise ValueError("token_mode='all' without attention_mask needs labels or a shape")
        return torch.ones(shape, dtype=torch.bool)
    raise ValueError(f"token_mode must be 'answer' or 'all', got {token_mode!r}")


def capture(model: nn.Module, modules: Sequence[EditedModule], input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None, labels: torch.Tensor, micro_batch: torch.Tensor | None,
            token_mode: TokenMode = "answer", reduction: Reduction = "sum_of_microbatch_means", *,
            dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
            pin_memory: bool = False, positions: torch.Tensor | None = None,
            prefix: PrefixReuse | None = None) -> Capture:
    """Caching pass: keys U_ℓ and value-gradients Δ_ℓ of every edited module, one forward + backward.

        L_cache = Σ_b (1/|𝒫_b|) Σ_{t∈𝒫_b} −log softmax(logits_t)[labels_t]   (fp32; `reduction="mean"`: 1/|𝒫|)
        U_ℓ[j] = u_{t_j},  Δ_ℓ[j] = ∂L_cache/∂v_{t_j}   for the selected positions t_j in (batch row, position) order

    model: a causal LM called as model(input_ids=, attention_mask=[, use_cache=False]) returning logits (B, T, V).
    modules: from `resolve_modules`; each must be called exactly once per forward (RuntimeError otherwise).
    input_ids: (B, T) int64. attention_mask: (B, T) or None. labels: (B, T) int64, pre-shifted, −100 off the answers.
    micro_batch: (B,) integer micro-batch id per row (None: one micro-batch). token_mode: "answer" caches the answer
    positions (labels ≠ −100), "all" every non-pad position (attention_mask ≠ 0); the loss is L_cache in both modes, so
    with "all" Σ_j δ_j u_jᵀ is the full weight gradient of L_cache. positions: (B, T) bool, the positions to cache in
    place of token_mode's (e.g. `TokenBatch.positions("subject")`); the loss is L_cache all the same.
    prefix: a `PrefixReuse` shared by the passes of one edit batch (MSBP), so passes after the first skip the
    decoder layers below the lowest edited module (None: every pass runs the whole model).
    dtype: cache dtype (fp32 default; the model dtype is allowed). device: cache device (default: where
    each module's activations live); pin_memory: pinned host buffers when caching device activations on the CPU.
    Mutates nothing visible: requires_grad flags are restored, no `.grad` is written, hooks are removed, and the
    model's train/eval mode is left as the caller set it.
    """
    select = selection_mask(labels, attention_mask, token_mode)
    if positions is not None:
        if tuple(positions.shape) != tuple(select.shape):
            raise ValueError(f"positions must be {tuple(select.shape)}, got {tuple(positions.shape)}")
        select = positions.to(select.device).bool()
    if tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} must match")
    if micro_batch is not None and tuple(micro_batch.shape) != (input_ids.shape[0],):
        raise ValueError(f"micro_batch must be ({input_ids.shape[0]},), got {tuple(micro_batch.shape)}")

    keep = answer_positions(labels)  # logits only where the loss reads them
    kept_labels = labels.index_select(1, keep)

    def loss_fn(logits):
        return answer_ce(logits, kept_labels.to(logits.device), micro_batch, reduction)

    keys, grads, loss, flat_index, n = _tapped_backward(model, modules, input_ids, attention_mask, select, loss_fn,
                                                        dtype, device, pin_memory, keep, prefix)
    seq = input_ids.shape[1]
    rows = torch.div(flat_index, seq, rounding_mode="floor")
    row_mb = micro_batch.to(rows.device)[rows].long() if micro_batch is not None else None
    logger.debug("captured %d rows (%s) from %d modules, loss %.4f", n, token_mode, len(modules), loss)
    return Capture(keys=keys, value_grads=grads, loss=loss, n_rows=n, rows=rows, positions=flat_index % seq,
                   row_micro_batch=row_mb, token_mode=token_mode)


def factored_weight_grads(model: nn.Module, modules: Sequence[EditedModule], input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                          positions: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float32,
                          device: torch.device | str | None = None,
                          logit_positions: torch.Tensor | None = None) -> FactoredGrads:
    """Meta-loss pass: inputs X' and output-gradients Δ' of the edited modules, G_ℓ = Δ'ᵀ X' in factored form.

        L = loss_fn(logits),   X'_ℓ[j] = u_{t_j},   Δ'_ℓ[j] = ∂L/∂v_{t_j},   ∂L/∂W_ℓ = Σ_j Δ'_ℓ[j]ᵀ X'_ℓ[j]  (exact)

    loss_fn: logits (B, T, V) -> 0-dim loss tensor (e.g. `answer_ce` on the paraphrase labels, `answer_kl` against
    precomputed reference logits). positions: (B, T) bool rows to keep; default every non-pad position
    (attention_mask ≠ 0, or all). The result is exact whenever positions cover every position whose output can
    influence the loss: with right padding, pad positions only feed later pads, so their δ is exactly 0.
    Gradients w.r.t. the weights are never formed (same no-dense-grad mechanism as `capture`). Returns
    `FactoredGrads` (factors, not dense gradients; `.dense(name)` builds G_ℓ on request).
    logit_positions: (T',) sequence positions the loss reads (`answer_positions`); loss_fn then receives logits
    (B, T', V) computed there only (`logits_at`). None: full logits.
    """
    if positions is None:
        positions = selection_mask(None, attention_mask, "all", shape=tuple(input_ids.shape))
        positions = positions.to(input_ids.device)
    inputs, grads, loss, _, n = _tapped_backward(model, modules, input_ids, attention_mask, positions, loss_fn, dtype,
                                                 device, False, logit_positions)
    return FactoredGrads(inputs=inputs, output_grads=grads, loss=loss, n_rows=n)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once everything it needs has been read."""


@torch.no_grad()
def key_second_moments(model: nn.Module, modules: Sequence[EditedModule], batches, *,
                       max_tokens: int | None = None, positions: str = "all"
                       ) -> tuple[dict[str, torch.Tensor], int]:
    """Sigma_l = (1/N) sum_t x_t x_t^T (d_in, d_in) fp32 over the inputs x_t of every edited module at the N chosen
    positions of `batches` (TokenBatch: input_ids and attention_mask (B, T); `positions(which)` for any choice but
    "all"), accumulated in fp64. positions: "all" non-pad tokens, "answer" the positions that predict an answer
    (labels pre-shifted: where capture reads an edit's keys), or a subject choice (`TokenBatch.positions`).

    These are the statistics of the key prior (docs/method.md, "Ridge least squares"): the directions ordinary
    inputs occupy. max_tokens stops after about that many tokens. Returns ({module name: Sigma_l}, N).
    """
    _check_modules(model, modules)
    sums = {m.name: torch.zeros(m.d_in, m.d_in, dtype=torch.float64, device=m.weight.device) for m in modules}
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(mod, args, out):
            seen[name] = args[0]
            if len(seen) == len(modules):  # every input is in: the layers above and the head are not needed
                raise _StopForward
        return hook

    handles = [m.module.register_forward_hook(record(m.name)) for m in modules]
    tokens = 0
    try:
        for batch in batches:
            kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            if getattr(getattr(model, "config", None), "use_cache", None) is not None:
                kwargs["use_cache"] = False
            seen.clear()
            try:
                model(**kwargs)
            except _StopForward:
                pass
            if len(seen) != len(modules):
                missing = sorted({m.name for m in modules} - set(seen))
                raise RuntimeError(f"key_second_moments: edited modules {missing} were not called by the forward pass")
            mask = batch.attention_mask.bool()
            if positions != "all":
                mask = mask & batch.positions(positions)
            for m in modules:
                x = seen[m.name][mask.to(seen[m.name].device)].double()  # (N_b, d_in)
                sums[m.name] += x.t() @ x
            tokens += int(mask.sum())
            if max_tokens is not None and tokens >= max_tokens:
                break
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise ValueError(f"key_second_moments: the batches hold no tokens at positions {positions!r}")
    return {name: (s / tokens).float() for name, s in sums.items()}, tokens
