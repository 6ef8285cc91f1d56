"""The hypernetwork's initialisation (editor.a_init): "normal" is the published N(0, 1) draw, value for value;
"fan_in" draws the same numbers scaled by 1 / sqrt(D); both start as the identity on normalised rows, and under the
same Adam step on B the fan-in network's output moves about sqrt(D) times less."""

import pytest
import torch

from emsedit_fast.config import ConfigError
from emsedit_fast.config import load
from emsedit_fast.nn import HyperNet

D_IN, D_OUT, LAYERS, RANK = 24, 40, 3, 16
D = D_IN + D_OUT


def _net(a_init: str, seed: int = 0) -> HyperNet:
    return HyperNet(D_IN, D_OUT, LAYERS, RANK, n_blocks=2, eta_init=1e-3, eta_param="log",
                    generator=torch.Generator().manual_seed(seed), a_init=a_init)


def test_normal_is_the_published_draw_and_fan_in_scales_it_by_one_over_sqrt_d():
    gen = torch.Generator().manual_seed(0)
    draws = [torch.randn(D, RANK, generator=gen) for _ in range(2)]
    normal, fan_in = _net("normal"), _net("fan_in")
    assert all(torch.equal(a, x) for a, x in zip(normal.a, draws))
    assert all(torch.allclose(a, x / D ** 0.5, rtol=1e-6, atol=0) for a, x in zip(fan_in.a, draws))
    assert all(torch.equal(b, torch.zeros(RANK, D)) for b in fan_in.b)


@pytest.mark.parametrize("a_init", ["normal", "fan_in"])
def test_both_start_as_the_identity_on_normalised_rows(a_init):
    net = _net(a_init)
    gen = torch.Generator().manual_seed(1)
    keys, grads = torch.randn(12, D_IN, generator=gen), torch.randn(12, D_OUT, generator=gen)
    idx = torch.arange(12) % LAYERS
    mean, std = torch.randn(D, generator=gen), torch.rand(D, generator=gen) + 0.5
    out = net(keys, grads, idx, mean=mean, std=std, backend="reference")
    z0 = (torch.cat([keys, grads], 1) - mean) / (std + 1e-8)
    torch.testing.assert_close(out, z0, rtol=1e-5, atol=1e-5)


def test_one_adam_step_on_b_moves_the_fan_in_output_about_sqrt_d_times_less():
    gen = torch.Generator().manual_seed(2)
    keys, grads = torch.randn(50, D_IN, generator=gen), torch.randn(50, D_OUT, generator=gen)
    idx, target = torch.arange(50) % LAYERS, torch.randn(50, D, generator=gen)
    moved = {}
    for a_init in ("normal", "fan_in"):
        net = _net(a_init)
        mean, std = torch.zeros(D), torch.ones(D)
        before = net(keys, grads, idx, mean=mean, std=std, backend="reference").detach()
        loss = ((net(keys, grads, idx, mean=mean, std=std, backend="reference") - target) ** 2).sum()
        loss.backward()
        opt = torch.optim.Adam(list(net.b), lr=1e-3)  # B alone: A, s, t, c as initialised
        opt.step()
        moved[a_init] = (net(keys, grads, idx, mean=mean, std=std, backend="reference").detach() - before).norm()
    ratio = float(moved["normal"] / moved["fan_in"])
    assert 0.3 * D ** 0.5 < ratio < 3 * D ** 0.5, ratio


def test_a_init_is_checked():
    assert load("emsedit", overrides=["editor.a_init=fan_in"]).editor.a_init == "fan_in"
    with pytest.raises(ConfigError, match="a_init"):
        load("emsedit", overrides=["editor.a_init=xavier"])
    with pytest.raises(ValueError, match="a_init"):
        _net("xavier")
