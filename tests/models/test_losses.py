"""Answer-position CE and KL against hand computations."""

import math

import pytest
import torch

from emsedit_fast.losses import IGNORE_INDEX
from emsedit_fast.losses import answer_ce
from emsedit_fast.losses import answer_kl
from emsedit_fast.losses import position_weights


def _case(seed=0, batch=4, seq=6, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)
    spans = [(2, 4), (1, 6), (5, 6), (0, 3)]  # answer positions [start, stop) per row: unequal lengths
    for i, (a, b) in enumerate(spans[:batch]):
        labels[i, a:b] = torch.randint(0, vocab, (b - a,), generator=g)
    return logits, labels


def _hand_nll(logits, labels):
    """{(row, pos): -log p(label)} by explicit loops in float64."""
    out = {}
    for i in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            y = int(labels[i, t])
            if y == IGNORE_INDEX:
                continue
            z = logits[i, t].tolist()
            m = max(z)
            lse = m + math.log(sum(math.exp(v - m) for v in z))
            out[(i, t)] = lse - z[y]
    return out


def _reduce(per_pos, micro_batch, reduction):
    if reduction == "mean":
        return sum(per_pos.values()) / len(per_pos)
    total = 0.0
    for b in sorted(set(micro_batch.tolist())):
        vals = [v for (i, _), v in per_pos.items() if int(micro_batch[i]) == b]
        total += sum(vals) / len(vals)
    return total


@pytest.mark.parametrize("reduction", ["sum_of_microbatch_means", "mean"])
def test_answer_ce_matches_hand_computation(reduction):
    logits, labels = _case()
    mb = torch.tensor([0, 0, 1, 1])
    expected = _reduce(_hand_nll(logits, labels), mb, reduction)
    got = answer_ce(logits.float(), labels, mb, reduction=reduction)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_answer_ce_microbatch_ids_are_labels_not_indices():
    logits, labels = _case()
    a = answer_ce(logits, labels, torch.tensor([0, 0, 1, 1]))
    b = answer_ce(logits, labels, torch.tensor([7, 7, 3, 3]))
    torch.testing.assert_close(a, b)
    # A single micro-batch, or None, is the plain mean.
    torch.testing.assert_close(answer_ce(logits, labels, None), answer_ce(logits, labels, None, reduction="mean"))
    torch.testing.assert_close(answer_ce(logits, labels, torch.zeros(4, dtype=torch.long)),
                               answer_ce(logits, labels, None))


def test_answer_ce_is_fp32_for_half_logits():
    logits, labels = _case()
    low = logits.to(torch.bfloat16)
    got = answer_ce(low, labels, torch.tensor([0, 0, 1, 1]))
    assert got.dtype == torch.float32
    # log-softmax runs in fp32 on the upcast bf16 values: identical to feeding the fp32 copy
    assert torch.equal(got, answer_ce(low.float(), labels, torch.tensor([0, 0, 1, 1])))


def test_answer_ce_gradients_match_separate_micro_batches():
    # Σ_b mean_b over one call gives the per-position gradients of separate per-micro-batch calls (F8).
    logits, labels = _case()
    mb = torch.tensor([0, 0, 1, 1])
    x = logits.clone().requires_grad_(True)
    answer_ce(x, labels, mb).backward()
    parts = []
    for rows in (slice(0, 2), slice(2, 4)):
        y = logits[rows].clone().requires_grad_(True)
        answer_ce(y, labels[rows], None).backward()
        parts.append(y.grad)
    torch.testing.assert_close(x.grad, torch.cat(parts))


def test_position_weights_sum_to_number_of_micro_batches():
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    w = position_weights(rows, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(w, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1 / 4, 1 / 4, 1 / 4, 1 / 4]))
    assert w.sum().item() == pytest.approx(2.0)
    assert position_weights(rows, None).sum().item() == pytest.approx(1.0)


def _hand_kl(ref, cur, select):
    out = {}
    for i in range(select.shape[0]):
        for t in range(select.shape[1]):
            if not select[i, t]:
                continue
            p = torch.softmax(ref[i, t].double(), -1).tolist()
            q = torch.softmax(cur[i, t].double(), -1).tolist()
            out[(i, t)] = sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q))
    return out


@pytest.mark.parametrize("reduction", ["sum_of_microbatch_means", "mean"])
def test_answer_kl_answer_positions_matches_hand_computation(reduction):
    cur, labels = _case(seed=1)
    ref, _ = _case(seed=2)
    mb = torch.tensor([0, 1, 1, 2])
    expected = _reduce(_hand_kl(ref, cur, labels != IGNORE_INDEX), mb, reduction)
    got = answer_kl(ref.float(), cur.float(), labels, mb, reduction=reduction)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_answer_kl_all_positions_uses_attention_mask():
    cur, labels = _case(seed=1)
    ref, _ = _case(seed=2)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[3, 3:] = 0
    mb = torch.tensor([0, 0, 1, 1])
    expected = _reduce(_hand_kl(ref, cur, mask.bool()), mb, "sum_of_microbatch_means")
    got = answer_kl(ref, cur, None, mb, positions="all", attention_mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Without a mask every position counts.
    everything = _reduce(_hand_kl(ref, cur, torch.ones(4, 6, dtype=torch.bool)), mb, "sum_of_microbatch_means")
    assert answer_kl(ref, cur, None, mb, positions="all").item() == pytest.approx(everything, rel=1e-6)


def test_answer_kl_zero_at_reference_and_reference_is_constant():
    logits, labels = _case()
    ref = logits.clone().requires_grad_(True)
    cur = logits.clone().requires_grad_(True)
    kl = answer_kl(ref, cur, labels, torch.tensor([0, 0, 1, 1]))
    assert abs(kl.item()) < 1e-6
    kl.backward()
    assert ref.grad is None  # p_ref is a constant
    assert cur.grad.abs().max().item() < 1e-6  # KL is stationary at p = p_ref


def test_loss_errors():
    logits, labels = _case()
    with pytest.raises(ValueError, match="no selected positions"):
        answer_ce(logits, torch.full_like(labels, IGNORE_INDEX))
    with pytest.raises(ValueError, match="reduction"):
        answer_ce(logits, labels, reduction="sum")
    with pytest.raises(TypeError, match="integer"):
        answer_ce(logits, labels, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="micro_batch"):
        answer_ce(logits, labels, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="positions"):
        answer_kl(logits, logits, labels, positions="prompt")
    with pytest.raises(ValueError, match="mask_labels"):
        answer_kl(logits, logits, None)
