"""Tiny random-weight models and a tiny in-process tokenizer for tests.

Nothing is downloaded: the models are built from configs and the tokenizer is a byte-level BPE trained in-process
on a short built-in English corpus (facts about countries, capitals, languages and a few people, in the style of
zsRE/CounterFact prompts). Byte-level BPE encodes any text, so unseen words still tokenise (into more pieces).

`tiny_gpt2` edits through GPT-2 `Conv1D` (weights stored (d_in, d_out)); `tiny_llama` through `nn.Linear`.
`tiny_causal_lm(model_type)` builds any family of the model matrix (docs/models.md) from its `transformers` config.
All are fp32, dropout 0, in eval mode, with the vocabulary of `tiny_tokenizer()` (pad/bos/eos ids shared).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers
from transformers import GPT2Config
from transformers import GPT2LMHeadModel
from transformers import LlamaConfig
from transformers import LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
TINY_VOCAB_TARGET = 768
TINY_MAX_POSITIONS = 256

# (country, capital, language, nationality)
_COUNTRIES = (
    ("France", "Paris", "French", "French"), ("Germany", "Berlin", "German", "German"),
    ("Italy", "Rome", "Italian", "Italian"), ("Spain", "Madrid", "Spanish", "Spanish"),
    ("Portugal", "Lisbon", "Portuguese", "Portuguese"), ("England", "London", "English", "English"),
    ("Russia", "Moscow", "Russian", "Russian"), ("Japan", "Tokyo", "Japanese", "Japanese"),
    ("China", "Beijing", "Chinese", "Chinese"), ("Greece", "Athens", "Greek", "Greek"),
    ("Sweden", "Stockholm", "Swedish", "Swedish"), ("Norway", "Oslo", "Norwegian", "Norwegian"),
    ("Finland", "Helsinki", "Finnish", "Finnish"), ("Poland", "Warsaw", "Polish", "Polish"),
    ("Turkey", "Ankara", "Turkish", "Turkish"), ("Egypt", "Cairo", "Arabic", "Egyptian"),
    ("Netherlands", "Amsterdam", "Dutch", "Dutch"), ("Denmark", "Copenhagen", "Danish", "Danish"),
    ("Hungary", "Budapest", "Hungarian", "Hungarian"), ("Korea", "Seoul", "Korean", "Korean"),
    ("India", "Delhi", "Hindi", "Indian"), ("Brazil", "Brasilia", "Portuguese", "Brazilian"),
    ("Mexico", "Mexico City", "Spanish", "Mexican"), ("Canada", "Ottawa", "English", "Canadian"),
    ("Austria", "Vienna", "German", "Austrian"), ("Ireland", "Dublin", "Irish", "Irish"),
    ("Iran", "Tehran", "Persian", "Iranian"), ("Israel", "Jerusalem", "Hebrew", "Israeli"),
    ("Ukraine", "Kyiv", "Ukrainian", "Ukrainian"), ("Czechia", "Prague", "Czech", "Czech"),
)

# (person, country index, profession)
_PEOPLE = (
    ("Danielle Darrieux", 0, "actress"), ("Albert Einstein", 1, "physicist"), ("Sophia Loren", 2, "actress"),
    ("Pablo Picasso", 3, "painter"), ("Leo Tolstoy", 6, "writer"), ("Akira Kurosawa", 7, "director"),
    ("Greta Garbo", 10, "actress"), ("Edvard Munch", 11, "painter"), ("Marie Curie", 13, "chemist"),
    ("Vincent van Gogh", 16, "painter"), ("Hans Christian Andersen", 17, "writer"), ("Franz Kafka", 29, "writer"),
    ("Wolfgang Amadeus Mozart", 24, "composer"), ("James Joyce", 25, "writer"), ("Charles Dickens", 5, "writer"),
)

_FILLER = (
    "The city is large and old, with a river, a market, a museum and many small streets.",
    "She worked as a teacher, then as a doctor, and later she wrote books about music and history.",
    "He plays football for a club in the north and he was born in a small village near the sea.",
    "The company makes cars, phones and computers, and it was founded by two brothers many years ago.",
    "In the morning we drink coffee or tea, and in the evening we read the news on the radio.",
    "The official religion, the currency, the president and the prime minister are listed in the table.",
    "This song was written by a famous composer and performed by an orchestra of one hundred musicians.",
    "The university is located in the capital and teaches mathematics, physics, chemistry and biology.",
    "Which language do people speak at home? Where was the author born? Who founded the team?",
    "The television series was first shown on a network owned by a group of investors.",
)


def _builtin_corpus() -> tuple[str, ...]:
    lines = []
    for country, capital, language, nationality in _COUNTRIES:
        lines += [
            f"The capital of {country} is {capital}.",
            f"{capital} is the capital city of {country}.",
            f"The official language of {country} is {language}.",
            f"People in {country} speak {language}, and {nationality} food is popular in {capital}.",
        ]
    for person, idx, profession in _PEOPLE:
        country, capital, language, nationality = _COUNTRIES[idx]
        lines += [
            f"The mother tongue of {person} is {language}.",
            f"{person} was a {nationality} {profession} born in {capital}.",
            f"{person} is a citizen of {country} and speaks {language}.",
        ]
    return tuple(lines) + _FILLER


@functools.lru_cache(maxsize=8)
def _trained_json(texts: tuple[str, ...], vocab_size: int) -> str:
    # The trained tokenizer is cached as JSON; each caller gets a fresh wrapper, so nobody mutates a shared object.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    logger.debug("trained tiny byte-level BPE: %d tokens from %d lines", tok.get_vocab_size(), len(texts))
    return tok.to_str()


def tiny_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = TINY_VOCAB_TARGET) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer trained in-process (no download), GPT-2 style.

    texts: training corpus (default: the built-in English corpus). vocab_size: BPE target (the built-in corpus gives
    about 750 tokens; a small corpus may stop earlier, `len(tokenizer)` is authoritative). Special tokens: pad id 0,
    bos id 1, eos id 2. Like GPT-2, no BOS is added by default. Training is cached per (texts, vocab_size).
    """
    corpus = _builtin_corpus() if texts is None else tuple(texts)
    tok = Tokenizer.from_str(_trained_json(corpus, vocab_size))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN,
                                   eos_token=EOS_TOKEN, model_max_length=TINY_MAX_POSITIONS)


