# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""The documentation's invariants: one reference list, and a README section for every module."""

import pathlib
import re

import pytest

import pyro_osds

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = pathlib.Path(pyro_osds.__file__).resolve().parent


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def _normalise(text: str) -> str:
    return " ".join(text.split())


def test_every_docstring_reference_is_in_the_one_reference_list():
    canonical = [_normalise(line[2:]) for line in _readme_section("References").splitlines() if line.startswith("* ")]
    assert len(canonical) >= 7
    cited = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for block in re.findall(r"\*\*References\*\*\n(.*?)(?:\"\"\"|\n\s*\n\s*(?:\*\*|:param|>>>))", text, re.S):
            for entry in re.split(r"\n\s*\[\d+\]\s*", "\n" + block.strip()):
                entry = _normalise(entry)
                if not entry:
                    continue
                cited += 1
                # an entry is a canonical reference, optionally followed by a remark in brackets
                assert any(entry == ref or entry.startswith(ref[:-1] + " (") for ref in canonical), (path, entry)
    assert cited >= 14  # every References block was parsed


def test_the_readme_names_every_module():
    table = _readme_section("How the code is organised")
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if path.name.startswith("_") or relative.startswith("datasets/"):
            continue
        assert f"`{relative}`" in table, relative


def test_the_tutorial_notebooks_are_the_scripts():
    # tutorials/notebooks/*.ipynb are jupytext conversions of the scripts; after editing a script, run
    # `jupytext --to ipynb --output tutorials/notebooks/<name>.ipynb tutorials/<name>.py`
    jupytext = pytest.importorskip("jupytext")
    scripts = sorted((ROOT / "tutorials").glob("[0-9]*.py"))
    notebooks = sorted((ROOT / "tutorials" / "notebooks").glob("*.ipynb"))
    assert [p.stem for p in scripts] == [p.stem for p in notebooks]
    for script, notebook in zip(scripts, notebooks, strict=True):
        expected = [(c.cell_type, c.source) for c in jupytext.read(script).cells]
        actual = [(c.cell_type, c.source) for c in jupytext.read(notebook).cells]
        assert actual == expected, f"{notebook.name} is out of date with {script.name}"
