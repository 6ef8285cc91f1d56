"""Property-based reliability checks (hypothesis; the `ci` profile of tests/conftest.py: 50 derandomized examples).

* Loaders on random and malformed input (any JSON value, random record-like objects, random bytes, truncated or
  corrupted files): either records or a DataError, never another exception, and every object of the file is
  accounted for (records + skipped + dropped = objects read).
* Ops on random shapes and extreme values (zeros, 1e-30, 1e30, denormals, values near the fp32 range): the C++
  backend and the reference are both checked against the same computation in fp64. Where the exact result is
  representable and no intermediate can overflow, both are finite and within the rounding bound; where the exact
  result overflows fp32, both are non-finite (so the editor refuses it instead of applying a wrong finite value);
  in between, each is non-finite or accurate. A backend that cannot solve a system raises, which the editor turns
  into a refusal.
* Random interleavings of edits and reverts on a tiny model (fp32 and bf16): reverting the last edit gives back the
  exact pre-edit bits, the weights always equal W0 + the remaining edits' recorded factors replayed in order (what a
  journal materialises), and reverting everything returns the original weights bit for bit.
"""

import json
import tempfile

import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from emsedit_fast import api
from emsedit_fast import ops
from emsedit_fast import reference
from emsedit_fast.config import load
from emsedit_fast.data.edit_batch import tokenize_batch
from emsedit_fast.data.facts import bundled_facts
from emsedit_fast.data.schemas import FORMATS
from emsedit_fast.data.schemas import PLAIN_KEYS
from emsedit_fast.data.schemas import DataError
from emsedit_fast.data.schemas import load_records
from emsedit_fast.editfiles import weights_by_name
from emsedit_fast.journal import Journal
from emsedit_fast.updates import apply_edit_

FIXTURES = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ----------------------------------------------------------------------------------------------------------------------
# loaders


@pytest.fixture(scope="module")
def file(tmp_path_factory):
    """One scratch file the loader examples overwrite."""
    return str(tmp_path_factory.mktemp("loaders") / "records.json")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=10)

FIELD_NAMES = sorted(set(PLAIN_KEYS) | {
    "rephrase_prompt", "locality_prompt", "locality_ground_truth",  # CounterFact (flat)
    "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",  # CounterFact (ROME)
    "src", "alt", "answers", "rephrase", "loc", "loc_ans",  # zsRE
    "prompt ", "Target_new", "extra"})  # near misses
texts = st.sampled_from(["", "   ", "Paris", " Paris", "The capital of France is", "{} is in", "x" * 30]) | \
    st.text(max_size=10)
field_values = st.one_of(
    texts, st.lists(texts, max_size=3), st.none(), st.integers(-3, 3), st.booleans(),
    st.fixed_dictionaries({"prompt": texts, "subject": texts, "target_new": st.fixed_dictionaries({"str": texts}),
                           "target_true": st.fixed_dictionaries({"str": texts})}),
    st.dictionaries(st.sampled_from(["str", "prompt"]), texts, max_size=2))
record_like = st.dictionaries(st.sampled_from(FIELD_NAMES), field_values, max_size=8)


def _load_all_ways(path):
    """load_records with every format and both strictness modes: records or DataError, and nothing unaccounted."""
    for fmt in ("auto",) + FORMATS:
        for skip in (False, True):
            try:
                result = load_records(path, fmt, skip_invalid=skip)
            except DataError as err:
                assert str(err) and "\n" not in str(err).strip()
                continue
            assert result.n_read == len(result.records) + len(result.skipped) + len(result.dropped)
            assert skip or not result.skipped
            ids = [r.case_id for r in result.records]
            assert len(ids) == len(set(ids))
            for _, reason in result.skipped + result.dropped:
                assert path in reason


@FIXTURES
@given(value=json_values)
def test_loaders_on_any_json_value(file, value):
    with open(file, "w") as f:
        json.dump(value, f)
    _load_all_ways(file)


@FIXTURES
@given(objects=st.lists(record_like, max_size=5), lines=st.booleans())
def test_loaders_on_random_record_like_objects(file, objects, lines):
    with open(file, "w") as f:
        if lines:
            f.write("".join(json.dumps(o) + "\n" for o in objects))
        else:
            json.dump(objects, f)
    _load_all_ways(file)


GOOD = [r.to_dict() for r in bundled_facts("eval")[:3]]


@FIXTURES
@given(data=st.binary(max_size=300) | st.builds(lambda cut, lines: _good_text(lines)[:cut], st.integers(0, 2000),
                                                  st.booleans()),
       flips=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=3))
