"""Tiny tokenizer and models, and the offline loader's fast paths."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from emsedit_fast.models.smollm2 import load_model
from emsedit_fast.models.tiny import tiny_gpt2
from emsedit_fast.models.tiny import tiny_llama
from emsedit_fast.models.tiny import tiny_tokenizer


def test_tiny_tokenizer_is_deterministic_and_fresh():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a is not b  # callers may add tokens without affecting each other
    assert a.get_vocab() == b.get_vocab()
    assert 500 <= len(a) <= 1000
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (0, 1, 2)
    assert a.pad_token == "<|pad|>" and a.eos_token == "<|eos|>"


def test_tiny_tokenizer_round_trips_any_text():
    tok = tiny_tokenizer()
    for text in ("The mother tongue of Danielle Darrieux is French.", "Zanzibar's qwerty: 42 ünïcode!"):
        ids = tok(text)["input_ids"]
        assert tok.bos_token_id not in ids  # GPT-2 style: no BOS by default
        assert tok.decode(ids) == text
    # Corpus words are single tokens after training: answers are short, like a real vocabulary.
    assert len(tok(" French", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(" Paris", add_special_tokens=False)["input_ids"]) == 1


def test_tiny_tokenizer_custom_corpus():
    tok = tiny_tokenizer(["aaa bbb aaa bbb ccc"] * 3, vocab_size=300)
    assert len(tok) < len(tiny_tokenizer())
    assert tok.decode(tok("aaa ccc")["input_ids"]) == "aaa ccc"


def test_tiny_models():
    vocab = len(tiny_tokenizer())
    rng = torch.get_rng_state()
    g, lm = tiny_gpt2(), tiny_llama()
    assert torch.equal(rng, torch.get_rng_state())  # building does not consume the caller's RNG
    for m in (g, lm):
        assert m.config.vocab_size == vocab and m.get_input_embeddings().num_embeddings == vocab
        assert not m.training and all(p.dtype == torch.float32 for p in m.parameters())
        assert m.config.pad_token_id == 0 and m.config.eos_token_id == 2
    assert g.config.resid_pdrop == g.config.embd_pdrop == g.config.attn_pdrop == 0.0
    assert lm.config.attention_dropout == 0.0
    assert isinstance(g.transformer.h[0].mlp.c_proj, Conv1D) and len(g.transformer.h) == 2
    assert isinstance(lm.model.layers[0].mlp.down_proj, torch.nn.Linear) and len(lm.model.layers) == 2
    assert lm.model.layers[0].mlp.up_proj.weight.shape == (128, 64)
    assert torch.equal(tiny_llama().model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)
    assert not torch.equal(tiny_llama(seed=1).model.layers[1].mlp.up_proj.weight,
                           lm.model.layers[1].mlp.up_proj.weight)
    ids = torch.tensor([tiny_tokenizer()("The capital of France is")["input_ids"]])
    assert g(ids).logits.shape == (1, ids.shape[1], vocab)
    assert lm(ids).logits.shape == (1, ids.shape[1], vocab)


def test_load_model_tiny_and_local_folder(tmp_path):
    model, tok = load_model("tiny-llama", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and len(tok) == model.config.vocab_size
    model, tok = load_model("tiny-gpt2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = load_model(tmp_path)
    assert type(again).__name__ == "GPT2LMHeadModel"
    assert torch.equal(again.transformer.h[1].mlp.c_proj.weight, model.transformer.h[1].mlp.c_proj.weight)
    assert tok2("The capital of France is")["input_ids"] == tok("The capital of France is")["input_ids"]
    with pytest.raises(ValueError, match="unknown model 'gpt-17'"):
        load_model("gpt-17")
