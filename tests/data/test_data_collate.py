"""Tokenisation, micro-batching and padding, tuple builders."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import trainers
from transformers import PreTrainedTokenizerFast

from emsedit_fast.data import IGNORE_INDEX
from emsedit_fast.data import EditRecord
from emsedit_fast.data import collate
from emsedit_fast.data import edit_tuples
from emsedit_fast.data import equiv_tuples
from emsedit_fast.data import portability_tuples
from emsedit_fast.data import record_tuples
from emsedit_fast.data import tokenize_pair
from emsedit_fast.data import unrel_tuples

SENTENCES = [
    "The capital of France is Paris.",
    "Paris is a city in France, and Lyon is a city in France too.",
    "The currency of Japan is the yen.",
    "Danielle Darrieux speaks French and English.",
    "The mother tongue of Danielle Darrieux is French.",
    "New York is a city in the United States.",
    "nq question: who wrote the book?",
]


def byte_level_bpe(bos: bool = True, pad: bool = True, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE trained on SENTENCES. bos: prepend <bos> by default (LLaMA-like); pad: has <pad>.

    A leading space is part of a byte-level token ("Ġ"), so " Paris" and "Paris" tokenise differently.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    kwargs = {}
    if bos:
        bos_id = tok.token_to_id("<bos>")
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", bos_id)])
        kwargs["bos_token"] = "<bos>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


@pytest.fixture(scope="module")
def tok():
    return byte_level_bpe()


def ids(tok, text, special):
    return tok(text, add_special_tokens=special)["input_ids"]


def test_tokenize_pair_layout_and_leading_space(tok):
    prompt, answer = "The mother tongue of Danielle Darrieux is", "French"
    p = ids(tok, prompt, True)
    a = ids(tok, " " + answer, False)
    assert p[0] == tok.bos_token_id  # default special tokens on the prompt only
    assert a != ids(tok, answer, False)  # this tokenizer encodes the leading space into the token
    inputs, labels = tokenize_pair(tok, prompt, answer)
    assert len(inputs) == len(labels) == len(p) + len(a) - 1
    assert inputs == p + a[:-1]
    assert labels == [IGNORE_INDEX] * (len(p) - 1) + a
    # pre-shifted: the label at t is the input at t + 1 on every answer position but the last
    answer_positions = [t for t, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert answer_positions == list(range(len(p) - 1, len(p) + len(a) - 1))
    for t in answer_positions[:-1]:
        assert labels[t] == inputs[t + 1]
    # exactly one leading space: decoding the answer labels gives " French"
    assert tok.decode([labels[t] for t in answer_positions]) == " " + answer


def test_multi_token_answer(tok):
    inputs, labels = tokenize_pair(tok, "The capital of France is", "Danielle Darrieux Paris")
    answer = [x for x in labels if x != IGNORE_INDEX]
    assert answer == ids(tok, " Danielle Darrieux Paris", False) and len(answer) >= 3
    assert inputs[-len(answer) + 1:] == answer[:-1]


def test_collate_sorts_pads_and_groups(tok):
    pairs = [
        ("The capital of France is a city called", "Paris"),  # long
        ("Lyon is", "France"),
        ("The currency of Japan is the", "yen"),
        ("Lyon is", "Paris"),  # same length as tuple 1: the stable sort keeps 1 before 3
        ("New York is a city in", "the United States"),
    ]
    batch = collate(tok, pairs, micro_batch=2)
    n, width = batch.input_ids.shape
    expected = [tokenize_pair(tok, p, a) for p, a in pairs]
    lengths = [len(x[0]) for x in expected]
    assert n == 5 and width == max(lengths) and lengths[1] == lengths[3]
    assert batch.order.tolist() == sorted(range(5), key=lambda i: lengths[i])
    assert batch.order.tolist().index(1) < batch.order.tolist().index(3)
    assert batch.micro_batch.tolist() == [0, 0, 1, 1, 2] and batch.n_micro_batches == 3
    for dtype_t in (batch.input_ids, batch.attention_mask, batch.labels, batch.micro_batch, batch.order):
        assert dtype_t.dtype == torch.long
    assert batch.foil_labels is None
    for row, i in enumerate(batch.order.tolist()):
        inputs, labels = expected[i]
        k = len(inputs)
        assert batch.input_ids[row, :k].tolist() == inputs and batch.labels[row, :k].tolist() == labels
        assert (batch.input_ids[row, k:] == tok.pad_token_id).all()
        assert (batch.labels[row, k:] == IGNORE_INDEX).all()
        assert batch.attention_mask[row].tolist() == [1] * k + [0] * (width - k)
    # micro-batches come out trimmed to their own longest row and keep their ids
    parts = list(batch.micro_batches())
    assert [len(p) for p in parts] == [2, 2, 1]
    assert parts[0].input_ids.shape[1] == max(lengths[i] for i in batch.order[:2].tolist())
    assert [p.micro_batch.unique().tolist() for p in parts] == [[0], [1], [2]]
    # per-row values back into input order
    values = torch.arange(5) * 10
    assert batch.in_input_order(values)[batch.order].tolist() == values.tolist()
    moved = batch.to("cpu")
    assert torch.equal(moved.labels, batch.labels)


def test_collate_foil_labels(tok):
    pairs = [
        ("The capital of France is", "Paris", "Lyon"),
        ("Danielle Darrieux speaks", "French", "the United States"),  # foil longer than target
        ("The currency of Japan is the", "Danielle Darrieux", "yen"),  # foil shorter than target
        ("Lyon is a city in", "France"),  # no foil
    ]
    batch = collate(tok, pairs, micro_batch=4)
    assert batch.foil_labels is not None and batch.foil_labels.shape == batch.labels.shape
    for row, i in enumerate(batch.order.tolist()):
        p = ids(tok, pairs[i][0], True)
        a = ids(tok, " " + pairs[i][1], False)
        foil_row = batch.foil_labels[row].tolist()
        if len(pairs[i]) == 2:
            assert all(x == IGNORE_INDEX for x in foil_row)
            continue
        f = ids(tok, " " + pairs[i][2], False)
        m = min(len(a), len(f))
        start = len(p) - 1
        assert foil_row[start:start + m] == f[:m]
        assert all(x == IGNORE_INDEX for j, x in enumerate(foil_row) if not start <= j < start + m)


def test_collate_subject_mask_marks_the_last_subject_token(tok):
    pairs = [("The mother tongue of Danielle Darrieux is", "French"), ("Paris is a city in", "France"),
             ("The currency of Japan is the", "yen"), ("Lyon is a city in", "France")]
    subjects = ["Danielle Darrieux", "Paris", "Germany", None]  # the third is not in its prompt
    batch = collate(tok, pairs, micro_batch=2, subjects=subjects)
    assert batch.subject_mask is not None and batch.subject_mask.dtype == torch.bool
    for row, i in enumerate(batch.order.tolist()):
        marked = batch.subject_mask[row].nonzero().flatten().tolist()
        if i >= 2:
            assert marked == []
            continue
        # the marked token ends the subject: the prompt's tokens up to it decode to the text up to the subject's end
        assert len(marked) == 1
        end = pairs[i][0].index(subjects[i]) + len(subjects[i])
        assert tok.decode(batch.input_ids[row, 1:marked[0] + 1]) == pairs[i][0][:end]
        assert batch.labels[row, marked[0]].item() == IGNORE_INDEX  # inside the prompt, not an answer position
    # micro-batches and device moves carry the mask
    parts = list(batch.micro_batches())
    assert torch.equal(torch.cat([p.subject_mask.any(1) for p in parts]), batch.subject_mask.any(1))
    assert torch.equal(batch.to("cpu").subject_mask, batch.subject_mask)
    # the position choices: "subject" falls back to the answer positions where the prompt names no subject
    answer, subject = batch.answer_mask, batch.subject_mask
    named = subject.any(1)
    assert named.sum() == 2
    assert torch.equal(batch.positions("answer"), answer)
    assert torch.equal(batch.positions("all"), batch.attention_mask.bool())
    assert torch.equal(batch.positions("answer_subject"), answer | subject)
    chosen = batch.positions("subject")
    assert torch.equal(chosen[named], subject[named]) and torch.equal(chosen[~named], answer[~named])
    assert collate(tok, pairs).subject_mask is None
    with pytest.raises(ValueError, match="tokenised with its subjects"):
        collate(tok, pairs).positions("subject")
    with pytest.raises(ValueError, match="3 subjects for 4 tuples"):
        collate(tok, pairs, subjects=subjects[:3])


def test_pad_id_defaults_to_zero_and_no_bos():
    tok = byte_level_bpe(bos=False, pad=False)
    assert tok.pad_token_id is None
    batch = collate(tok, [("The capital of France is a city called", "Paris"), ("Lyon is", "France")])
    short = batch.order.tolist().index(1)
    k = int(batch.attention_mask[short].sum())
    assert (batch.input_ids[short, k:] == 0).all()
    assert batch.input_ids[short, 0].item() == ids(tok, "Lyon is", True)[0] == ids(tok, "Lyon is", False)[0]


def test_collate_errors_name_the_prompt(tok):
    with pytest.raises(ValueError, match="prompt '' is empty"):
        collate(tok, [("", "Paris")])
    with pytest.raises(ValueError, match="answer '' .* of prompt 'Lyon is'"):
        collate(tok, [("Lyon is", "")])
    long_prompt = "The capital of France is " * 20
    with pytest.raises(ValueError, match=r"more than max_length=16.*never truncated|The capital of France is"):
        collate(tok, [("Lyon is", "France"), (long_prompt, "Paris")], max_length=16)
    with pytest.raises(ValueError, match="no tuples"):
        collate(tok, [])
    with pytest.raises(ValueError, match="must be"):
        collate(tok, [("only a prompt",)])


def _cf(i, **kw):
    base = dict(case_id=f"c{i}", kind="counterfact", prompt=f"P{i} is", target_new="new", ground_truth="old",
                rephrase_prompts=(f"R{i}a is", f"R{i}b is"), locality_prompts=(f"L{i}a is", f"L{i}b is"),
                locality_answers=("la", "lb"), portability_prompts=(f"T{i} is",), portability_answers=("two",))
    base.update(kw)
    return EditRecord(**base)


def test_tuple_builders():
    cf = [_cf(0), _cf(1, rephrase_prompts=("R1 only is",))]
    zs = [EditRecord(case_id="z", kind="zsre", prompt="Q?", target_new="A", ground_truth="O",
                     rephrase_prompts=("Q2?",), locality_prompts=("nq question: x?",), locality_answers=("y",))]
    assert edit_tuples(cf) == [("P0 is", "new", "old"), ("P1 is", "new", "old")]
    assert edit_tuples(zs) == [("Q?", "A")]  # accuracy kinds carry no foil
    assert equiv_tuples(cf) == [("R0a is", "new", "old"), ("R1 only is", "new", "old")]  # training: the first
    assert unrel_tuples(cf) == [("L0a is", "la", "new"), ("L1a is", "la", "new")]  # roles swapped
    assert unrel_tuples(zs) == [("nq question: x?", "y")]
    tuples, owners = record_tuples(cf, "equiv")  # evaluation: all of them
    assert tuples == [("R0a is", "new", "old"), ("R0b is", "new", "old"), ("R1 only is", "new", "old")]
    assert owners == [0, 0, 1]
    assert record_tuples(cf, "unrel")[1] == [0, 0, 1, 1]
    assert portability_tuples(cf) == [("T0 is", "two"), ("T1 is", "two")]
    bare = EditRecord(case_id="b", kind="facts", prompt="X is", target_new="y")
    assert record_tuples([bare], "equiv") == ([], [])
    with pytest.raises(ValueError, match="record 'b' has no equiv prompt"):
        equiv_tuples([bare])
    with pytest.raises(ValueError, match="which must be"):
        record_tuples(cf, "other")
