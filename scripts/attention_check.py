"""Eager attention against PyTorch's SDPA kernel, the choice `model.attention auto` makes for a bf16 / fp16 model on
the CPU (emsedit_fast.models.adapter.set_attention). Prints two tables:

1. Time of one attention's forward + backward (what every capture and meta-loss pass runs) through the two functions
   a LLaMA layer calls, transformers' SDPA and eager attention (matmul, fp32 softmax, matmul), at SmolLM2's heads
   (9 query and 3 key/value heads of 64) and edit-batch shapes, in bf16 and fp32; the best of --rounds.
2. How close the bf16 model's next-token distributions are to the fp32 model's with each attention, on the edit
   prompts + new answers of a records file's validation split: mean KL(fp32 || bf16) and top-1 agreement over the
   prompts' tokens.

    python scripts/attention_check.py --data ../shared/data/zsre/zsre-train-800.json --threads 2
"""

from __future__ import annotations

import argparse
import time


def attention_pair(dtype, batch: int, tokens: int, heads: int = 9, kv_heads: int = 3, head_dim: int = 64):
    """(sdpa, eager, (q, k, v)): the two attention functions a Hugging Face LLaMA layer calls, transformers' own
    `sdpa_attention_forward` and `eager_attention_forward` (scores, fp32 softmax, weighted sum), over fixed random q
    (heads) and k, v (kv_heads, SmolLM2's grouped layout) that require grad, each with the causal mask the model
    builds for it (boolean for SDPA, additive for eager). Both return (batch, tokens, heads, head_dim)."""
    import types

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, n, tokens, head_dim, generator=gen).to(dtype).requires_grad_()
               for n in (heads, kv_heads, kv_heads))
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril().expand(batch, 1, tokens, tokens)
    additive = torch.zeros(batch, 1, tokens, tokens, dtype=dtype).masked_fill(~causal, torch.finfo(dtype).min)
    layer = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False, is_causal=True)
    scale = head_dim ** -0.5

    def sdpa():
        return sdpa_attention_forward(layer, q, k, v, causal, scaling=scale)[0]

    def eager():
        return eager_attention_forward(layer, q, k, v, additive, scaling=scale)[0]

    return sdpa, eager, (q, k, v)


def attention_timing(dtype, batch: int, tokens: int, rounds: int) -> dict:
    """{"sdpa": s, "eager": s}: the best of `rounds` of forward + backward of one causal attention."""
    out = {}
    for name, fn in zip(("sdpa", "eager"), attention_pair(dtype, batch, tokens)[:2]):
        best = float("inf")
        for r in range(rounds + 2):  # two warm-up calls
            t0 = time.perf_counter()
            fn().float().square().sum().backward()
            if r >= 2:
                best = min(best, time.perf_counter() - t0)
        out[name] = best
    return out


def closeness(data: str, n_records: int) -> dict:
    """{attention: (mean KL(fp32 || bf16) per token, top-1 agreement)} on prompt + answer of validation records."""
    import torch

    from emsedit_fast.data.splits import load_split
    from emsedit_fast.models.adapter import set_attention
    from emsedit_fast.models.smollm2 import load_model

    records = load_split(data, "valid")[:n_records]
    reference, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    model, _ = load_model("smollm2-135m", dtype=torch.bfloat16)
    tokenizer.padding_side = "left"
    enc = tokenizer([f"{r.prompt} {r.target_new}" for r in records], return_tensors="pt", padding=True)
    real = enc["attention_mask"].bool()
    out = {}
    with torch.no_grad():
        ref = reference(**enc).logits[real].float().log_softmax(-1)
        for attention in ("sdpa", "eager"):
            set_attention(model, attention)
            got = model(**enc).logits[real].float().log_softmax(-1)
            kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
            out[attention] = (kl, (got.argmax(-1) == ref.argmax(-1)).float().mean().item())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a records file (its validation split's prompts; default: the bundled facts)",
                        default="bundled")
    parser.add_argument("--records", type=int, default=60, help="validation records scored in table 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"forward + backward of one attention (9 query, 3 key/value heads of 64), best of {args.rounds}, "
          f"{args.threads} threads")
    print("| dtype | prompts x tokens | SDPA | eager | SDPA / eager |\n|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for batch, tokens in ((10, 17), (20, 30), (10, 60)):
            t = attention_timing(dtype, batch, tokens, args.rounds)
            print(f"| {str(dtype).removeprefix('torch.')} | {batch} x {tokens} | {t['sdpa'] * 1e3:.2f} ms | "
                  f"{t['eager'] * 1e3:.2f} ms | {t['sdpa'] / t['eager']:.2f}x |")
    print(f"\nbf16 SmolLM2 against fp32 SmolLM2 on {args.records} validation prompts of {args.data}")
    print("| attention | KL(fp32 || bf16) per token | top-1 agreement |\n|---|---|---|")
    for attention, (kl, agree) in closeness(args.data, args.records).items():
        print(f"| {attention} | {kl:.5f} | {agree:.4f} |")


if __name__ == "__main__":
    main()
