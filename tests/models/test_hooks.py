"""Caching pass and factored meta-gradients on tiny GPT-2 (Conv1D) and LLaMA (Linear)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from emsedit_fast.losses import IGNORE_INDEX
from emsedit_fast.losses import answer_ce
from emsedit_fast.losses import answer_kl
from emsedit_fast.models.adapter import group_by_shape
from emsedit_fast.models.adapter import resolve_modules
from emsedit_fast.models.hooks import FactoredGrads
from emsedit_fast.models.hooks import capture
from emsedit_fast.models.hooks import factored_weight_grads
from emsedit_fast.models.tiny import tiny_gpt2
from emsedit_fast.models.tiny import tiny_llama
from emsedit_fast.models.tiny import tiny_tokenizer

PAIRS = [
    ("The mother tongue of Danielle Darrieux is", "English"),
    ("The capital of France is", "Paris"),
    ("Leo Tolstoy was born in", "Moscow"),
    ("People in Japan speak", "Japanese and some English"),
    ("The official language of Brazil is", "Portuguese"),
    ("Marie Curie is a citizen of", "Poland"),
]

# Every MLP linear of both layers, lowest module first among several shapes: the gradient identity must hold for all.
ALL_MLP = {
    "gpt2": [r"transformer\.h\.\d\.mlp\.c_fc", r"transformer\.h\.\d\.mlp\.c_proj", r"transformer\.h\.1\.attn\.c_attn"],
    "llama": [r"model\.layers\.\d\.mlp\.(gate|up|down)_proj", r"model\.layers\.1\.self_attn\.o_proj"],
}


def _build(arch):
    return tiny_gpt2() if arch == "gpt2" else tiny_llama()


def make_batch(pairs, micro_batch_size=2, tok=None):
    """Tokenisation: input_ids = p ⊕ a[:-1], labels = IGN·(|p|-1) ⊕ a, right padding."""
    tok = tok or tiny_tokenizer()
    ids, labs = [], []
    for prompt, answer in pairs:
        p = tok(prompt)["input_ids"]
        a = tok(" " + answer, add_special_tokens=False)["input_ids"]
        ids.append(p + a[:-1])
        labs.append([IGNORE_INDEX] * (len(p) - 1) + a)
    seq = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), seq), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(ids), seq), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(ids), seq, dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labs)):
        input_ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    micro_batch = torch.arange(len(ids)) // micro_batch_size
    return SimpleNamespace(input_ids=input_ids, attention_mask=mask, labels=labels, micro_batch=micro_batch)


def _assert_close_scaled(actual, expected, rel=2e-5, label=""):
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale + 1e-12, f"[{label}] max err {err:.3e} vs scale {scale:.3e}"


def _dense_grads(model, modules, batch, loss_fn):
    """Autograd weight gradients in storage layout, for comparison."""
    for p in model.parameters():
        p.grad = None
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    loss = loss_fn(logits)
    loss.backward()
    grads = {m.name: m.weight.grad.clone() for m in modules}
    for p in model.parameters():
        p.grad = None
    return grads, loss.item()


def _record_inputs(modules):
    """Independent hooks storing each module's full input (B, T, d_in) for cross-checks."""
    store, handles = {}, []
    for m in modules:
        def hook(mod, args, name=m.name):
            store[name] = args[0].detach().clone()
        handles.append(m.module.register_forward_pre_hook(hook))
    return store, handles


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_all_positions_sum_of_outer_products_is_the_weight_gradient(arch):
    model = _build(arch)
    modules = resolve_modules(model, ALL_MLP[arch])
    batch = make_batch(PAIRS, micro_batch_size=2)
    cap = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch,
                  token_mode="all")
    assert cap.n_rows == int(batch.attention_mask.sum())

    def loss_fn(logits):
        return answer_ce(logits, batch.labels, batch.micro_batch)

    dense, loss = _dense_grads(model, modules, batch, loss_fn)
    assert cap.loss == pytest.approx(loss, rel=1e-6)
    for m in modules:
        u, d = cap.keys[m.name], cap.value_grads[m.name]
        assert u.dtype == torch.float32 and u.shape == (cap.n_rows, m.d_in) and d.shape == (cap.n_rows, m.d_out)
        g = d.t() @ u  # Σ_j δ_j u_jᵀ, (d_out, d_in)
        expected = dense[m.name].t() if m.transposed else dense[m.name]  # Conv1D stores Gᵀ
        _assert_close_scaled(g, expected, label=m.name)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_answer_rows_and_identical_row_order(arch):
    model = _build(arch)
    modules = resolve_modules(model, ALL_MLP[arch])
    batch = make_batch(PAIRS)
    store, handles = _record_inputs(modules)
    try:
        cap = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch)
    finally:
        for h in handles:
            h.remove()
    answer = batch.labels != IGNORE_INDEX
    rows, pos = answer.nonzero(as_tuple=True)
    assert cap.n_rows == int(answer.sum())
    assert torch.equal(cap.rows, rows) and torch.equal(cap.positions, pos)
    assert torch.equal(cap.row_micro_batch, batch.micro_batch[rows])
    # Exactly the answer tokens of every sequence, no more, no fewer.
    per_seq = torch.bincount(cap.rows, minlength=len(PAIRS))
    tok = tiny_tokenizer()
    assert per_seq.tolist() == [len(tok(" " + a, add_special_tokens=False)["input_ids"]) for _, a in PAIRS]
    # Row j of every module is the same (sequence, position): keys equal that module's own input there.
    for m in modules:
        torch.testing.assert_close(cap.keys[m.name], store[m.name][rows, pos].float(), rtol=0, atol=0)
    # ... and δ equals the full-position δ of the same loss at the same tokens.
    full = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch,
                   token_mode="all")
    nonpad = batch.attention_mask.bool()
    at = (answer[nonpad]).nonzero().squeeze(1)  # answer rows within the all-position row order
    for m in modules:
        torch.testing.assert_close(cap.value_grads[m.name], full.value_grads[m.name][at], rtol=0, atol=0)
        torch.testing.assert_close(cap.keys[m.name], full.keys[m.name][at], rtol=0, atol=0)


