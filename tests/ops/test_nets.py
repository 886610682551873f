# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.nets: the step-conditioned control network."""

import pytest
import torch

from pyro_osds.ops.nets import ACTIVATIONS, NetConfig, StepConditionedControl
from tests.common import D64


def test_initial_control_is_the_langevin_input():
    net = StepConditionedControl(4, dtype=D64)
    x = torch.randn(10, 4, dtype=D64)
    g = torch.randn(10, 4, dtype=D64) * 5
    u = net(x, 0.5, 1 / 32, g)
    assert u.shape == (10, 4)
    # output weights start at 1e-8 and the Langevin gain's bias at 1: u = g + O(1e-6)
    torch.testing.assert_close(u, g, rtol=0, atol=1e-5)


def test_langevin_input_is_clipped():
    net = StepConditionedControl(2, inner_clip=3.0, dtype=D64)
    g = torch.tensor([[100.0, -0.5]], dtype=D64)
    u = net(torch.zeros(1, 2, dtype=D64), 0.0, 1.0, g)
    torch.testing.assert_close(u, torch.tensor([[3.0, -0.5]], dtype=D64), rtol=0, atol=1e-5)


def test_shared_and_per_sample_time_agree():
    torch.manual_seed(1)
    net = StepConditionedControl(3, hidden_dim=16, dtype=D64)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    x, g = torch.randn(7, 3, dtype=D64), torch.randn(7, 3, dtype=D64)
    shared = net(x, 0.25, 0.125, g)
    per_sample = net(x, torch.full((7,), 0.25, dtype=D64), torch.full((7,), 0.125, dtype=D64), g)
    features = net.step_features(torch.tensor([0.25], dtype=D64), torch.tensor([0.125], dtype=D64))
    precomputed = net(x, None, None, g, features=features)
    torch.testing.assert_close(shared, per_sample, rtol=0, atol=1e-14)
    torch.testing.assert_close(shared, precomputed, rtol=0, atol=1e-14)
    # rows depend on their own time only
    mixed = net(x, torch.tensor([0.25] * 3 + [0.9] * 4, dtype=D64), 0.125, g)
    torch.testing.assert_close(mixed[:3], shared[:3], rtol=0, atol=1e-14)
    assert not torch.allclose(mixed[3:], shared[3:])


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu"])
def test_every_parameter_gets_a_gradient(activation):
    net = StepConditionedControl(3, hidden_dim=8, activation=activation, dtype=D64)
    x = torch.randn(5, 3, dtype=D64)
    t = torch.rand(5, dtype=D64)
    u = net(x, t, 0.5, torch.randn(5, 3, dtype=D64))
    (u**2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_dtype_and_state_dict_round_trip():
    net = StepConditionedControl(3, hidden_dim=8, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    other = StepConditionedControl(3, hidden_dim=8, dtype=torch.float32)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    other.load_state_dict(net.state_dict())
    x, g = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(net(x, 0.3, 0.5, g), other(x, 0.3, 0.5, g), rtol=0, atol=0)


def test_invalid_network_arguments():
    with pytest.raises(ValueError, match="activation"):
        StepConditionedControl(3, activation="relu6")
    with pytest.raises(ValueError, match="`dim` must be an integer >= 1"):
        StepConditionedControl(0)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("g_kind", ["diagonal", "full"])
@pytest.mark.parametrize("per_sample_time", [False, True])
def test_closed_form_jacobian_matches_autograd(activation, g_kind, per_sample_time):
    """control_and_jacobian against the autograd Jacobian of x -> u(x, t, d, g(x)), float64, with both
    clips active on some coordinates (their kinks are where the closed form zeroes rows)."""
    torch.manual_seed(0)
    dim, batch = 4, 6
    net = StepConditionedControl(dim, hidden_dim=8, num_layers=2, num_frequencies=4, activation=activation,
                                 inner_clip=0.6, dtype=D64)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.7)
    x = torch.randn(batch, dim, dtype=D64)
    t = torch.rand(batch, dtype=D64) if per_sample_time else 0.3
    d = torch.rand(batch, dtype=D64) if per_sample_time else 0.25
    B = torch.randn(dim, dim, dtype=D64)

    def g_of(z):  # a smooth Langevin input with a known Jacobian
        return torch.tanh(z) if g_kind == "diagonal" else torch.tanh(z @ B)

    code, _ = net.step_features(torch.as_tensor(t, dtype=D64).expand(batch), torch.as_tensor(d, dtype=D64).expand(batch))
    h = net.state_net(torch.cat([x, code], -1)).detach()
    middle = h.abs().flatten().sort().values[h.numel() // 2 - 1 : h.numel() // 2 + 1]
    net.outer_clip = float(middle.mean())  # half the outputs clipped, none at the kink
    g = g_of(x)
    if g_kind == "diagonal":
        g_jac = 1 - g**2  # (batch, dim): the diagonal
    else:
        g_jac = (1 - g**2).unsqueeze(-1) * B.T.unsqueeze(0)  # dg_i/dx_j = (1 - g_i^2) B_ji
    u, jac = net.control_and_jacobian(x, t, d, g, g_jac)
    _, jac_t = net.control_and_jacobian(x, t, d, g, g_jac, transposed=True)
    torch.testing.assert_close(u, net(x, t, d, g), rtol=0, atol=1e-12)
    torch.testing.assert_close(jac_t, jac.transpose(-1, -2), rtol=0, atol=0)
    # both clips bind somewhere, so the test covers the zeroed rows
    assert bool((g.abs() > net.inner_clip).any()) and bool((g.abs() < net.inner_clip).any())
    assert bool((h.abs() > net.outer_clip).any()) and bool((h.abs() < net.outer_clip).any())
    for i in range(batch):
        ti = t[i : i + 1] if per_sample_time else t
        di = d[i : i + 1] if per_sample_time else d

        def u_row(z, ti=ti, di=di):
            z = z.unsqueeze(0)
            return net(z, ti, di, g_of(z))[0]

        ref = torch.autograd.functional.jacobian(u_row, x[i])
        torch.testing.assert_close(jac[i], ref, rtol=1e-10, atol=1e-10)


def test_net_config_builds_the_network_it_describes():
    config = NetConfig(hidden_dim=8, num_layers=1, num_frequencies=3, activation="gelu", dtype=None)
    assert config.torch_dtype(D64) == D64 and NetConfig().torch_dtype(D64) == torch.float32
    a = config.build(5, dtype=D64, generator=torch.Generator().manual_seed(3))
    b = config.build(5, dtype=D64, generator=torch.Generator().manual_seed(3))
    assert a.activation == "gelu" and a.features.frequencies.numel() == 3 and a.state_net[0].out_features == 8
    for p, q in zip(a.parameters(), b.parameters(), strict=True):  # the generator alone fixes the weights
        assert torch.equal(p, q)
    state = torch.random.get_rng_state()
    config.build(5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    with pytest.raises(ValueError, match="`activation` must be one of"):
        NetConfig(activation="relu")
    with pytest.raises(ValueError, match="`hidden_dim` must be an integer >= 1"):
        NetConfig(hidden_dim=0)
