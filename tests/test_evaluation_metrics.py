"""Evaluation metrics against hand-computed values, and the evaluator end to end.

The exact evaluator checks use a bigram "model" (logits at t depend only on the token at t, read from a hand-set
table) and a word-level tokenizer, so every ES / GS / LS value can be worked out by hand. A tiny random LLaMA checks
the plumbing with a real transformers model.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import trainers
from transformers import LlamaConfig
from transformers import LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

from emsedit_fast.data import EditRecord
from emsedit_fast.data import bundled_facts
from emsedit_fast.fluency import fluency
from emsedit_fast.fluency import generate_greedy
from emsedit_fast.fluency import generation_prompts
from emsedit_fast.fluency import ngram_entropy
from emsedit_fast.fluency import text_ngram_entropy
from emsedit_fast.metrics import answer_argmax
from emsedit_fast.metrics import evaluate
from emsedit_fast.metrics import evaluate_records
from emsedit_fast.metrics import margin_success
from emsedit_fast.metrics import pre_edit_predictions
from emsedit_fast.metrics import seq_logprob_success
from emsedit_fast.metrics import sequence_logprob
from emsedit_fast.metrics import token_accuracy
from emsedit_fast.metrics import token_agreement

IGN = -100


# ---------------------------------------------------------------------------------------------------------------------
# Metric functions on hand-built logits


def logits_with(shape, entries):
    """(B, T, V) zeros with logits[b, t, v] = value for each ((b, t, v), value) in `entries`."""
    out = torch.zeros(shape)
    for (b, t, v), value in entries.items():
        out[b, t, v] = value
    return out


def test_token_accuracy_multi_token_padding_and_ties():
    labels = torch.tensor([
        [IGN, IGN, 2, 3, IGN],  # two answer tokens, then padding
        [IGN, 4, 5, 1, 0],  # four answer tokens
        [IGN, IGN, IGN, 1, 4],  # ties: positions 3 and 4 have tokens 1 and 4 both maximal
        [IGN, IGN, IGN, IGN, IGN],  # padding row: no answer positions
    ])
    logits = logits_with((4, 5, 6), {
        (0, 2, 2): 3.0, (0, 3, 1): 3.0, (0, 3, 3): 2.0,  # row 0: right, wrong -> 1/2
        (1, 1, 4): 1.0, (1, 2, 5): 1.0, (1, 3, 1): 1.0, (1, 4, 2): 1.0,  # row 1: 3 of 4
        (2, 3, 1): 1.0, (2, 3, 4): 1.0, (2, 4, 1): 1.0, (2, 4, 4): 1.0,  # row 2: the tie goes to id 1
    })
    acc = token_accuracy(logits, labels)
    assert acc.dtype == torch.float32 and acc.shape == (4,)
    assert acc[:3].tolist() == [0.5, 0.75, 0.5]
    assert math.isnan(acc[3].item())
    # a full tie on an all-zero row picks token 0
    assert token_accuracy(torch.zeros(1, 1, 4), torch.tensor([[0]])).item() == 1.0
    assert token_accuracy(torch.zeros(1, 1, 4), torch.tensor([[3]])).item() == 0.0
    # bf16 logits give the same answer
    assert token_accuracy(logits.bfloat16(), labels)[:3].tolist() == [0.5, 0.75, 0.5]


def test_answer_argmax_and_token_agreement():
    labels = torch.tensor([[IGN, 2, 3], [IGN, IGN, 0]])
    before = logits_with((2, 3, 4), {(0, 1, 2): 1.0, (0, 2, 1): 1.0, (1, 2, 3): 1.0, (0, 0, 3): 9.0})
    ref = answer_argmax(before, labels)
    assert ref.tolist() == [[IGN, 2, 1], [IGN, IGN, 3]]  # -100 off the answers, whatever the logits there
    after = logits_with((2, 3, 4), {(0, 1, 2): 1.0, (0, 2, 3): 1.0, (1, 2, 3): 5.0})
    assert token_agreement(after, ref, labels).tolist() == [0.5, 1.0]
    assert token_agreement(before, ref, labels).tolist() == [1.0, 1.0]
    # against the gold labels the same model scores differently: agreement is not accuracy
    assert token_accuracy(before, labels).tolist() == [0.5, 0.0]


def test_margin_shared_first_token_unequal_lengths_and_strict_ties():
    labels = torch.tensor([
        [IGN, 5, 2, IGN],  # target (5, 2), foil (5, 3): position 1 shared, only position 2 is scored
        [IGN, 1, 2, 3],  # target of 3 tokens, foil of 1: only position 1
        [IGN, IGN, IGN, 2],  # target of 1 token, foil of 3 (cut to 1 by collate)
        [IGN, IGN, IGN, IGN],  # padding row
        [IGN, 1, 2, IGN],  # two scored positions
    ])
    foil = torch.tensor([
        [IGN, 5, 3, IGN],
        [IGN, 4, IGN, IGN],
        [IGN, IGN, IGN, 3],
        [IGN, IGN, IGN, IGN],
        [IGN, 0, 0, IGN],
    ])
    logits = logits_with((5, 4, 6), {
        (0, 1, 0): 9.0,  # position 1 of row 0 is not scored, so this does not matter
        (0, 2, 2): 2.0, (0, 2, 3): 1.0,  # win
        (1, 1, 1): 0.5, (1, 1, 4): 0.5,  # tie: not a win (strict)
        (1, 2, 2): -5.0,  # beyond the foil: not scored
        (2, 3, 2): 1.0,  # win
        (4, 1, 1): 1.0, (4, 2, 0): 1.0,  # win, loss
    })
    wins, scored = margin_success(logits, labels, foil)
    assert wins.dtype == torch.long and scored.dtype == torch.long
    assert wins.tolist() == [1, 0, 1, 0, 1]
    assert scored.tolist() == [1, 1, 1, 0, 2]
    pooled = wins.sum().item() / scored.sum().item()
    assert pooled == pytest.approx(3 / 5)
    per_row = [w / s for w, s in zip(wins.tolist(), scored.tolist()) if s]
    assert sum(per_row) / len(per_row) == pytest.approx((1 + 0 + 1 + 0.5) / 4)


def test_sequence_logprob_and_seq_prob_success():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 7)
    labels = torch.tensor([[IGN, 1, 2, IGN], [IGN, IGN, IGN, 6], [IGN, IGN, IGN, IGN]])
    logp = torch.log_softmax(logits.double(), dim=-1)
    expected0 = (logp[0, 1, 1] + logp[0, 2, 2]).item() / 2
    expected1 = logp[1, 3, 6].item()
    got = sequence_logprob(logits, labels)
    assert got[0].item() == pytest.approx(expected0, abs=1e-5)
    assert got[1].item() == pytest.approx(expected1, abs=1e-5)
    assert math.isnan(got[2].item())
    foil_labels = torch.tensor([[IGN, 3, IGN, IGN], [IGN, IGN, IGN, 5], [IGN, IGN, IGN, 0]])
    success = seq_logprob_success(logits, labels, logits, foil_labels)
    assert success[0].item() == (expected0 > logp[0, 1, 3].item())
    assert success[1].item() == (expected1 > logp[1, 3, 5].item())


def test_ngram_entropy():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert text_ngram_entropy("a b a b") == pytest.approx(expected)
    assert text_ngram_entropy("word") == 0.0  # fewer tokens than n
    # punctuation is a token: "a, b" has tokens a , b
    assert text_ngram_entropy("a, b") == pytest.approx((2 / 3 * 1.0 + 4 / 3 * 0.0) / 2)
    repetitive = "the the the the the the the the"
    varied = "Paris is the capital and largest city of France, on the Seine."
    assert ngram_entropy([repetitive]) < ngram_entropy([varied])
    assert ngram_entropy(["a b a b", "word"]) == pytest.approx(expected / 2)
    assert math.isnan(ngram_entropy([]))


# ---------------------------------------------------------------------------------------------------------------------
# The evaluator on a bigram model with hand-computable scores

WORDS = ("the capital of france spain italy is lies in speak people country new york delhi rome paris french "
         "english spanish madrid city").split()


def word_tokenizer():
    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", unk_token="<unk>")


class Bigram(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the prediction depends on the current token only."""

    def __init__(self, tok):
        super().__init__()
        self.tok = tok
        self.table = torch.nn.Parameter(torch.zeros(len(tok), len(tok)))

    def set(self, prev, nxt, value):
        with torch.no_grad():
            self.table[self.tok.convert_tokens_to_ids(prev), self.tok.convert_tokens_to_ids(nxt)] = value

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        assert not torch.is_grad_enabled() and not self.training
        return SimpleNamespace(logits=self.table[input_ids])

    def logp(self, prev, nxt):
        row = torch.log_softmax(self.table[self.tok.convert_tokens_to_ids(prev)].double(), dim=-1)
        return row[self.tok.convert_tokens_to_ids(nxt)].item()


