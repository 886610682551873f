# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
What a run's weighted draws give, as methods of the runner (:class:`WeightedPosterior`, which
:class:`~pyro_osds.OSDS` is): posterior samples (equally weighted by default), posterior predictive draws, the
log evidence, Pyro-style summaries and diagnostics, plots and ArviZ data. The importance weights of the pooled
draws are Pyro's :class:`~pyro.infer.importance.LogWeightsMixin` (``get_log_normalizer``, ``get_ESS``,
``get_normalized_weights``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from pyro.infer.importance import LogWeightsMixin

from .checks import DrawReport, check_draws
from .diagnostics import diagnostics, print_summary, select_indices, weighted_summary
from .model import posterior_predictive
from .results import LogEvidence

__all__ = ["WeightedPosterior"]


class WeightedPosterior(LogWeightsMixin):
    """
    The results side of a run: reads its ``draws`` (one :class:`~pyro_osds.results.Draws` per chain, of the
    ``num_steps``-step map), ``samplers``, ``target``, ``model`` with its ``model_args`` / ``model_kwargs``, and
    raises a clear error before there are any.
    """

    _draw_report: DrawReport | None = None

    def _require_fitted(self):
        if not self.samplers:
            raise RuntimeError("Call `run(...)` (or `fit(...)`) first.")

    def _require_draws(self):
        self._require_fitted()
        if not self.draws:
            raise RuntimeError("No draws yet: call `sample()` (or `run(...)`).")

    @property
    def log_weights(self) -> torch.Tensor:
        """The float64 log-weights of the pooled draws, in the order of :meth:`get_samples`."""
        self._require_draws()
        return torch.cat([d.log_weight for d in self.draws])

    def resample_generator(self) -> torch.Generator:
        """The random stream of the default resampling: seeded from the current draws' log-weights, so the
        same draws always resample the same way (:meth:`get_samples`, :meth:`to_inference_data` and a reloaded
        sampler agree) and new draws (:meth:`sample`) resample afresh."""
        self._require_draws()
        digest = hashlib.sha256(self.log_weights.detach().cpu().numpy().tobytes()).digest()
        return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") % 2**63)

    def draw_indices(self, num_samples: int | None = None, group_by_chain: bool = False, *,
                     resample: bool = True) -> torch.Tensor:
        """Indices into the pooled draws (chain-major) that :meth:`get_samples` returns, ``(chains, M)`` with
        ``group_by_chain`` else ``(1, M)`` (:func:`~pyro_osds.diagnostics.select_indices`)."""
        self._require_draws()
        resample = resample and all(d.weighted for d in self.draws)  # (no need of the draws' full check)
        log_w = self.log_weights.reshape(len(self.draws), -1)
        return select_indices(log_w, num_samples=num_samples, group_by_chain=group_by_chain, resample=resample,
                              generator=self.resample_generator() if resample else None)

    def get_samples(self, num_samples: int | None = None, group_by_chain: bool = False, *, resample: bool = True,
                    unconstrained: bool = False) -> dict[str, torch.Tensor]:
        r"""
        Posterior draws in constrained space (sites in sorted order), shaped ``(chains * draws, *site_shape)``
        or ``(chains, draws, *site_shape)`` with ``group_by_chain``, as :meth:`pyro.infer.MCMC.get_samples`.

        By default the draws are **equally weighted**: the sampler's draws resampled in proportion to their
        importance weights (systematic resampling, :func:`~pyro_osds.diagnostics.resample_indices`; per chain
        when grouped, over the pooled draws otherwise), so that plain averages, quantiles and plots of them
        are posterior estimates. Their effective size is the weights' Kish ESS (:meth:`get_ESS`), not the
        count; a warning says when it is below a tenth of the draws. The same draws always resample the same
        way (:meth:`resample_generator`). Draws without importance weights (multi-step CDDS draws, or
        ``sample(log_det='none')``) are returned as they are.

        With ``resample=False`` the raw draws of the sampler :math:`q` come back, in the order of
        :attr:`log_weights` (:meth:`get_normalized_weights`): weight them yourself.

        :param int num_samples: that many *distinct* positions of the draws, picked at random (per chain
            when grouped); :meth:`pyro.infer.MCMC.get_samples` draws with replacement.
        :param bool group_by_chain: keep the chain dimension.
        :param bool resample: equally weighted draws (default) or the raw weighted ones.
        :param bool unconstrained: values in the unconstrained space the sampler works in.
        """
        self._require_draws()
        idx = self.draw_indices(num_samples, group_by_chain, resample=resample)
        z = torch.cat([d.x for d in self.draws])[idx.to(self.draws[0].x.device)]  # (C or 1, M, D)
        lead = tuple(idx.shape) if group_by_chain else (idx.numel(),)
        flat = z.flatten(0, -2)  # (C or 1) * M rows
        values = self.target.unpack(flat) if unconstrained else self.target.constrain(flat)
        out = OrderedDict((name, values[name].reshape(lead + tuple(values[name].shape[1:])).detach())
                          for name in sorted(values))
        discrete = {}
        for name in self.draws[0].discrete or {}:
            v = torch.cat([d.discrete[name] for d in self.draws])[idx.to(self.draws[0].discrete[name].device)]
            discrete[name] = v.flatten(0, 1)
            out[name] = v.reshape(lead + tuple(v.shape[2:]))
        if self.target.noncentered_sites:  # the model's own sites, functions of their non-centred draws
            values = self.target.deterministic(flat, discrete or None, sites=self.target.noncentered_sites)
            for name in sorted(values):
                out[name] = values[name].reshape(lead + tuple(values[name].shape[1:])).detach()
        return out

    def predictive(self, *args, return_sites: list[str] | None = None, parallel: bool = False, **kwargs
                   ) -> dict[str, torch.Tensor]:
        r"""
        Posterior predictive draws: the model run once at each posterior draw with
        :class:`pyro.infer.Predictive`, its observed sites sampled (as :func:`pyro.poutine.uncondition` does), so
        they are replicated data :math:`\tilde y \sim p(\tilde y \mid y)`. The posterior draws are those of
        :meth:`get_samples` ``(group_by_chain=True)`` (equally weighted, resampled per chain), flattened
        chain-major: pass the result to :meth:`to_inference_data` (``posterior_predictive=``) and its draws line
        up with the ``posterior`` group's.

        :param args: the model's arguments (default: those of :meth:`run`; give new covariates to predict
            at them).
        :param list return_sites: the sites to return (default: the observed sites).
        :param bool parallel: run the model once, vectorised over the draws (needs a model written with
            plates), instead of once per draw.
        :param kwargs: the model's keyword arguments (default: those of :meth:`run`).
        :returns: ``{site: (chains * draws, *shape)}``.
        """
        self._require_draws()
        if self.model is None:
            raise ValueError("`predictive()` needs a Pyro model; this OSDS samples a potential.")
        if not args and not kwargs:
            args, kwargs = self.model_args, self.model_kwargs
        samples = self.get_samples(group_by_chain=True)
        samples = {name: v.reshape((-1,) + tuple(v.shape[2:])) for name, v in samples.items()}
        with self._potential_lock:
            return posterior_predictive(self.target, samples, args, kwargs, return_sites=return_sites,
                                        parallel=parallel)

    @property
    def draw_report(self) -> DrawReport:
        """The checks of the current draws (:func:`~pyro_osds.checks.check_draws`), made once per set of draws (by
        :meth:`sample`, or here for draws restored from a file)."""
        self._require_draws()
        if self._draw_report is None or self._draw_report.draws is not self.draws:
            self._draw_report = check_draws(self.samplers, self.draws, self.num_steps)
        return self._draw_report

    def log_evidence(self) -> LogEvidence:
        r"""Log evidence :math:`\log\hat Z` with standard error, ELBO, ESS and k-hat, pooled and per chain, and its
        verdict (:class:`~pyro_osds.results.LogEvidence`)."""
        return self.draw_report.log_evidence()

    def diagnostics(self) -> dict:
        """
        Per-site ``n_eff`` (Kish ESS of the weights) and ``r_hat`` (split-R-hat between independently
        trained chains), plus per-chain evidence diagnostics (:func:`pyro_osds.diagnostics.diagnostics`).
        """
        return diagnostics(self.get_samples(group_by_chain=True, resample=False), float(self.get_ESS()), self.log_evidence(),
                           [s.num_skipped for s in self.samplers])

    def summary_dict(self, prob: float = 0.9) -> dict:
        """Importance-weighted posterior summary per site (the numbers :meth:`summary` prints)."""
        self._require_draws()
        return weighted_summary(self.get_samples(group_by_chain=True, resample=False), self.log_weights, prob)

    def summary(self, prob: float = 0.9) -> None:
        """
        Prints Pyro's summary table with importance-weighted statistics (``n_eff`` = Kish ESS of the
        weights, ``r_hat`` between chains), followed by the evidence lines.
        """
        print_summary(self.summary_dict(prob), self.log_evidence())

    def plot_training(self, **kwargs):
        """Loss, ELBO and ESS/N of the training draws over the iterations, per chain
        (:func:`pyro_osds.plots.plot_training`; keywords ``panels``, ``smooth``, ``axes``). Returns the axes."""
        from .plots import plot_training

        return plot_training(self, **kwargs)

    def plot_weights(self, **kwargs):
        """Histogram of the draws' log importance weights per chain, titled with k-hat and ESS/N
        (:func:`pyro_osds.plots.plot_weights`; keywords ``bins``, ``axes``). Returns the axes."""
        from .plots import plot_weights

        return plot_weights(self, **kwargs)

    def to_datatree(self, **kwargs):
        """The results as an :class:`xarray.DataTree` (ArviZ >= 1 data model); see :func:`pyro_osds.convert.to_datatree`."""
        from .convert import to_datatree

        return to_datatree(self, **kwargs)

    def to_inference_data(self, **kwargs):
        """
        The results as ``arviz.InferenceData`` (ArviZ 0.x) or ``xarray.DataTree`` (ArviZ >= 1); see
        :func:`pyro_osds.convert.to_inference_data` (keywords ``resample``, ``log_likelihood``, ``coords``,
        ``dims``).
        """
        from .convert import to_inference_data

        return to_inference_data(self, **kwargs)

