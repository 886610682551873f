# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.transports: exact densities and inverses of the maps, and the draw-and-weight loop."""

import math

import pytest
import torch

from pyro_osds.config import OSDSConfig
from pyro_osds.ops.affine import AffineMap, whiten_potential
from pyro_osds.ops.mode_search import LaplacePartition
from pyro_osds.ops.nets import NetConfig
from pyro_osds.ops.reference import ReferenceProcess
from pyro_osds.transports import (
    ConsistencyTransport,
    EvaluationConfig,
    FlowTransport,
    MixtureTransport,
    TransportOutput,
    draw,
)

D64 = torch.float64
DIM = 3


def skewed(x):
    return 0.5 * ((x - 0.5) ** 2).sum(-1) + 0.3 * torch.nn.functional.softplus(2 * x[..., 0])


def _parts(seed=0):
    """A random (untrained) float64 network, a process and an affine map with a non-trivial scale."""
    torch.manual_seed(seed)
    process = ReferenceProcess(grid_size=8, prior_scale=0.9)
    net = NetConfig(hidden_dim=16, dtype=None).build(DIM, dtype=D64)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scale = torch.tensor([[1.2, 0.0, 0.0], [0.3, 0.8, 0.0], [-0.2, 0.1, 1.5]], dtype=D64)
    affine = AffineMap(torch.tensor([0.5, -1.0, 0.2], dtype=D64), scale)
    return net, process, affine, whiten_potential(skewed, affine)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_flow_transport_density_matches_its_inverse(num_steps):
    net, process, affine, potential_z = _parts()
    transport = FlowTransport(net, potential_z, process, affine, num_steps, dtype=D64, model_dtype=D64)
    z0 = transport.sample_base(64, generator=torch.Generator().manual_seed(1))
    out = transport(z0)
    assert out.log_det == "exact" and out.x.dtype == D64 and bool((out.orientation == 1).all())
    log_q, ok = transport.log_prob(out.x)
    assert bool(ok.all())
    torch.testing.assert_close(log_q, out.log_q, rtol=0, atol=1e-8)


def test_consistency_transport_density_matches_its_newton_inverse():
    net, process, affine, potential_z = _parts(1)
    transport = ConsistencyTransport(net, potential_z, process, affine, 1, dtype=D64, model_dtype=D64, sigma_data=0.5)
    z0 = transport.sample_base(64, generator=torch.Generator().manual_seed(2))
    out = transport(z0)
    assert out.log_det == "exact" and out.orientation is not None
    log_q, ok = transport.log_prob(out.x)
    assert bool(ok.all())
    torch.testing.assert_close(log_q, out.log_q, rtol=0, atol=1e-8)
    none = transport(z0, log_det="none")  # no volume asked for: no log-det computed
    assert none.log_det == "none" and none.orientation is None and bool(torch.isnan(none.log_q).all())
    torch.testing.assert_close(none.x, out.x, rtol=0, atol=0)


def test_multi_step_consistency_draws_have_no_density():
    net, process, affine, potential_z = _parts(2)
    transport = ConsistencyTransport(net, potential_z, process, affine, 2, dtype=D64, model_dtype=D64)
    out = transport(transport.sample_base(8, generator=torch.Generator().manual_seed(0)),
                    generator=torch.Generator().manual_seed(1))
    assert out.log_det == "none" and bool(torch.isnan(out.log_q).all()) and bool(torch.isfinite(out.x).all())
    with pytest.raises(ValueError, match="no tractable density"):
        transport.log_prob(out.x)


def test_draw_weights_every_draw_exactly_and_in_chunks():
    net, process, affine, potential_z = _parts(3)
    transport = FlowTransport(net, potential_z, process, affine, 2, dtype=D64, model_dtype=D64)
    calls = []

    def counted(x):
        calls.append(x.shape[0])
        return skewed(x)

    draws = draw(transport, counted, 50, chunk_size=16, generator=torch.Generator().manual_seed(5))
    assert calls == [16, 16, 16, 2] and draws.x.shape == (50, DIM) and draws.log_weight.dtype == D64
    torch.testing.assert_close(draws.potential, skewed(draws.x), rtol=0, atol=0)
    torch.testing.assert_close(draws.log_weight, -draws.potential - draws.log_q, rtol=0, atol=0)
    # the weights are exact: the log density agrees with the inverse map's at the drawn points
    log_q, ok = transport.log_prob(draws.x)
    assert bool(ok.all())
    torch.testing.assert_close(log_q, draws.log_q, rtol=0, atol=1e-8)
    calls.clear()
    unweighted = draw(transport, counted, 20, log_det="none", generator=torch.Generator().manual_seed(5))
    assert calls == [] and bool(torch.isnan(unweighted.log_weight).all()) and unweighted.log_det == "none"
    with pytest.raises(ValueError, match="`num_samples` must be an integer >= 1"):
        draw(transport, counted, 0)


def test_evaluation_config_default_volume():
    assert EvaluationConfig().default_log_det(100_000) == "exact"  # exact at every dimension unless asked
    evaluation = EvaluationConfig(exact_log_det_max_dim=10)
    assert evaluation.default_log_det(10) == "exact" and evaluation.default_log_det(11) == "hutchinson"
    assert EvaluationConfig(log_det="euler_trace").default_log_det(1000) == "euler_trace"
    assert OSDSConfig(eval_log_det="none").evaluation.log_det == "none"
    with pytest.raises(ValueError, match="`eval_log_det` must be one of"):
        EvaluationConfig(log_det="approximate")