@pytest.fixture()
def bigram():
    tok = word_tokenizer()
    model = Bigram(tok)
    for prev, nxt, value in [("is", "new", 1.0), ("new", "york", 1.0), ("in", "rome", 1.0),
                             ("country", "spain", 1.0), ("speak", "french", 1.0), ("of", "rome", 1.0),
                             ("rome", "france", 1.0), ("is", "paris", 0.5)]:
        model.set(prev, nxt, value)
    return model, tok


def zsre_records():
    a = EditRecord(case_id="A", kind="zsre", prompt="the capital of france is", target_new="new york",
                   rephrase_prompts=("france capital lies in", "people in france speak"),
                   locality_prompts=("madrid country",), locality_answers=("spain",),
                   portability_prompts=("the city in france is",), portability_answers=("new york",))
    b = EditRecord(case_id="B", kind="zsre", prompt="people in spain speak", target_new="english",
                   rephrase_prompts=("spain people speak",),
                   locality_prompts=("the capital of italy is",), locality_answers=("rome",))
    return [a, b]


def test_evaluate_accuracy_family_by_hand(bigram):
    model, tok = bigram
    records = zsre_records()
    pre = pre_edit_predictions(model, tok, records, batch_size=2, progress=False)
    assert [t.tolist() for t in pre.argmax] == [[tok.convert_tokens_to_ids("spain")],
                                                 [tok.convert_tokens_to_ids("new")]]
    unedited = evaluate(model, tok, records, pre_edit=pre, batch_size=3, progress=False)
    # A: ES 2/2; rephrases 1/2 (in -> rome, then new -> york) and 1/2 (speak -> french) -> 0.5; loc 1; portability 1
    # B: ES: speak -> french, not english -> 0; GS 0; loc: is -> new, not rome -> 0
    assert unedited.metrics == pytest.approx({"es": 50.0, "gs": 25.0, "ls_gold": 50.0, "ls_agree": 100.0,
                                              "ps": 100.0})
    assert unedited.counts == {"records": 2, "es": 2, "gs": 3, "ls_gold": 2, "ls_agree": 2, "ps": 1}
    assert unedited.per_record["gs"] == [0.5, 0.0]
    assert math.isnan(unedited.per_record["ps"][1])
    assert unedited.protocol["metric_family"] == "accuracy"

    # "edit" the model: country -> italy. LS-gold of A drops; LS-agree drops for A only.
    model.set("country", "spain", 0.0)
    model.set("country", "italy", 1.0)
    edited = evaluate(model, tok, records, pre_edit=pre, batch_size=1, progress=False)
    assert edited.metrics == pytest.approx({"es": 50.0, "gs": 25.0, "ls_gold": 0.0, "ls_agree": 50.0, "ps": 100.0})
    assert model.training  # a fresh module is in training mode; the evaluator restores that