def test_loaders_on_random_and_damaged_bytes(file, data, flips):
    data = bytearray(data if isinstance(data, bytes) else data.encode())
    for pos, byte in flips:
        if data:
            data[pos % len(data)] = byte
    with open(file, "wb") as f:
        f.write(bytes(data))
    _load_all_ways(file)


def _good_text(lines: bool) -> str:
    return "".join(json.dumps(g) + "\n" for g in GOOD) if lines else json.dumps(GOOD)


# ----------------------------------------------------------------------------------------------------------------------
# ops: the C++ backend and the reference against fp64

EPS32 = 2.0 ** -23
FP32_MAX = torch.finfo(torch.float32).max
SAFE = 1e36  # magnitude of |terms| below which no fp32 intermediate can overflow in these tiny shapes
TINY_ABS = 1e-36  # below the normal range: a flushed denormal is within this
UNDERFLOW = 2.0 ** -126  # smallest normal fp32: an intermediate below it loses up to this much, absolutely
EXTREMES = [0.0, -0.0, 1e-30, -1e-30, 1e30, -1e30, 1e-40, -1e-40, 1e-45, 3e38, -3e38, 1.0]


@st.composite
def tensors(draw, shape):
    """fp32 tensor of `shape`: seeded normals at one of several scales, with a few entries set to extreme values."""
    scale = draw(st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e3, 1e30]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.randn(shape, generator=gen) * scale
    for _ in range(draw(st.integers(0, 3))):
        t.view(-1)[draw(st.integers(0, max(t.numel() - 1, 0)))] = draw(st.sampled_from(EXTREMES))
    return t


def check_against_exact(name, got, exact, scale, tol, dtype_eps=0.0, dtype_max=FP32_MAX, floor=0.0, risky=None):
    """Each entry of `got` (a backend's output) against the fp64 computation `exact`, where `scale` bounds the
    magnitude of every term that went into it (so the rounding error is at most tol * scale) and `floor` bounds what
    intermediates below the normal range (underflow, flushed denormals) can lose, after later factors scale it.
    risky: entries with an intermediate that can overflow although `scale` is small (e.g. a huge dot product times
    eta = 0)."""
    got64 = got.double()
    finite = torch.isfinite(got64)
    bound = tol * scale + dtype_eps * exact.abs() + floor + TINY_ABS
    accurate = finite & ((got64 - exact).abs() <= bound)
    overflow = exact.abs() > dtype_max * (1 + 4 * dtype_eps + 1e-6)  # the correct rounded result is +-inf
    safe = (scale < SAFE) & ~overflow & (~risky if risky is not None else True)
    problems = {
        "finite where the exact result overflows": overflow & finite,
        "not finite and accurate where nothing can overflow": safe & ~accurate,
        "finite but inaccurate": ~overflow & finite & ~accurate,
    }
    for what, mask in problems.items():
        if mask.any():
            i = mask.nonzero()[0].tolist()
            pytest.fail(f"{name}: {what} at {i}: got {got64[tuple(i)].item()!r}, exact {exact[tuple(i)].item()!r}, "
                        f"scale {scale[tuple(i)].item()!r}")


@given(data=st.data(), n=st.integers(1, 6), d_in=st.integers(1, 6), d_out=st.integers(1, 5), layers=st.integers(1, 3))
def test_value_targets_backends_vs_exact(data, n, d_in, d_out, layers):
    keys = data.draw(tensors((n, d_in)))
    z = data.draw(tensors((n, d_in + d_out)))
    eta = data.draw(tensors((layers,)))
    idx = torch.tensor([data.draw(st.integers(0, layers - 1)) for _ in range(n)], dtype=torch.int64)
    exact_t, exact_c = reference.value_targets(keys.double(), z.double(), eta.double(), idx)
    scale_t, scale_c = reference.value_targets(keys.double().abs(), z.double().abs(), eta.double().abs(), idx)
    tol = (d_in + 4) * EPS32
    floor_c = (d_in + 2) * UNDERFLOW * eta.double().abs()[idx] + UNDERFLOW  # the dot's terms, eta * dot may underflow
    floor_t = floor_c[:, None] * z[:, d_in:].double().abs() + UNDERFLOW
    risky_c = (keys.double().abs() * z[:, :d_in].double().abs()).sum(1) >= SAFE  # the dot product itself
    for backend in ("reference", "cpp"):
        targets, coeffs = ops.value_targets(keys, z, eta, idx, backend=backend)
        check_against_exact(f"{backend} coeffs", coeffs, exact_c, scale_c.abs(), tol, floor=floor_c, risky=risky_c)
        check_against_exact(f"{backend} targets", targets, exact_t, scale_t.abs(), tol, floor=floor_t,
                            risky=(risky_c | (scale_c.abs() >= SAFE))[:, None])  # the coefficient itself


