"""Fluency of free generations (ROME's n-gram entropy): greedy generation from the records' generation prompts and
the weighted entropy of their bigrams and trigrams. Degenerate, repetitive output scores low.

`fluency(model, tokenizer, records)` generates with `generate_greedy` and scores with `ngram_entropy`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any
from typing import Callable
from typing import Iterable
from typing import Sequence

import torch

from emsedit_fast.data.schemas import EditRecord
from emsedit_fast.metrics import _model_device
from emsedit_fast.metrics import _progress

_WORD = re.compile(r"\w+|[^\w\s]")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def text_ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3),
                       tokenize: Callable[[str], list[str]] | None = None) -> float:
    """Weighted mean of the n-gram entropies of one text: sum_n w_n H_n / sum_n w_n, H_n = -sum_g p(g) log2 p(g)
    over the text's n-gram frequency distribution (0 when the text has fewer than n tokens). With the defaults this is
    ROME's (2/3 H_2 + 4/3 H_3) / 2. Tokens: words and punctuation marks, unless `tokenize` is given."""
    tokens = (tokenize or _words)(text)
    total = 0.0
    for n, w in zip(ns, weights):
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        count = sum(grams.values())
        entropy = -sum(c / count * math.log2(c / count) for c in grams.values()) if count else 0.0
        total += w * entropy
    return total / sum(weights)


def ngram_entropy(texts: Iterable[str], ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3),
                  tokenize: Callable[[str], list[str]] | None = None) -> float:
    """Fluency (ROME): `text_ngram_entropy` averaged over texts (NaN for no texts). Degenerate,
    repetitive generations score low."""
    scores = [text_ngram_entropy(t, ns, weights, tokenize) for t in texts]
    return sum(scores) / len(scores) if scores else float("nan")


def generation_prompts(records: Sequence[EditRecord]) -> list[str]:
    """The prompts fluency is measured on: each record's generation_prompts, or its edit prompt when it has none
    (flat CounterFact and zsRE records carry no generation prompts)."""
    return [p for r in records for p in (r.generation_prompts or (r.prompt,))]


def generate_greedy(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
                    batch_size: int = 16, device: torch.device | str | None = None,
                    progress: bool | None = None) -> list[str]:
    """Greedy (deterministic) generation: for each prompt, the prompt followed by up to `max_new_tokens` generated
    tokens, as text (ROME scores fluency on the whole text). Left-padded batches through `model.generate`, so each
    row's continuation starts right after its own last prompt token (padding with the pad token, or eos where the
    tokenizer has none). The model runs in eval mode under no_grad; its training flag is restored."""
    if max_new_tokens < 1:
        raise ValueError(f"generate_greedy: max_new_tokens must be >= 1, got {max_new_tokens}")
    device = torch.device(device) if device is not None else _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("generate_greedy: the tokenizer has neither a pad nor an eos token to pad prompts with")
    texts: list[str] = []
    was_training = model.training
    model.eval()
    n_batches = (len(prompts) + batch_size - 1) // batch_size
    try:
        with torch.no_grad(), _progress(n_batches, progress, "generate") as bar:
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start:start + batch_size])
                enc = _pad_left(tokenizer, chunk, pad_id)
                ids = model.generate(input_ids=enc["input_ids"].to(device),
                                     attention_mask=enc["attention_mask"].to(device), max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad_id)
                width = enc["input_ids"].shape[1]
                for prompt, row in zip(chunk, ids[:, width:]):
                    texts.append(prompt + tokenizer.decode(row, skip_special_tokens=True))
                bar.update(1)
    finally:
        model.train(was_training)
    return texts


def _pad_left(tokenizer: Any, prompts: list[str], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids and attention_mask (B, longest prompt), built by hand so that tokenizers without a pad
    token work too."""
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}


def fluency(model: torch.nn.Module, tokenizer: Any, records: Sequence[EditRecord], *, max_new_tokens: int = 64,
            batch_size: int = 16, device: torch.device | str | None = None,
            progress: bool | None = None) -> tuple[float, int]:
    """(ngram_entropy of the greedy generations from `generation_prompts(records)`, number of texts)."""
    prompts = generation_prompts(records)
    texts = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            device=device, progress=progress)
    return ngram_entropy(texts), len(texts)


# ---------------------------------------------------------------------------------------------------------------------
# Running a model over probe tuples