def cf_records():
    c = EditRecord(case_id="C", kind="counterfact", prompt="the capital of france is", target_new="new york",
                   ground_truth="new delhi", rephrase_prompts=("france capital lies in",),
                   locality_prompts=("madrid country",), locality_answers=("spain",))
    d = EditRecord(case_id="D", kind="counterfact", prompt="people in spain speak", target_new="french",
                   ground_truth="english spanish", rephrase_prompts=("spain people speak",),
                   locality_prompts=("the capital of italy is",), locality_answers=("rome",))
    e = EditRecord(case_id="E", kind="counterfact", prompt="the capital of", target_new="rome italy",
                   ground_truth="paris france", rephrase_prompts=("capital city of",),
                   locality_prompts=("people in spain speak", "the capital of france is"),
                   locality_answers=("spanish", "paris"))
    return [c, d, e]


def test_evaluate_margin_family_by_hand(bigram):
    model, tok = bigram
    records = cf_records()
    # ES. C: only position 2 is scored (shared "new"): york 1 > delhi 0 -> 1/1.
    #     D: target 1 token, foil 2: position 1, french 1 > english 0 -> 1/1.
    #     E: of -> rome 1 > paris 0 (win); rome -> italy 0 vs france 1 (loss) -> 1/2.
    # LS (roles swapped, foil = target_new). C: country -> spain 1 > new 0 -> 1/1. D: is -> rome 0 vs french 0 tie
    #     -> 0/1. E: speak -> spanish 0 < rome 0? tie -> 0/1; is -> paris 0.5 > rome 0 -> 1/1.
    pooled = evaluate(model, tok, records, batch_size=2, progress=False)
    assert pooled.metrics == pytest.approx({"es": 75.0, "gs": 75.0, "ls": 50.0})
    assert pooled.counts["es_positions"] == 4 and pooled.counts["ls"] == 4
    assert pooled.protocol["cf_reduction"] == "pooled" and pooled.protocol["metric_family"] == "margin"
    per_example = evaluate(model, tok, records, batch_size=2, progress=False, cf_reduction="per_example")
    assert per_example.metrics == pytest.approx({"es": 250 / 3, "gs": 250 / 3, "ls": 50.0})
    assert per_example.per_record["ls"] == [1.0, 0.0, 0.5]

    # cf_score = seq_prob: mean token log-probability of the target against the foil, each teacher-forced.
    def mean_lp(prev, words):
        steps = [prev] + words[:-1]
        return sum(model.logp(p, w) for p, w in zip(steps, words)) / len(words)

    es_expected = [mean_lp("is", ["new", "york"]) > mean_lp("is", ["new", "delhi"]),
                   mean_lp("speak", ["french"]) > mean_lp("speak", ["english", "spanish"]),
                   mean_lp("of", ["rome", "italy"]) > mean_lp("of", ["paris", "france"])]
    seq = evaluate(model, tok, records, batch_size=2, progress=False, cf_score="seq_prob")
    assert seq.metrics["es"] == pytest.approx(100.0 * sum(es_expected) / 3)
    assert seq.protocol["cf_score"] == "seq_prob"

    flat = evaluate_records(model, tok, records, batch_size=2, progress=False)
    assert {k: flat[k] for k in ("es", "gs", "ls")} == pooled.metrics
    assert flat["counts"] == pooled.counts and flat["metric_protocol"] == pooled.protocol


