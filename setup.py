# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "pyro_osds" / "_version.py").read_text()).group(1)

test_requires = [
    "pytest>=7",
    "hypothesis>=6",
    "ruff>=0.5",
    "h5netcdf>=1.0",
    "matplotlib>=3.7",
    "jupytext>=1.16",  # the tutorial notebooks are jupytext conversions of the scripts (tests/test_docs.py)
    # the ArviZ >= 1 API (DataTree) on Python 3.11: arviz-base/stats 0.8.x, which install beside arviz 0.x
    "arviz-base>=0.8,<0.9; python_version < '3.12'",
    "arviz-stats[xarray]>=0.8,<0.9; python_version < '3.12'",
]

setup(
    name="pyro-osds",
    version=version,
    description="One-step diffusion samplers for Pyro models: posterior draws and honest log evidence",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["pyro_osds", "pyro_osds.*"]),
    package_data={"pyro_osds.datasets": ["*.csv", "README.md"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "pyro-ppl>=1.9",
        "numpy>=1.24",
        "scipy>=1.10",
        "pandas>=2.0",
        "xarray>=2024.10",
        "arviz>=0.20",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": test_requires,
        "dev": test_requires,
        "tutorials": ["matplotlib>=3.7"],
        "docs": ["sphinx>=8", "sphinx-gallery>=0.17", "matplotlib>=3.7"],
        "benchmarks": ["pot>=0.9"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Mathematics",
    ],
)
