"""PrefixReuse: the K caching passes of one edit batch run the decoder layers below the lowest edited module once.

Every later pass must give the same keys and value-gradients, bit for bit, as a pass over the whole model; the
layers below must really be skipped; and anything that could make the recorded hidden states stale (other tokens, a
written parameter below the edited layers) must make the pass run whole again.
"""

import dataclasses
from unittest import mock

import pytest
import torch

from emsedit_fast.config import load
from emsedit_fast.data.edit_batch import tokenize_batch
from emsedit_fast.data.facts import bundled_facts
from emsedit_fast.editors import build_editor
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.hooks import PrefixReuse
from emsedit_fast.models.hooks import capture
from emsedit_fast.models.tiny import TINY_CONFIGS
from emsedit_fast.models.tiny import tiny_causal_lm
from emsedit_fast.models.tiny import tiny_llama
from emsedit_fast.models.tiny import tiny_tokenizer
from emsedit_fast.trainer import MetaTrainer

# The upper two of four layers: layers 0 and 1 are the prefix a later pass skips.
UPPER_MLP = {
    "gpt2": r"transformer\.h\.[23]\.mlp\.c_fc", "gptj": r"transformer\.h\.[23]\.mlp\.fc_in",
    "gpt_neox": r"gpt_neox\.layers\.[23]\.mlp\.dense_h_to_4h", "phi3": r"model\.layers\.[23]\.mlp\.down_proj",
}
LLAMA_UPPER = r"model\.layers\.[23]\.mlp\.(gate|up)_proj"


def _edit_tokens(start: int = 0):
    """The edit tokens (TokenBatch) of four consecutive bundled facts from `start`."""
    return tokenize_batch(tiny_tokenizer(), bundled_facts("train")[start:start + 4], 2).edit


def _model(model_type: str):
    try:
        return tiny_causal_lm(model_type, layers=4)
    except Exception as err:  # a family this transformers cannot build offline
        pytest.skip(f"{model_type}: {type(err).__name__}: {err}")


def _passes(model, modules, batch, prefix, n=3):
    """n captures; between them every edited weight moves (as an MSBP step does). The weights come back after."""
    saved = [m.weight.detach().clone() for m in modules]
    gen = torch.Generator().manual_seed(1)
    out = []
    try:
        for _ in range(n):
            out.append(capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels,
                               batch.micro_batch, prefix=prefix))
            with torch.no_grad():
                for m in modules:
                    m.weight.add_(0.05 * torch.randn(m.weight.shape, generator=gen))
    finally:
        with torch.no_grad():
            for m, w in zip(modules, saved):
                m.weight.copy_(w)
    return out


def _same(a, b) -> bool:
    return a.keys.keys() == b.keys.keys() and all(
        torch.equal(a.keys[n], b.keys[n]) and torch.equal(a.value_grads[n], b.value_grads[n]) and a.loss == b.loss
        for n in a.keys)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_later_passes_skip_the_prefix_and_equal_whole_passes(model_type):
    model = _model(model_type)
    modules = resolve_modules(model, [UPPER_MLP.get(model_type, LLAMA_UPPER)])
    batch = _edit_tokens()
    prefix = PrefixReuse(model, modules)
    assert prefix.first == 2 and prefix.layers is not None
    whole = _passes(model, modules, batch, None)
    reused = _passes(model, modules, batch, prefix)
    assert prefix.replays == 2  # passes 2 and 3
    assert all(_same(a, b) for a, b in zip(whole, reused))
    # the edited weights changed between passes, so the captures differ from one another: the comparison has teeth
    assert not _same(whole[0], whole[1])


def test_the_prefix_layers_do_not_run_in_a_replayed_pass():
    model = tiny_llama(layers=4)
    modules = resolve_modules(model, [LLAMA_UPPER])
    batch = _edit_tokens()
    prefix = PrefixReuse(model, modules)
    layer_class = type(model.model.layers[0])
    original = layer_class.forward
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(next(i for i, layer in enumerate(model.model.layers) if layer is self))
        return original(self, *args, **kwargs)

    with mock.patch.object(layer_class, "forward", counted):
        _passes(model, modules, batch, prefix, n=2)
    assert calls == [0, 1, 2, 3, 2, 3]
    assert all("forward" not in layer.__dict__ for layer in model.model.layers)  # nothing left shadowed