@given(data=st.data(), n=st.integers(1, 5), d_in=st.integers(1, 5), d_out=st.integers(1, 5), layers=st.integers(1, 3),
       transposed=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_apply_deltas_backends_vs_exact(data, n, d_in, d_out, layers, transposed, dtype):
    shape = (d_in, d_out) if transposed else (d_out, d_in)
    weights = [data.draw(tensors(shape)).to(dtype) for _ in range(layers)]
    coeffs = [data.draw(tensors((n, d_out))) for _ in range(layers)]
    keys = [data.draw(tensors((n, d_in))) for _ in range(layers)]
    eps = torch.finfo(dtype).eps / 2  # unit roundoff of the final rounding into the weights' dtype
    results = {}
    for backend in ("reference", "cpp"):
        ws = [w.clone() for w in weights]
        ops.apply_deltas_(ws, coeffs, keys, None, transposed, backend=backend)
        results[backend] = ws
    for layer in range(layers):
        delta = keys[layer].double().t() @ coeffs[layer].double()  # (d_in, d_out)
        delta_scale = keys[layer].double().abs().t() @ coeffs[layer].double().abs()
        if not transposed:
            delta, delta_scale = delta.t(), delta_scale.t()
        w = weights[layer].double()
        exact, scale = w + delta, w.abs() + delta_scale
        for backend, ws in results.items():
            check_against_exact(f"{backend} layer {layer}", ws[layer], exact, scale, (n + 2) * EPS32, eps,
                                torch.finfo(dtype).max, floor=(n + 2) * UNDERFLOW)


@given(data=st.data(), n=st.integers(1, 6), d_in=st.integers(1, 4), d_out=st.integers(1, 4))
def test_running_stats_normalize_backends_vs_exact(data, n, d_in, d_out):
    keys = data.draw(tensors((n, d_in)))
    grads = data.draw(tensors((n, d_out)))
    mean = data.draw(tensors((d_in + d_out,)))
    std = data.draw(tensors((d_in + d_out,))).abs()
    eps = 2.0 ** -23
    rows = torch.cat([keys, grads], 1).double()
    denom = std.double() + eps
    exact = (rows - mean.double()) / denom
    scale = (rows.abs() + mean.double().abs()) / denom
    for backend in ("reference", "cpp"):
        z = ops.running_stats_normalize(keys, grads, mean, std, eps, backend=backend)
        check_against_exact(backend, z, exact, scale, 4 * EPS32, floor=2 * UNDERFLOW / denom,
                            risky=(rows.abs() + mean.double().abs()) >= SAFE)  # x - mean itself


@given(data=st.data(), n=st.integers(1, 6), d=st.integers(2, 8), rank=st.integers(1, 4), layers=st.integers(1, 3),
       relu_first=st.booleans())
def test_hypernet_block_backends_vs_exact(data, n, d, rank, layers, relu_first):
    z, a, b, c = (data.draw(tensors(shape)) for shape in ((n, d), (d, rank), (rank, d), (d,)))
    s, t = data.draw(tensors((layers, d))), data.draw(tensors((layers, d)))
    idx = torch.tensor([data.draw(st.integers(0, layers - 1)) for _ in range(n)], dtype=torch.int64)
    f64 = [x.double() for x in (z, a, b, c, s, t)]
    exact = reference.hypernet_block(*f64, idx, relu_first)
    za_scale = f64[0].abs() @ f64[1].abs()  # (n, rank), an intermediate
    p_scale = za_scale @ f64[2].abs() + f64[3].abs()
    s_rows, t_rows = f64[4].abs()[idx], f64[5].abs()[idx]
    scale = f64[0].abs() + s_rows * p_scale + t_rows
    risky = (za_scale.amax(1, keepdim=True) >= SAFE) | (p_scale >= SAFE) | (s_rows * p_scale >= SAFE)
    floor = (1 + s_rows) * (d * UNDERFLOW * f64[2].abs().sum(0) + (rank + 3) * UNDERFLOW)
    for backend in ("reference", "cpp"):
        out = ops.hypernet_block(z, a, b, c, s, t, idx, relu_first=relu_first, backend=backend)
        check_against_exact(backend, out, exact, scale, (d + rank + 6) * EPS32, floor=floor, risky=risky)


@given(data=st.data(), n=st.integers(1, 5), d_in=st.integers(1, 5), d_out=st.integers(1, 4), layers=st.integers(1, 2),
       form=st.sampled_from(["dual", "primal"]))
def test_ridge_solve_backends_are_accurate_or_refused(data, n, d_in, d_out, layers, form):
    """A solution that comes back finite is within the fp32 forward-error bound of the exact (fp64) solution:
    eps * cond * |x|, with the condition number taken against the magnitudes the system is formed from (so cancellation
    in forming K K^T counts). Where an fp32 intermediate can overflow, a backend may instead return non-finite
    values or raise (both refused by the editor), or lose the update (an inf Gram matrix solves to zeros), but never
    return a finite solution larger than the exact one."""
    keys = data.draw(tensors((layers, n, d_in)))
    targets = data.draw(tensors((layers, n, d_out)))
    log_ridge = torch.tensor([data.draw(st.floats(-3, 3)) for _ in range(layers)], dtype=torch.float32)
    k, v, beta = keys.double(), targets.double(), log_ridge.double().exp()
    if form == "dual":
        eye = torch.eye(n, dtype=torch.float64)
        system, sys_scale = k @ k.transpose(1, 2), k.abs() @ k.abs().transpose(1, 2)
        rhs, rhs_scale, size = v, v.abs(), n
    else:
        eye = torch.eye(d_in, dtype=torch.float64)
        system, sys_scale = k.transpose(1, 2) @ k, k.abs().transpose(1, 2) @ k.abs()
        rhs, rhs_scale, size = k.transpose(1, 2) @ v, k.abs().transpose(1, 2) @ v.abs(), d_in
    system = system + beta[:, None, None] * eye
    sys_scale = sys_scale + beta[:, None, None] * eye
    exact, info = torch.linalg.solve_ex(system, rhs)
    known = (info == 0) & torch.isfinite(exact).flatten(1).all(1)  # fp64 itself may find 1e60 + 1 singular
    representable = bool((sys_scale.amax() < SAFE) and (rhs_scale.amax() < SAFE))
    for backend in ("reference", "cpp"):
        try:
            x = ops.ridge_solve(keys, targets, log_ridge, form, backend=backend)
        except RuntimeError:
            assert not representable, f"{backend} raised on a system whose fp32 intermediates cannot overflow"
            continue
        x64 = x.double()
        for layer in range(layers):
            if not torch.isfinite(x64[layer]).all():
                assert not representable, f"{backend}: non-finite solution where nothing can overflow"
                continue
            if not known[layer]:
                continue
            inv = torch.linalg.inv(system[layer])
            inv_norm = torch.linalg.matrix_norm(inv, 2)
            cond = float(inv_norm * torch.linalg.matrix_norm(sys_scale[layer], 2))
            x_norm = float(exact[layer].norm())
            # first-order bound: forming the system and the right-hand side, the solve itself, x's rounding to fp32
            # (absolute 2^-126 per entry below the normal range), each with a generous constant
            allowed = 64 * (size + d_in + n) * EPS32 * (cond * x_norm + float(inv_norm * rhs_scale[layer].norm())) \
                + 8 * size * d_out * UNDERFLOW * (1 + cond)
            error = float((x64[layer] - exact[layer]).norm())
            if not representable:
                # an fp32 Gram matrix that overflowed to inf can solve to zeros (both backends: the C++ fp64 retry
                # only triggers on a failed pivot or a non-finite solution), losing the update; it must never come
                # out larger than the exact one
                got = float(x64[layer].norm())
                assert got <= x_norm + allowed + TINY_ABS, f"{backend} layer {layer}: |x| {got:.3g} > {x_norm:.3g}"
                continue
            assert error <= allowed + TINY_ABS, (f"{backend} layer {layer}: |x - exact| = {error:.3g} above the bound "
                                                 f"{allowed:.3g} (cond {cond:.3g}, |x| {x_norm:.3g})")


# ----------------------------------------------------------------------------------------------------------------------
# edit / revert sequences on a tiny model

N_POOL = 5


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def tiny(request, tmp_path_factory):
    cfg = load("emsedit", mode="sequential", overrides=["model.name=tiny-llama", "model.device=cpu", "editor.rank=8",
                                                        "editor.eta_init=1e-3", f"model.dtype={request.param}",
                                                        "model.edited_dtype=model"])
    session = api.open_session(cfg)
    records = bundled_facts("eval")
    pool = [tokenize_batch(session.tokenizer, records[i:i + 1], need_equiv=False).edit for i in range(N_POOL)]
    editor = session.editor
    return {"session": session, "pool": pool, "w0": [w.clone() for w in editor.weights()],
            "state0": {k: v.clone() for k, v in editor.state_dict().items()}, "root": tmp_path_factory.mktemp("seq")}


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _same(a, b):
    return all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b, strict=True))


