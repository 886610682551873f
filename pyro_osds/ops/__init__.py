# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Pure tensor numerics of the one-step diffusion sampler, in the spirit of :mod:`pyro.ops`: functions of
``(batch, dim)`` tensors, networks and callables, with no Pyro model and no runner configuration.

==============================  ===================================================================
module                          what it holds
==============================  ===================================================================
:mod:`.reference`               the reference process: schedule, step grid, prior
:mod:`.nets`                    the step-conditioned control network and its closed-form Jacobian
:mod:`.jacobian`                per-sample Jacobians, traces, Hutchinson probes, target scores
:mod:`.lowrank`                 diagonal-plus-low-rank matrices: determinant lemma, Woodbury solves
:mod:`.integrate`               PF-ODE steps and flows with exact log-dets
:mod:`.inverse`                 the flows' exact Newton inverse (the sampler's density at any point)
:mod:`.em`                      stochastic Euler--Maruyama paths and their path weights
:mod:`.consistency`             CDDS's consistency function, its loss and inverse
:mod:`.losses`                  the training losses (diffusion, self-distillation, flow reverse KL)
:mod:`.affine`                  affine maps, the whitened potential, the Gaussian covering several modes
:mod:`.mode_search`             the multi-start mode search, the modes' partition of unity, lost-mode tests
:mod:`.marginal`                the marginal-mixture preconditioner of many modes (per-coordinate wells)
:mod:`.precondition`            affine preconditioners: Laplace, Gaussian VI, and the report of what was found
:mod:`.estimators`              log Z, ELBO, ESS, Pareto k-hat from log-weights
==============================  ===================================================================
"""
