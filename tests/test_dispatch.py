"""Backend selection: precedence, explicit-request errors, the env override, 'fast', and recording."""

import pytest
import torch

from emsedit_fast import ops
from emsedit_fast.ops._dispatch import ENV_VAR
from emsedit_fast.ops._dispatch import requested_backend
from emsedit_fast.ops._dispatch import select


def _impls():
    return {"reference": lambda: "reference", "cpp": lambda: "cpp", "triton": lambda: "triton"}


def test_auto_prefers_cpp_on_cpu_when_it_has_the_kernel():
    from emsedit_fast import _ext

    x = torch.zeros(2)
    name, _ = select("restore_", _impls(), (x,))
    assert name == ("cpp" if _ext.load_error() is None else "reference")


def test_auto_falls_back_to_reference_when_cpp_lacks_the_kernel():
    name, _ = select("no_such_op", _impls(), (torch.zeros(2),))
    assert name == "reference"


def test_cached_choices_follow_the_request_and_the_implementations(monkeypatch):
    """A choice is remembered per (op, request, device, dtypes, implemented backends): a later request, or an op table
    without the remembered backend, chooses afresh, and every call is still recorded."""
    from emsedit_fast import _ext

    x = torch.zeros(2)
    fast = "cpp" if _ext.load_error() is None else "reference"
    for _ in range(2):
        with ops.record_backends() as seen:
            assert select("cached_op_", _impls(), (x,))[0] == "reference"   # no C++ kernel of that name
            assert select("restore_", _impls(), (x,))[0] == fast
            assert select("restore_", _impls(), (x,), "reference")[0] == "reference"
            assert select("restore_", {"reference": lambda: None}, (x,))[0] == "reference"
            with ops.use_backend("reference"):
                assert select("restore_", _impls(), (x,))[0] == "reference"
            monkeypatch.setenv(ENV_VAR, "reference")
            assert select("restore_", _impls(), (x,))[0] == "reference"
            monkeypatch.delenv(ENV_VAR)
        assert seen == {"cached_op_": {"reference"}, "restore_": {fast, "reference"}}


def test_fast_refuses_the_reference():
    with pytest.raises(NotImplementedError, match="no_such_op: no backend can serve backend='fast'"):
        select("no_such_op", _impls(), (torch.zeros(2),), "fast")


def test_explicit_request_that_cannot_be_served_lists_every_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError) as err:
        select("restore_", {"reference": lambda: None}, (torch.zeros(2),), "triton")
    msg = str(err.value)
    assert "reference: ok" in msg and "triton: restore_ has no triton implementation" in msg
    assert "(2,):float32@cpu" in msg


def test_unknown_backend_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        requested_backend("cuda")


def test_precedence_argument_then_context_then_env(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert requested_backend() == "reference"
    with ops.use_backend("cpp"):
        assert requested_backend() == "cpp"
        assert requested_backend("triton") == "triton"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        requested_backend()


def test_env_override_reaches_the_ops(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    w, s = [torch.zeros(3)], [torch.ones(3)]
    with ops.record_backends() as seen:
        ops.restore_(w, s)
    assert seen == {"restore_": {"reference"}}


def test_record_backends_nests():
    w, s = [torch.zeros(3)], [torch.ones(3)]
    with ops.record_backends() as outer:
        with ops.record_backends() as inner:
            ops.restore_(w, s, backend="reference")
        ops.restore_(w, s, backend="reference")
    assert inner == {"restore_": {"reference"}} and outer == {"restore_": {"reference"}}