steps = st.lists(st.tuples(st.sampled_from(["edit", "edit", "revert"]), st.integers(0, 50)), min_size=1, max_size=5)


@FIXTURES
@given(program=steps, final_order=st.randoms(use_true_random=False))
def test_edit_revert_sequences_return_the_original_bits(tiny, program, final_order):
    session, pool = tiny["session"], tiny["pool"]
    editor = session.editor
    editor.reset()
    editor.load_state_dict(tiny["state0"])
    base = {m.name: w.clone() for m, w in zip(editor.modules_, tiny["w0"])}
    live, factors, before = [], {}, {}
    try:
        for op, i in program:
            if op == "edit" or not live:
                snapshot = [w.clone() for w in editor.weights()]
                entry = editor.edit(pool[i % N_POOL])
                live.append(entry.edit_id)
                factors[entry.edit_id] = entry.cpu()
                before[entry.edit_id] = snapshot
            else:
                edit_id = live[i % len(live)]
                was_last = edit_id == live[-1]
                editor.revert(edit_id)
                live.remove(edit_id)
                if was_last and edit_id in before:  # the documented bit-exact undo of the last edit
                    assert _same(editor.weights(), before[edit_id])
                elif not was_last:  # an earlier edit left: the bytes before each later edit never existed as such
                    before.clear()
            # always what a journal materialises: W0 + the remaining edits' recorded factors, in order
            replay = {n: w.clone() for n, w in base.items()}
            for edit_id in live:
                apply_edit_(replay, factors[edit_id])
            assert _same(editor.weights(), [replay[m.name] for m in editor.modules_])
        for edit_id in final_order.sample(live, len(live)):
            editor.revert(edit_id)
        assert _same(editor.weights(), tiny["w0"]) and not editor.history
    finally:
        editor.reset()
        editor.load_state_dict(tiny["state0"])


