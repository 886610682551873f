# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Small real datasets shipped with the package (see ``README.md`` in this folder for sources and
licences), with loaders that apply the standard preprocessing of the diffusion-sampler benchmarks.
No data are downloaded at run time.
"""

from __future__ import annotations

import csv
from importlib import resources

import torch

__all__ = [
    "load_breast_cancer",
    "load_brownian_motion",
    "load_csv",
    "load_german_credit",
    "load_ionosphere",
    "load_seeds",
    "load_sonar",
    "standardize",
]


def load_csv(name: str, *, dtype: torch.dtype = torch.float64) -> tuple[list[str], torch.Tensor]:
    """Reads a bundled CSV file: ``(header, values)`` with ``nan`` for missing entries."""
    path = resources.files(__name__).joinpath(name)
    with path.open("r", newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    values = torch.tensor([[float(v) for v in row] for row in body], dtype=dtype, device="cpu")
    return header, values


def standardize(x: torch.Tensor, *, center: bool = True, intercept: bool = True) -> torch.Tensor:
    """Column-standardises ``x`` (population std, 0 replaced by 1) and prepends a column of ones."""
    mean = x.mean(0) if center else torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    std = x.std(0, correction=0)  # numpy convention, as in the benchmark code
    std = torch.where(std > 0, std, torch.ones_like(std))
    z = (x - mean) / std
    if intercept:
        z = torch.cat([torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device), z], dim=1)
    return z


def _features_and_labels(name: str, *, drop: tuple[str, ...] = (), standardized: bool, intercept: bool,
                         center: bool = True, dtype: torch.dtype):
    header, values = load_csv(name, dtype=dtype)
    keep = [i for i, h in enumerate(header) if h not in drop and h != "y"]
    x = values[:, keep]
    y = values[:, header.index("y")]
    if standardized:
        x = standardize(x, center=center, intercept=intercept)
    elif intercept:
        x = torch.cat([torch.ones(x.shape[0], 1, dtype=dtype, device=x.device), x], dim=1)
    return x, y


def load_ionosphere(*, standardized: bool = True, intercept: bool = True, dtype: torch.dtype = torch.float64):
    """UCI Ionosphere: ``(X (351, 35), y (351,))`` with standardised features and an intercept column."""
    return _features_and_labels("ionosphere.csv", standardized=standardized, intercept=intercept, dtype=dtype)


def load_sonar(*, standardized: bool = True, intercept: bool = True, dtype: torch.dtype = torch.float64):
    """UCI Sonar: ``(X (208, 61), y (208,))``."""
    return _features_and_labels("sonar.csv", standardized=standardized, intercept=intercept, dtype=dtype)


def load_german_credit(*, standardized: bool = True, intercept: bool = True, dtype: torch.dtype = torch.float64):
    """UCI German Credit (numeric): ``(X (1000, 25), y (1000,))``, ``y = 1`` for bad credit."""
    return _features_and_labels("german_credit_numeric.csv", standardized=standardized, intercept=intercept,
                                dtype=dtype)


def load_breast_cancer(*, standardized: bool = True, intercept: bool = True, dtype: torch.dtype = torch.float64):
    """UCI Breast Cancer Wisconsin (Diagnostic): ``(X (569, 31), y (569,))``, ``y = 1`` benign."""
    return _features_and_labels("breast_cancer.csv", drop=("id",), standardized=standardized, intercept=intercept,
                                dtype=dtype)


def load_seeds(*, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Crowder's Seeds data: ``{"r", "n", "x1", "x2"}``, 21 plates each."""
    header, values = load_csv("seeds.csv", dtype=dtype)
    return {k: values[:, header.index(k)] for k in ("r", "n", "x1", "x2")}


def load_brownian_motion(*, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The 30 noisy observations of inference-gym's Brownian-motion model (``nan`` for t = 10..19)."""
    header, values = load_csv("brownian_motion_missing_middle_obs.csv", dtype=dtype)
    return values[:, header.index("y_obs")]
