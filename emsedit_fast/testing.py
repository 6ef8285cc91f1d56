"""Tolerances and comparison helpers shared by the tests and the benchmarks' correctness gates.

A check must fail for a wrong result whatever the magnitude of the outputs: a kernel that returns zeros, or hands
its input back unchanged, must not pass (tests/ops/test_gates.py shows it for every op). So the absolute part of
every tolerance scales with the expected result:

    |actual - expected| <= atol * s + rtol * |expected|    elementwise,
    s = max |expected|, or max |expected - before| when `before` (the input of an in-place op) is given

    fp64                    rtol 1e-7, atol 1e-7
    fp32, short reductions  rtol 1.3e-6, atol 1e-5 (torch's defaults, atol relative to s)
    fp32, long reductions   rtol 1e-5, atol 1e-4 (GEMMs with K >= 1024, solves)
    bf16, fp16, TF32 dots   the relative rule: the fast result may be at most twice as far from an fp64 oracle as the
                            same-dtype reference, plus a floor (bf16 1e-3, fp16 1e-4, fp32 1e-5)
Metrics (argmax based) must match exactly.
"""

from __future__ import annotations

import math

import torch

TOLERANCES = {
    (torch.float64, "elementwise"): (1e-7, 1e-7),
    (torch.float64, "reduction"): (1e-7, 1e-7),
    (torch.float32, "elementwise"): (1.3e-6, 1e-5),
    (torch.float32, "reduction"): (1e-5, 1e-4),
}
RELATIVE_RULE_FLOOR = {torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float32: 1e-5, torch.float64: 1e-12}


def _mismatch_report(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, label: str,
                     scale_note: str) -> str:
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    nan_mismatch = int((a.isnan() != e.isnan()).sum())
    inf_mismatch = int((a.isinf() != e.isinf()).sum())
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    bad = bad | (a.isnan() != e.isnan())
    n_bad = int(bad.sum())
    lines = [f"[{label}] {n_bad} of {a.numel()} elements mismatch (rtol={rtol:g}, atol={atol:.3g} = {scale_note}); "
             f"max abs diff {diff.nan_to_num(0).max().item() if diff.numel() else 0:.3e}; "
             f"NaN mismatches {nan_mismatch}, inf mismatches {inf_mismatch}"]
    if n_bad:
        flat = bad.flatten().nonzero().squeeze(1)[:5]
        for i in flat.tolist():
            pos = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), a.shape))
            lines.append(f"  at {pos}: actual {a.flatten()[i].item():.8g}, expected {e.flatten()[i].item():.8g}")
    return "\n".join(lines)


def reference_scale(expected: torch.Tensor, before: torch.Tensor | None = None) -> float:
    """s of the rule above: max |expected| (or max |expected - before|), 0.0 for an empty or all-zero tensor."""
    e = expected.detach().double().cpu()
    if before is not None:
        e = e - before.detach().double().cpu()
    finite = e[torch.isfinite(e)]
    return finite.abs().max().item() if finite.numel() else 0.0


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, *, kind: str = "elementwise",
                              label: str = "", dtype: torch.dtype | None = None,
                              before: torch.Tensor | None = None) -> None:
    """Compare with the table above for fp32/fp64 (kind: 'elementwise' or 'reduction').

    before: the input an in-place op started from; the absolute tolerance then scales with the expected change, so a
    kernel that leaves its input unchanged fails even when the change is small next to the input. Where the
    expected result (or change) is exactly zero everywhere, atol is absolute.
    """
    dtype = dtype or expected.dtype
    if (dtype, kind) not in TOLERANCES:
        raise ValueError(f"no fixed tolerance for {dtype}/{kind}: use assert_relative_rule")
    assert actual.shape == expected.shape, f"[{label}] shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol, atol = TOLERANCES[(dtype, kind)]
    scale = reference_scale(expected, before)
    what = "expected change" if before is not None else "expected output"
    if scale > 0:
        atol, note = atol * scale, f"{atol:g} x max |{what}| {scale:.3g}"
    else:
        note = f"absolute: the {what} is all zeros"
    ok = torch.allclose(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=rtol, atol=atol,
                        equal_nan=True)
    assert ok, _mismatch_report(actual, expected, rtol, atol, label, note)


def assert_relative_rule(fast: torch.Tensor, ref_same_dtype: torch.Tensor, oracle: torch.Tensor, *,
                         dtype: torch.dtype, label: str = "") -> None:
    """|fast - oracle|_max <= 2 |ref - oracle|_max + floor(dtype): the fast path at most twice the reference's error."""
    assert fast.shape == oracle.shape, f"[{label}] shape {tuple(fast.shape)} != {tuple(oracle.shape)}"
    o = oracle.detach().double().cpu()
    err_fast = (fast.detach().double().cpu() - o).abs().max().item() if o.numel() else 0.0
    err_ref = (ref_same_dtype.detach().double().cpu() - o).abs().max().item() if o.numel() else 0.0
    floor = RELATIVE_RULE_FLOOR[dtype]
    assert err_fast <= 2 * err_ref + floor, f"[{label}] {err_fast:.3e} > 2 x {err_ref:.3e} + {floor:g}"


