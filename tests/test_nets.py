# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
import pytest
import torch

from pyro_osds.ops.nets import StepConditionedControl

D64 = torch.float64


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
