"""The reference ridge's general LU solves one layer at a time: right on every layer, at every thread count (the
batched CPU LU of torch 2.13 returns invalid pivots with two threads at 576 x 576)."""

import pytest
import torch

from emsedit_fast.reference.ridge import lu_solve
from emsedit_fast.reference.ridge import ridge_solve


@pytest.mark.parametrize("threads", [1, 2])
def test_lu_solve_per_layer_matches_float64_at_every_thread_count(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        keys = torch.randn(3, 64, 576, generator=gen)
        a = keys.transpose(1, 2) @ keys + 0.5 * torch.eye(576)
        b = torch.randn(3, 576, 40, generator=gen)
        x = lu_solve(a, b)
        exact = torch.linalg.solve(a.double()[0], b.double()[0])  # one matrix: unaffected
        # normwise: A's condition number is about 2000 (eigenvalues 0.5 to about 1000), so an fp32 LU is within
        # cond x eps ~ 1e-4 of the exact solution in norm, element errors vary with the LAPACK build (MKL on an
        # H200 host missed an elementwise 1e-3 bound), and invalid pivots give errors of order one
        err = torch.linalg.norm(x[0].double() - exact) / torch.linalg.norm(exact)
        assert err < 2e-3, f"relative error {err:.2e}"
        assert torch.allclose(a @ x, b, atol=1e-3 * float(b.abs().max()))
        sol = ridge_solve(keys, torch.randn(3, 64, 40, generator=gen), torch.zeros(3), "primal")
        assert sol.shape == (3, 576, 40) and torch.isfinite(sol).all()
    finally:
        torch.set_num_threads(before)


def test_lu_solve_of_no_layers_is_empty():
    assert lu_solve(torch.zeros(0, 4, 4), torch.zeros(0, 4, 2)).shape == (0, 4, 2)