def test_chosen_positions_give_rows_in_row_order_and_leave_the_loss():
    model = tiny_llama()
    modules = resolve_modules(model, ALL_MLP["llama"])
    batch = make_batch(PAIRS)
    extra = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    extra[0, 3] = extra[2, 1] = extra[5, 4] = True  # e.g. the subjects' last tokens, inside the prompts
    answer = batch.labels != IGNORE_INDEX
    plain = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch)
    full = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch,
                   token_mode="all")
    for chosen in (answer | extra, extra):
        cap = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch,
                      positions=chosen)
        rows, pos = chosen.nonzero(as_tuple=True)
        assert cap.n_rows == int(chosen.sum())
        assert torch.equal(cap.rows, rows) and torch.equal(cap.positions, pos)
        assert cap.loss == plain.loss
        at = chosen[batch.attention_mask.bool()].nonzero().squeeze(1)
        for m in modules:  # the same keys and value-gradients the all-position pass has there
            torch.testing.assert_close(cap.keys[m.name], full.keys[m.name][at], rtol=0, atol=0)
            torch.testing.assert_close(cap.value_grads[m.name], full.value_grads[m.name][at], rtol=0, atol=0)
        assert cap.value_grads[modules[0].name][~answer[rows, pos]].abs().sum() > 0  # prompt tokens carry gradient
    with pytest.raises(ValueError, match="positions must be"):
        capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch,
                positions=extra[:, :2])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_pass_over_micro_batches_equals_separate_passes(arch):
    model = _build(arch)
    modules = resolve_modules(model, ALL_MLP[arch])
    batch = make_batch(PAIRS, micro_batch_size=2)
    one = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch)
    parts, losses = [], []
    for b in range(3):
        sub = make_batch(PAIRS[2 * b:2 * b + 2], micro_batch_size=2)  # padded to its own length
        parts.append(capture(model, modules, sub.input_ids, sub.attention_mask, sub.labels, None))
        losses.append(parts[-1].loss)
    assert one.loss == pytest.approx(sum(losses), rel=1e-6)
    for m in modules:
        _assert_close_scaled(one.keys[m.name], torch.cat([p.keys[m.name] for p in parts]), label=m.name)
        _assert_close_scaled(one.value_grads[m.name], torch.cat([p.value_grads[m.name] for p in parts]),
                             label=m.name)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_capture_leaves_parameters_and_mode_untouched(arch):
    model = _build(arch).train()  # dropout is 0: train mode changes nothing numerically, but must be preserved
    modules = resolve_modules(model, ALL_MLP[arch])
    lowest = modules[0].module
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(False)  # a caller's own flag must come back as it was
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = {}

    def probe(mod, args):
        seen["input_requires_grad"] = args[0].requires_grad
        seen["any_param_requires_grad"] = any(p.requires_grad for p in model.parameters())

    handle = lowest.register_forward_pre_hook(probe)
    hooks_before = {id(m.module): len(m.module._forward_hooks) for m in modules}
    batch = make_batch(PAIRS)
    try:
        capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch)
    finally:
        handle.remove()
    assert seen == {"input_requires_grad": False, "any_param_requires_grad": False}  # nothing below is on the tape
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert {id(m.module): len(m.module._forward_hooks) for m in modules} == hooks_before
    assert model.training
    model.eval()
    capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch)
    assert not model.training