def test_stale_prefix_runs_whole_again():
    model = tiny_llama(layers=4)
    modules = resolve_modules(model, [LLAMA_UPPER])
    batch, other = _edit_tokens(), _edit_tokens(4)
    prefix = PrefixReuse(model, modules)

    def cap(b, reuse):
        return capture(model, modules, b.input_ids, b.attention_mask, b.labels, b.micro_batch, prefix=reuse)

    cap(batch, prefix)
    assert _same(cap(other, prefix), cap(other, None)) and prefix.replays == 0  # other tokens: recorded again
    assert _same(cap(other, prefix), cap(other, None)) and prefix.replays == 1
    mask = other.attention_mask.clone()
    mask[0, 0] = 0  # same tokens, another mask
    changed = dataclasses.replace(other, attention_mask=mask)
    assert _same(cap(changed, prefix), cap(changed, None)) and prefix.replays == 1
    with torch.no_grad():  # a weight below the edited layers is written: the recorded hidden states are stale
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    assert _same(cap(changed, prefix), cap(changed, None)) and prefix.replays == 1
    assert _same(cap(changed, prefix), cap(changed, None)) and prefix.replays == 2
    with torch.no_grad():  # so are they when the embeddings, below every layer, are written
        model.model.embed_tokens.weight[:5].mul_(2.0)
    assert _same(cap(changed, prefix), cap(changed, None)) and prefix.replays == 2
    assert _same(cap(changed, prefix), cap(changed, None)) and prefix.replays == 3
    with torch.no_grad():  # an edited layer's weight moves between passes, as MSBP's steps do: still replayed
        modules[0].weight.add_(0.01)
    assert _same(cap(changed, prefix), cap(changed, None)) and prefix.replays == 4


def test_no_prefix_when_the_lowest_layer_is_edited_or_no_layer_list_holds_the_modules():
    model = tiny_llama(layers=4)
    low = PrefixReuse(model, resolve_modules(model, [r"model\.layers\.[03]\.mlp\.gate_proj"]))
    assert low.first == 0
    head = PrefixReuse(model, resolve_modules(model, [r"model\.layers\.3\.mlp\.gate_proj", r"lm_head"]))
    assert head.layers is None
    batch = _edit_tokens()
    for prefix in (low, head):
        mods = resolve_modules(model, [r"model\.layers\.[03]\.mlp\.gate_proj"])
        assert all(_same(a, b) for a, b in zip(_passes(model, mods, batch, None), _passes(model, mods, batch, prefix)))
        assert prefix.replays == 0


def _editor(reuse: bool, mode: str = "sequential"):
    torch.manual_seed(0)
    model = tiny_llama(layers=4)
    cfg = load("emsedit", mode=mode, overrides=["editor.rank=8", "editor.backend=reference", "editor.n_steps=3",
                                                f"editor.reuse_prefix={reuse}"])
    return build_editor(model, resolve_modules(model, [LLAMA_UPPER]), cfg.editor, mode, seed=0), cfg


def test_edit_with_and_without_reuse_is_bit_identical(tiny_batches):
    batch = tiny_batches(1)[0]
    weights = []
    for reuse in (True, False):
        editor, _ = _editor(reuse)
        editor.edit(batch.edit)
        weights.append([w.clone() for w in editor.weights()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
    assert not all(torch.equal(a, b) for a, b in zip(weights[0], editor.base))  # the edit moved the weights


@pytest.mark.parametrize("mode", ["sequential", "batch"])
def test_meta_training_with_and_without_reuse_is_bit_identical(tiny_batches, mode):
    batches = tiny_batches(2)
    params, losses = [], []
    for reuse in (True, False):
        editor, cfg = _editor(reuse, mode)
        report = MetaTrainer(editor, cfg.train).train(batches, progress=False)
        params.append([p.detach().clone() for p in editor.parameters()])
        losses.append(report.losses)
    assert losses[0] == losses[1]
    assert all(torch.equal(a, b) for a, b in zip(*params))