def test_evaluate_rejects_bad_inputs(bigram):
    model, tok = bigram
    with pytest.raises(ValueError, match="mix metric families"):
        evaluate(model, tok, zsre_records() + cf_records(), progress=False)
    pre = pre_edit_predictions(model, tok, zsre_records()[:1], progress=False)
    with pytest.raises(ValueError, match="other records"):
        evaluate(model, tok, zsre_records(), pre_edit=pre, progress=False)
    with pytest.raises(ValueError, match="cf_reduction"):
        evaluate(model, tok, cf_records(), cf_reduction="mean", progress=False)
    with pytest.raises(ValueError, match="no records"):
        evaluate(model, tok, [], progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# Plumbing on a tiny random LLaMA


def bpe_tokenizer(records):
    texts = [r.prompt + " " + r.target_new for r in records] + [p for r in records for p in r.locality_prompts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<pad>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>")


def test_evaluate_tiny_llama_plumbing():
    records = [r for r in bundled_facts("eval") if r.portability_prompts][:3]  # every metric defined (no NaN)
    tok = bpe_tokenizer(records)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1)
    model = LlamaForCausalLM(config)
    model.train()  # the evaluator must switch to eval mode and back
    pre = pre_edit_predictions(model, tok, records, batch_size=16, progress=False)
    assert model.training
    first = evaluate(model, tok, records, pre_edit=pre, batch_size=16, progress=False)
    assert model.training
    assert set(first.metrics) == {"es", "gs", "ls", "ls_agree", "ps"}
    assert first.metrics["ls_agree"] == 100.0  # the unedited model agrees with itself
    assert all(0.0 <= v <= 100.0 for v in first.metrics.values())
    # row grouping and right padding do not change the scores, and a second run gives identical numbers
    again = evaluate(model, tok, records, pre_edit=pre, batch_size=3, progress=False)
    assert again.to_dict(per_record=True) == first.to_dict(per_record=True)
    # perturb the weights: LS-agree measures the change against the stored pre-edit argmax
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    edited = evaluate(model, tok, records, pre_edit=pre, batch_size=16, progress=False)
    assert edited.metrics["ls_agree"] < 100.0


def _greedy_by_hand(model, tok, prompt, n_tokens):
    """Greedy decoding one token at a time on the unpadded prompt, full forward each step (no cache)."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(n_tokens):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if int(nxt) == model.config.eos_token_id:
                break
    width = tok(prompt, return_tensors="pt")["input_ids"].shape[1]
    return prompt + tok.decode(ids[0, width:], skip_special_tokens=True)


@pytest.mark.parametrize("pad", ["pad token", "eos only"])
def test_generate_greedy_and_fluency_match_token_by_token_decoding(pad):
    records = bundled_facts("eval")[:4]
    tok = bpe_tokenizer(records)
    if pad == "eos only":  # a LLaMA-style tokenizer without a pad token: prompts are padded with eos
        tok.eos_token = "<bos>"
        tok.pad_token = None
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=5)
    model = LlamaForCausalLM(config)
    model.train()
    prompts = generation_prompts(records)
    assert prompts == [p for r in records for p in (r.generation_prompts or (r.prompt,))] and len(prompts) >= 4
    # prompts of different lengths in one left-padded batch decode exactly as each one alone
    texts = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=len(prompts), progress=False)
    assert model.training
    assert texts == [_greedy_by_hand(model, tok, p, 6) for p in prompts]
    assert generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=1, progress=False) == texts
    score, n = fluency(model, tok, records, max_new_tokens=6, batch_size=3, progress=False)
    assert n == len(prompts) and score == pytest.approx(ngram_entropy(texts))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy(model, tok, prompts, max_new_tokens=0)


def test_generation_prompts_fall_back_to_the_edit_prompt():
    a = EditRecord(case_id="a", kind="zsre", prompt="p a", target_new="x")
    b = EditRecord(case_id="b", kind="zsre", prompt="p b", target_new="y", generation_prompts=("g1", "g2"))
    assert generation_prompts([a, b]) == ["p a", "g1", "g2"]