class _TwiceLM(nn.Module):
    """Toy LM that calls one Linear twice per forward: capture must refuse it."""

    def __init__(self, vocab=16, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        h = self.emb(input_ids)
        return SimpleNamespace(logits=self.head(self.proj(self.proj(h))))


def test_module_called_twice_is_an_error_and_state_is_restored():
    model = _TwiceLM()
    model.head.weight.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = resolve_modules(model, ["proj"])
    ids = torch.randint(0, 16, (2, 5))
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[:, 3:] = 1
    with pytest.raises(RuntimeError, match=r"'proj' was called 2 times in one forward"):
        capture(model, modules, ids, None, labels, None)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert len(model.proj._forward_hooks) == 0
    assert all(p.grad is None for p in model.parameters())


def test_modules_of_another_model_are_refused():
    a, b = tiny_llama(), tiny_llama()
    batch = make_batch(PAIRS[:2])
    with pytest.raises(ValueError, match="not submodules"):
        capture(a, resolve_modules(b, [r"model\.layers\.0\.mlp\.up_proj"]), batch.input_ids, batch.attention_mask,
                batch.labels, batch.micro_batch)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_factored_weight_grads_match_autograd(arch):
    model = _build(arch)
    modules = resolve_modules(model, ALL_MLP[arch])
    batch = make_batch(PAIRS, micro_batch_size=3)
    with torch.no_grad():
        ref_logits = tiny_llama(seed=5)(input_ids=batch.input_ids).logits if arch == "llama" else \
            tiny_gpt2(seed=5)(input_ids=batch.input_ids).logits

    def loss_fn(logits):  # CE on answers + KL on all non-pad positions, as a MALMEN-style meta-loss
        return answer_ce(logits, batch.labels, batch.micro_batch) + 0.6 * answer_kl(
            ref_logits, logits, batch.labels, batch.micro_batch, positions="all", attention_mask=batch.attention_mask)

    fg = factored_weight_grads(model, modules, batch.input_ids, batch.attention_mask, loss_fn)
    dense, loss = _dense_grads(model, modules, batch, loss_fn)
    assert fg.loss == pytest.approx(loss, rel=1e-6) and fg.n_rows == int(batch.attention_mask.sum())
    for m in modules:
        expected = dense[m.name].t() if m.transposed else dense[m.name]
        _assert_close_scaled(fg.dense(m.name), expected, label=m.name)
    assert all(p.grad is None for p in model.parameters())
    # Two passes merged: gradients add.
    half = make_batch(PAIRS[:2])
    fg2 = factored_weight_grads(model, modules, half.input_ids, half.attention_mask,
                                lambda lg: answer_ce(lg, half.labels))
    merged = FactoredGrads.merge([fg, fg2])
    assert merged.n_rows == fg.n_rows + fg2.n_rows
    name = modules[-1].name
    torch.testing.assert_close(merged.dense(name), fg.dense(name) + fg2.dense(name), rtol=1e-5, atol=1e-8)


def test_stack_group_rows():
    model = tiny_llama()
    modules = resolve_modules(model, [r"model\.layers\.0\.mlp\.gate_proj", r"model\.layers\.1\.mlp\.up_proj",
                                      r"model\.layers\.1\.mlp\.down_proj"])
    batch = make_batch(PAIRS)
    cap = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch)
    group = group_by_shape(modules)[0]
    u, d, idx = cap.stack(group)
    n = cap.n_rows
    assert u.shape == (2 * n, 64) and d.shape == (2 * n, 128) and idx.dtype == torch.int64
    assert idx.tolist() == [0] * n + [1] * n
    torch.testing.assert_close(u[n:], cap.keys["model.layers.1.mlp.up_proj"], rtol=0, atol=0)