def assert_ulp_close(actual: torch.Tensor, expected: torch.Tensor, *, ulps: int = 1, label: str = "") -> None:
    """Low-precision results within `ulps` units in the last place of their own dtype (bit-pattern distance)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, f"[{label}] dtype/shape mismatch"
    int_dtype = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[actual.dtype]
    a = actual.detach().cpu().contiguous().view(int_dtype).long()
    e = expected.detach().cpu().contiguous().view(int_dtype).long()
    # map sign-magnitude bit patterns onto a monotone integer line
    top = 1 << (8 * actual.element_size() - 1)
    a = torch.where(a < 0, -(a + top), a)
    e = torch.where(e < 0, -(e + top), e)
    dist = (a - e).abs()
    worst = int(dist.max()) if dist.numel() else 0
    n_bad = int((dist > ulps).sum())
    assert worst <= ulps, f"[{label}] {n_bad} elements differ by more than {ulps} ulp (worst {worst})"


# ----------------------------------------------------------------------------------------------------------------------
# Input factories: one place that builds realistic random inputs for tests and benchmarks.


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
          scale: float = 1.0) -> torch.Tensor:
    """Standard normal values (times scale), generated on the CPU for reproducibility across devices."""
    return (torch.randn(*shape, generator=generator(seed), dtype=torch.float32) * scale).to(dtype=dtype, device=device)


def layer_index(n_layers: int, n_rows_per_layer: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """idx (L * n,) int64 with rows grouped by layer: 0 0 ... 1 1 ... (the order the editors stack rows in)."""
    return torch.arange(n_layers, device=device).repeat_interleave(n_rows_per_layer)


def hypernet_params(d: int, rank: int, n_layers: int, *, seed: int, trained: bool = True,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A, B, c, s, t of one block; trained=True gives nonzero B, c and non-trivial s, t (so the block is not identity).

    Magnitudes keep z A B + c of order one for unit-variance z, with a mix of signs (so the ReLU mask matters).
    """
    a = randn(d, rank, seed=seed, device=device)
    if trained:
        b = randn(rank, d, seed=seed + 1, device=device, scale=1.0 / (d * rank) ** 0.5)
        c = randn(d, seed=seed + 2, device=device, scale=0.1)
        s = 1.0 + randn(n_layers, d, seed=seed + 3, device=device, scale=0.2)
        t = randn(n_layers, d, seed=seed + 4, device=device, scale=0.1)
    else:
        b = torch.zeros(rank, d, device=device)
        c = torch.zeros(d, device=device)
        s = torch.ones(n_layers, d, device=device)
        t = torch.zeros(n_layers, d, device=device)
    return {"a": a, "b": b, "c": c, "s": s, "t": t}


def backend_params():
    """pytest parameters for the compiled backends: C++ in the default tier, Triton in the interpreter/CUDA tier."""
    import pytest

    return [pytest.param("cpp", id="cpp"), pytest.param("triton", id="triton", marks=pytest.mark.interpret)]


def device_for(backend: str) -> str:
    """Where a backend's tests run: CUDA when present (and the backend supports it), else the CPU."""
    if torch.cuda.is_available() and backend == "triton":
        return "cuda"
    return "cpu"


def require_backend(backend: str, device: str) -> None:
    """Skip the calling test, with the backend's own reasons, when it cannot run here."""
    import pytest

    from emsedit_fast.ops._dispatch import availability

    why = availability(device).get(backend)
    if why is not None:
        pytest.skip(f"{backend} unavailable on {device}: {why}")


# ----------------------------------------------------------------------------------------------------------------------
# Whole-call input factories (shared by benchmarks/ and any test that needs realistic op inputs).
#
# Magnitudes follow what the editors see: keys are unit-scale activations, value-gradients are small (1e-3),
# weights are initialised like an LLM's (std 0.02), low-rank factors and targets are small, so updates change W by a
# fraction of an ulp-to-percent, as real edits do. Values are drawn from a seeded CPU generator (same values on every
# device) and filled in place, so a large weight costs one allocation; only tensors of DEVICE_SAMPLING_MIN elements or
# more bound for a CUDA device are drawn there (benchmark inputs at LLaMA-3 shapes, 700 M values per edited group,
# took seconds of single-threaded CPU sampling per case), which no test input reaches.
DEVICE_SAMPLING_MIN = 1 << 24