@settings(FIXTURES, max_examples=max(1, settings.default.max_examples // 5))
@given(program=steps)
def test_journal_sequences_materialise_the_live_weights(tiny, program):
    """The same through a real journal folder (files, sha256, replay on the recorded backend): after every edit or
    revert, rebuilding a fresh copy of the base weights from the journal equals the live weights bit for bit, and
    reverting everything in the journal gives back W0. (A fifth of the profile's examples: every step writes and
    fsyncs files.)"""
    from emsedit_fast.editfiles import base_header as journal_header

    session, pool = tiny["session"], tiny["pool"]
    editor = session.editor
    editor.reset()
    editor.load_state_dict(tiny["state0"])
    journal = Journal(tempfile.mkdtemp(dir=tiny["root"]))
    header = journal_header(session.model, session.modules, "tiny-llama")
    names = [m.name for m in session.modules]
    journal.write_base({n: w.detach().cpu() for n, w in weights_by_name(session.model, names).items()}, header)
    ids = {}  # journal id -> editor id
    try:
        for op, i in program:
            if op == "edit" or not journal.active_ids():
                entry = editor.edit(pool[i % N_POOL])
                line = journal.record(entry.cpu(), {}, header)
                ids[line["id"]] = entry.edit_id
            else:
                active = journal.active_ids()
                journal_id = active[i % len(active)]
                journal.revert(journal_id)
                editor.revert(ids[journal_id])
            fresh = {n: w.clone() for n, w in zip(names, tiny["w0"])}
            journal.rebuild_(fresh)
            assert _same(editor.weights(), [fresh[n] for n in names])
        for journal_id in list(journal.active_ids()):
            journal.revert(journal_id)
        fresh = {n: torch.zeros_like(w) for n, w in zip(names, tiny["w0"])}
        assert journal.rebuild_(fresh) == [] and _same([fresh[n] for n in names], tiny["w0"])
    finally:
        editor.reset()
        editor.load_state_dict(tiny["state0"])

