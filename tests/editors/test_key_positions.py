"""editor.key_positions: where an edit reads its keys and value-gradients (answer positions, the subject's last
token, both, every token), through capture, the update and meta-training."""

import pytest
import torch

from emsedit_fast.config import ConfigError
from emsedit_fast.config import load
from emsedit_fast.models.hooks import capture


def _rows_at(editor, batch, mask):
    """Keys and value-grads at `mask`, read from an every-token capture (independent of key_positions)."""
    full = capture(editor.model, editor.modules_, batch.input_ids, batch.attention_mask, batch.labels,
                   batch.micro_batch, token_mode="all")
    at = mask[batch.attention_mask.bool()].nonzero().squeeze(1)
    return {n: u[at] for n, u in full.keys.items()}, {n: d[at] for n, d in full.value_grads.items()}


@pytest.mark.parametrize("where", ["subject", "answer_subject", "all"])
def test_capture_reads_the_chosen_positions(tiny_trainer, tiny_batches, where):
    batch = tiny_batches(1, 4)[0].edit
    editor = tiny_trainer(f"editor.key_positions={where}").editor
    cap = editor.capture(batch)
    mask = batch.positions(where)
    if where == "subject":  # every bundled prompt names its subject: one row per request
        assert int(batch.subject_mask.sum()) == len(batch) and cap.n_rows == len(batch)
    assert cap.n_rows == int(mask.sum()) and cap.n_rows != int(batch.answer_mask.sum())
    keys, grads = _rows_at(editor, batch, mask)
    for name in keys:
        torch.testing.assert_close(cap.keys[name], keys[name], rtol=0, atol=0)
        torch.testing.assert_close(cap.value_grads[name], grads[name], rtol=0, atol=0)


def test_subject_edits_move_the_edit_prompt_towards_its_answer_and_training_runs(tiny_trainer, tiny_batches):
    batches = tiny_batches(2, 3)
    trainer = tiny_trainer("editor.key_positions=subject", "editor.eta_init=1e-2", "train.n_batches=2")
    editor = trainer.editor
    before = editor.capture(batches[0].edit).loss
    weights = [w.detach().clone() for w in editor.weights()]
    editor.edit(batches[0].edit)
    assert any(not torch.equal(a, w) for a, w in zip(weights, editor.weights()))
    assert editor.capture(batches[0].edit).loss < before
    editor.reset()
    params = [p.detach().clone() for p in editor.parameters() if p.requires_grad]
    report = trainer.train(batches, progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in report.losses)
    moved = [not torch.equal(a, p) for a, p in zip(params, (p for p in editor.parameters() if p.requires_grad))]
    assert any(moved)


def test_subject_positions_need_batches_with_subjects(tiny_trainer):
    from emsedit_fast.data.collate import collate
    from emsedit_fast.models.tiny import tiny_tokenizer

    editor = tiny_trainer("editor.key_positions=subject").editor
    bare = collate(tiny_tokenizer(), [("The capital of France is", "Paris")])
    with pytest.raises(ValueError, match="tokenised with its subjects"):
        editor.capture(bare)
    with pytest.raises(ConfigError, match="editor.key_positions"):
        load("emsedit", overrides=["editor.key_positions=verb"])