def test_capture_bf16_model_gives_fp32_rows():
    model = tiny_llama().to(torch.bfloat16)
    modules = resolve_modules(model, [r"model\.layers\.\d\.mlp\.down_proj"])
    batch = make_batch(PAIRS[:4])
    cap = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch)
    for m in modules:
        assert cap.keys[m.name].dtype == torch.float32 and cap.value_grads[m.name].dtype == torch.float32
        assert torch.isfinite(cap.value_grads[m.name]).all() and cap.value_grads[m.name].abs().sum() > 0
    same = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch,
                   dtype=torch.bfloat16)
    assert same.keys[modules[0].name].dtype == torch.bfloat16


SUBJECTS = ["Danielle Darrieux", "France", "Leo Tolstoy", "Japan", None, "Marie Curie"]


@pytest.mark.parametrize("positions", ["all", "answer", "answer_subject"])
def test_key_second_moments_are_the_mean_outer_product_of_the_chosen_positions(positions):
    """Sigma_l = (1/N) sum_t x_t x_t^T over every non-pad position, or over exactly the positions whose keys the
    capture reads with the same choice: the same rows as `capture`'s keys, so the prior describes what an edit
    touches."""
    from emsedit_fast.data.collate import collate
    from emsedit_fast.models.hooks import key_second_moments

    model = tiny_llama()
    modules = resolve_modules(model, ALL_MLP["llama"])
    batch = collate(tiny_tokenizer(), PAIRS, micro_batch=3, subjects=SUBJECTS)
    moments, tokens = key_second_moments(model, modules, batch.micro_batches(), positions=positions)
    chosen = batch.positions(positions)
    cap = capture(model, modules, batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch,
                  positions=chosen)
    assert tokens == cap.n_rows == int(chosen.sum())
    if positions == "answer_subject":  # five of the six prompts name their subject
        assert tokens == int(batch.answer_mask.sum()) + 5
    for m in modules:
        x = cap.keys[m.name].double()
        torch.testing.assert_close(moments[m.name].double(), x.t() @ x / tokens, rtol=1e-5, atol=1e-6)
    if positions != "all":  # fewer positions, a different matrix: the option is not a no-op
        everything, _ = key_second_moments(model, modules, batch.micro_batches())
        assert not torch.allclose(everything[modules[0].name], moments[modules[0].name])
    no_answer = collate(tiny_tokenizer(), PAIRS[:2])
    no_answer.labels.fill_(IGNORE_INDEX)
    with pytest.raises(ValueError, match="no tokens at positions 'answer'"):
        key_second_moments(model, modules, [no_answer], positions="answer")