def _token_ids(vocab_size: int | None) -> dict[str, int]:
    tok = tiny_tokenizer()
    return {
        "vocab_size": len(tok) if vocab_size is None else vocab_size,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }


def _seeded_build(cls, config, seed: int):
    # A private RNG stream: building a tiny model never perturbs the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.to(torch.float32).eval()


def tiny_gpt2(seed: int = 0, vocab_size: int | None = None, n_layer: int = 2, n_embd: int = 64,
              n_head: int = 4) -> GPT2LMHeadModel:
    """Tiny random GPT-2 (`Conv1D` MLP/attention, weights stored (d_in, d_out)), fp32, dropout 0, eval mode.

    vocab_size: default len(tiny_tokenizer()). MLP: c_fc n_embd -> 4·n_embd, c_proj 4·n_embd -> n_embd.
    """
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=TINY_MAX_POSITIONS,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_token_ids(vocab_size))
    return _seeded_build(GPT2LMHeadModel, config, seed)


def tiny_llama(seed: int = 0, hidden: int = 64, intermediate: int = 128, layers: int = 2,
               vocab_size: int | None = None, heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    """Tiny random LLaMA (`nn.Linear` everywhere, weights (d_out, d_in)), fp32, dropout 0, eval mode, GQA.

    vocab_size: default len(tiny_tokenizer()). MLP: gate_proj/up_proj hidden -> intermediate, down_proj back.
    Eager attention keeps the tiny model's numerics independent of SDPA backend choices.
    """
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=TINY_MAX_POSITIONS, attention_dropout=0.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, attn_implementation="eager", **_token_ids(vocab_size))
    return _seeded_build(LlamaForCausalLM, config, seed)


# Tiny sizes per model_type, on top of the shared token ids: hidden 64, 4 heads of 16 (2 KV heads where the family has
# grouped-query attention), MLP 128 (GPT-2 / GPT-J / GPT-NeoX: their usual 4 x hidden = 256), eager attention.
_DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "max_position_embeddings": TINY_MAX_POSITIONS}
TINY_CONFIGS: dict[str, dict] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "phi3": {k: v for k, v in _DECODER.items() if k != "head_dim"},
    "olmo": _DECODER,
    "olmo2": _DECODER,
    "gpt2": {"n_embd": 64, "n_head": 4, "n_positions": TINY_MAX_POSITIONS},
    "gptj": {"n_embd": 64, "n_head": 4, "rotary_dim": 8, "n_positions": TINY_MAX_POSITIONS},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4,
                 "max_position_embeddings": TINY_MAX_POSITIONS},
}
_LAYER_KEY = {"gpt2": "n_layer", "gptj": "n_layer"}  # the others: num_hidden_layers
_DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "embd_dropout")


def tiny_config(model_type: str, layers: int = 2, vocab_size: int | None = None):
    """The `transformers` config of a tiny `model_type` model (see TINY_CONFIGS), dropout 0, eager attention."""
    from transformers import AutoConfig

    if model_type not in TINY_CONFIGS:
        raise ValueError(f"no tiny config for model_type {model_type!r}; known: {sorted(TINY_CONFIGS)}")
    sizes = {**TINY_CONFIGS[model_type], _LAYER_KEY.get(model_type, "num_hidden_layers"): layers}
    config = AutoConfig.for_model(model_type, **sizes, **_token_ids(vocab_size))
    for key in _DROPOUTS:
        if hasattr(config, key):
            setattr(config, key, 0.0)
    config._attn_implementation = "eager"  # numerics independent of SDPA backend choices
    return config


def tiny_causal_lm(model_type: str, seed: int = 0, layers: int = 2, vocab_size: int | None = None):
    """A tiny random causal LM of any family in TINY_CONFIGS (AutoModelForCausalLM.from_config), fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return _seeded_build(AutoModelForCausalLM.from_config, tiny_config(model_type, layers, vocab_size), seed)
