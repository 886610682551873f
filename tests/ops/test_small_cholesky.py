# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""Tests of pyro_osds.ops.small_cholesky: the entry-by-entry factorisation and solves of many small matrices against
torch.linalg (float64), their failure flags and their derivatives."""

import pytest
import torch

from pyro_osds.ops.small_cholesky import UNROLLED_SIZE, cholesky_ex, cholesky_solve, solve_lower_transposed
from tests.common import D64


def spd(size, batch=(7, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, size, size, dtype=D64, generator=gen)
    return a @ a.transpose(-1, -2) + 0.1 * torch.eye(size, dtype=D64)


@pytest.mark.parametrize("size", [1, 2, 3, UNROLLED_SIZE, UNROLLED_SIZE + 2])
def test_factor_and_solves_match_torch_linalg(size):
    matrix = spd(size, seed=size)
    vector = torch.randn(7, 5, size, dtype=D64, generator=torch.Generator().manual_seed(1))
    factor, info = cholesky_ex(matrix)
    assert (info == 0).all()
    torch.testing.assert_close(factor, torch.linalg.cholesky(matrix), rtol=0, atol=1e-12)
    torch.testing.assert_close(cholesky_solve(factor, vector), torch.linalg.solve(matrix, vector), rtol=0, atol=1e-9)
    upper = factor.transpose(-1, -2)
    torch.testing.assert_close(solve_lower_transposed(factor, vector), torch.linalg.solve(upper, vector), rtol=0,
                               atol=1e-9)


@pytest.mark.parametrize("size", [1, 3])
def test_a_matrix_that_is_not_positive_definite_is_flagged_and_leaves_no_nan(size):
    matrix = spd(size, batch=(6,), seed=3)
    matrix[2] = -matrix[2]  # negative definite: the first pivot fails
    matrix[4, -1, -1] = matrix[4, -1, -1] - 1e3  # the last pivot fails
    matrix[5, 0, 0] = torch.nan
    factor, info = cholesky_ex(matrix)
    _, torch_info = torch.linalg.cholesky_ex(matrix[:5])
    assert info.tolist()[:5] == torch_info.tolist() and info[5] != 0
    assert info[2] == 1 and info[4] == size
    good = info == 0
    torch.testing.assert_close(factor[good], torch.linalg.cholesky(matrix[good]), rtol=0, atol=1e-12)
    # a failed pivot is replaced: a gradient through the failed rows is finite (zero there when masked out)
    leaf = matrix[:5].clone().requires_grad_(True)
    out, info = cholesky_ex(leaf)
    (grad,) = torch.autograd.grad(torch.where((info == 0)[:, None, None], out, 0.0).sum(), leaf)
    assert torch.isfinite(grad).all() and (grad[info != 0] == 0).all()


def test_first_and_second_derivatives_match_finite_differences():
    matrix = spd(2, batch=(3,), seed=4).requires_grad_(True)
    vector = torch.randn(3, 2, dtype=D64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)

    def solved(m, v):
        m = 0.5 * (m + m.transpose(-1, -2))
        factor = cholesky_ex(m)[0]
        return cholesky_solve(factor, v), solve_lower_transposed(factor, v), torch.diagonal(factor, 0, -2, -1).log()

    assert torch.autograd.gradcheck(solved, (matrix, vector))
    assert torch.autograd.gradgradcheck(solved, (matrix, vector))
