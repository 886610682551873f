# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""The README's code runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_quick_starts():
    blocks = python_blocks()
    assert any("potential_fn=" in b for b in blocks) and any("OSDS(model" in b for b in blocks)
    assert any("compare(" in b and "az.summary" in b for b in blocks)


def test_readme_test_command_is_the_one_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = "OMP_NUM_THREADS=1 python -m pytest"
    assert command in README.read_text() and command in ci


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, capsys):
    exec(compile(python_blocks()[index], f"README.md block {index}", "exec"), {"__name__": "readme"})