def _filled(shape: tuple[int, ...], *, seed: int, scale: float, dtype: torch.dtype,
            device: str | torch.device) -> torch.Tensor:
    device = torch.device(device)
    where = device if device.type == "cuda" and math.prod(shape) >= DEVICE_SAMPLING_MIN else torch.device("cpu")
    gen = torch.Generator(device=where)
    gen.manual_seed(seed)
    t = torch.empty(shape, dtype=torch.float32, device=where).normal_(generator=gen)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(dtype=dtype, device=device)


def edit_rows(n_rows: int, d_in: int, d_out: int, *, seed: int, device: str | torch.device = "cpu",
              grad_scale: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Captured rows of one shape group: keys U (n_rows, d_in) ~ N(0, 1) and value-grads (n_rows, d_out), fp32."""
    keys = _filled((n_rows, d_in), seed=seed, scale=1.0, dtype=torch.float32, device=device)
    grads = _filled((n_rows, d_out), seed=seed + 1, scale=grad_scale, dtype=torch.float32, device=device)
    return keys, grads


def running_stats_state(d: int, *, seed: int, count: float = 128.0,
                        device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A consistent normaliser state after `count` rows: count (1,) f64; mean, var, std (D,) fp32 with
    std = sqrt(var * count / (count - 1))."""
    mean = _filled((d,), seed=seed, scale=0.1, dtype=torch.float32, device=device)
    var = (1.0 + _filled((d,), seed=seed + 1, scale=0.2, dtype=torch.float32, device=device)).square()
    std = (var * (count / (count - 1.0))).sqrt()
    return {"count": torch.full((1,), float(count), dtype=torch.float64, device=device), "mean": mean, "var": var,
            "std": std}


def layer_weights(n_layers: int, d_in: int, d_out: int, *, seed: int, dtype: torch.dtype = torch.float32,
                  transposed: bool = False, device: str | torch.device = "cpu",
                  scale: float = 0.02) -> list[torch.Tensor]:
    """n_layers edited weights in storage layout: (d_out, d_in) (nn.Linear) or (d_in, d_out) (transposed, Conv1D)."""
    shape = (d_in, d_out) if transposed else (d_out, d_in)
    return [_filled(shape, seed=seed + 7 * i, scale=scale, dtype=dtype, device=device) for i in range(n_layers)]


def low_rank_factors(n_layers: int, n_rows: int, d_in: int, d_out: int, *, seed: int,
                     device: str | torch.device = "cpu",
                     coeff_scale: float = 1e-3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Factors of dW_l = M_l^T K_l: coeffs M_l (n_rows, d_out) (small) and keys K_l (n_rows, d_in) ~ N(0, 1), fp32."""
    coeffs = [_filled((n_rows, d_out), seed=seed + 5 * i, scale=coeff_scale, dtype=torch.float32, device=device)
              for i in range(n_layers)]
    keys = [_filled((n_rows, d_in), seed=seed + 5 * i + 1, scale=1.0, dtype=torch.float32, device=device)
            for i in range(n_layers)]
    return coeffs, keys


def ridge_problem(n_layers: int, n_rows: int, d_in: int, d_out: int, *, seed: int,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched ridge inputs: keys (L, n, d_in) ~ N(0, 1), targets (L, n, d_out) (small), log_ridge (L,) near 0."""
    keys = _filled((n_layers, n_rows, d_in), seed=seed, scale=1.0, dtype=torch.float32, device=device)
    targets = _filled((n_layers, n_rows, d_out), seed=seed + 1, scale=1e-3, dtype=torch.float32, device=device)
    log_ridge = _filled((n_layers,), seed=seed + 2, scale=0.1, dtype=torch.float32, device=device)
    return keys, targets, log_ridge


def hypernet_blocks(d: int, rank: int, n_layers: int, n_blocks: int, *, seed: int,
                    device: str | torch.device = "cpu") -> list[dict[str, torch.Tensor]]:
    """Parameters of n_blocks trained-like blocks (see `hypernet_params`), one dict per block."""
    return [hypernet_params(d, rank, n_layers, seed=seed + 10 * i, trained=True, device=device)
            for i in range(n_blocks)]


def assert_matches_central_differences(loss, x0: torch.Tensor, analytic: torch.Tensor, *, h: float = 1e-4,
                                       rtol: float = 2e-3) -> None:
    """Every entry of `analytic` (dL/dx at x0) within rtol * max(1, |fd|) of the central difference
    (loss(x0 + h e_i) - loss(x0 - h e_i)) / 2h, for a scalar-valued `loss` of a 1-D tensor x."""
    for i in range(len(x0)):
        bump = torch.zeros_like(x0)
        bump[i] = h
        fd = (loss(x0 + bump) - loss(x0 - bump)) / (2 * h)
        assert abs(fd - analytic[i].item()) <= rtol * max(1.0, abs(fd)), (i, fd, analytic.tolist())
