"""restore_: bit-exact grouped copy of snapshots back into the edited weights.

Providers: reference (a copy_ per layer, as published), competent (`torch._foreach_copy_` over the layer list, the
multi-tensor copy PyTorch offers), cpp/triton (one grouped kernel). Every round overwrites "edited" weights that an
untimed setup put back; the gate is bit-exact, and the snapshots differ from the edited weights everywhere.
"""

from types import SimpleNamespace

import _cases
import _harness
import pytest
import torch

from emsedit_fast import ops
from emsedit_fast import testing


def foreach_restore_(weights, snapshots):
    """Competent restore: one multi-tensor copy over the whole layer list."""
    torch._foreach_copy_(weights, snapshots)


class Restore(_harness.OpSpec):
    op = "restore_"
    inplace = True
    exact = True

    def cases(self, smoke, device):
        if smoke:
            return _cases.weight_cases([("tiny", False), ("tiny-gpt2", True)], device)
        return _cases.weight_cases([("smollm2-135m", False), ("gpt2-xl", True), ("gptj-fc_out", False),
                                    ("llama3-gate_up", False)], device, {"gptj-fc_out": 1, "llama3-gate_up": 1})

    def make(self, case, device):
        args = dict(dtype=case.torch_dtype, transposed=case.layout_transposed, device=device)
        weights = testing.layer_weights(case.layers, case.d_in, case.d_out, seed=1, **args)
        snaps = testing.layer_weights(case.layers, case.d_in, case.d_out, seed=2, **args)
        edited = _harness.clone_all(weights)

        def reset():  # the "edited" bytes restore_ overwrites
            for w, e in zip(weights, edited):
                w.copy_(e)

        return SimpleNamespace(case=case, weights=weights, snaps=snaps, reset=reset)

    def kernel(self, x, backend):
        ops.restore_(x.weights, x.snaps, backend=backend)

    def competent_fn(self, x):
        return foreach_restore_, (x.weights, x.snaps)

    def outputs(self, x, result):
        return x.weights

    def info(self, case, provider):
        return {"bytes_moved": 2 * case.layers * case.d_in * case.d_out * case.torch_dtype.itemsize,
                "workspace_model_bytes": 0}


RESTORE = Restore()


@pytest.mark.bench(RESTORE)
def bench_restore_grouped(benchmark, case, provider, device):
    _harness.run_op_bench(benchmark, RESTORE, case, provider, device)