class GaussianTransport:
    """A transport with a closed form: x = m + s z0, z0 ~ N(0, I) (the test's reference component)."""

    def __init__(self, mean, scale):
        self.mean, self.scale = torch.as_tensor(mean, dtype=D64), float(scale)
        self.dim = self.mean.numel()

    def _log_density(self, x):
        return torch.distributions.Normal(self.mean, self.scale).log_prob(x).sum(-1)

    def log_prob(self, x):
        return self._log_density(x), torch.ones(x.shape[0], dtype=torch.bool)

    def sample(self, num_samples, *, log_det="exact", generator=None):
        x = self.mean + self.scale * torch.randn(num_samples, self.dim, dtype=D64, generator=generator)
        log_q = self._log_density(x) if log_det != "none" else torch.full((num_samples,), float("nan"), dtype=D64)
        return TransportOutput(x, log_q, torch.ones(num_samples, dtype=D64), log_det)


def test_mixture_density_is_the_balance_heuristic():
    a, b = GaussianTransport([-3.0, 0.0], 1.0), GaussianTransport([3.0, 1.0], 0.7)
    mixture = MixtureTransport([a, b], [1.0, 3.0])
    out = mixture.sample(500, generator=torch.Generator().manual_seed(0))
    expected = torch.logaddexp(math.log(0.25) + a.log_prob(out.x)[0], math.log(0.75) + b.log_prob(out.x)[0])
    torch.testing.assert_close(out.log_q, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(mixture.log_prob(out.x)[0], expected, rtol=0, atol=1e-12)
    share_b = float((out.x[:, 0] > 0).double().mean())
    assert abs(share_b - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 500)  # components are drawn with their weights
    with pytest.raises(ValueError, match="non-negative"):
        MixtureTransport([a, b], [1.0, -1.0])


def test_mixture_evidence_is_unbiased_whatever_the_component_weights():
    # target: 0.3 N(-3, I) + 0.7 N(3, I) in 2-D, times Z = e^{1.5}; each component proposal covers one mode only
    log_z = 1.5
    modes = torch.tensor([[-3.0, 0.0], [3.0, 0.0]], dtype=D64)

    def target_potential(x):
        comp = torch.distributions.Normal(modes, 1.0).log_prob(x[:, None, :]).sum(-1)
        return -(log_z + torch.logsumexp(comp + torch.tensor([0.3, 0.7], dtype=D64).log(), -1))

    components = [GaussianTransport(modes[0], 1.2), GaussianTransport(modes[1], 1.2)]
    for weights in ([0.5, 0.5], [0.9, 0.1]):
        draws = draw(MixtureTransport(components, weights), target_potential, 20_000,
                     generator=torch.Generator().manual_seed(1))
        est = draws.evidence()
        assert abs(est.log_z - log_z) < 4 * est.se, (weights, est)
    one = draw(components[1], target_potential, 20_000, generator=torch.Generator().manual_seed(2)).evidence()
    assert abs(one.log_z - (log_z + math.log(0.7))) < 4 * one.se  # a single component misses the other mode's mass


def test_a_mixture_of_flows_weights_every_draw_exactly():
    flows = []
    for seed in (4, 5):
        net, process, affine, potential_z = _parts(seed)
        flows.append(FlowTransport(net, potential_z, process, affine, 2, dtype=D64, model_dtype=D64))
    mixture = MixtureTransport(flows, [0.4, 0.6])
    draws = draw(mixture, skewed, 64, generator=torch.Generator().manual_seed(3))
    log_q, ok = mixture.log_prob(draws.x)
    assert bool(ok.all()) and draws.log_det == "exact" and draws.orientation is not None
    torch.testing.assert_close(log_q, draws.log_q, rtol=0, atol=1e-8)
    unweighted = draw(mixture, skewed, 10, log_det="none", generator=torch.Generator().manual_seed(3))
    assert bool(torch.isnan(unweighted.log_weight).all())


class _NoInverse(GaussianTransport):
    def log_prob(self, x):
        raise AssertionError("the partition weighting needs no component's density at other draws")


def test_partition_weights_are_unbiased_without_any_inverse():
    log_z = -0.7
    modes = torch.tensor([[-3.0, 0.0], [3.0, 0.0]], dtype=D64)

    def target_potential(x):
        comp = torch.distributions.Normal(modes, 1.0).log_prob(x[:, None, :]).sum(-1)
        return -(log_z + torch.logsumexp(comp + torch.tensor([0.3, 0.7], dtype=D64).log(), -1))

    laplace = [(AffineMap(modes[0], torch.eye(2, dtype=D64)), 0.5), (AffineMap(modes[1], torch.eye(2, dtype=D64)), 0.5)]
    components = [_NoInverse(modes[0], 1.3), _NoInverse(modes[1], 1.3)]
    for weights in ([0.5, 0.5], [0.9, 0.1]):  # any allocation: the estimate stays unbiased
        mixture = MixtureTransport(components, weights, partition=LaplacePartition(laplace))
        draws = draw(mixture, target_potential, 20_000, generator=torch.Generator().manual_seed(4))
        est = draws.evidence()
        assert abs(est.log_z - log_z) < 4 * est.se, (weights, est)
        assert draws.component is not None and set(draws.component.tolist()) == {0, 1}
