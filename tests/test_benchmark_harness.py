# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
"""
Smoke test of the benchmark harness (``benchmarks/run.py``): the CLI entry point on one small target
in the ``smoke`` preset writes complete JSON records and a report with the expected tables; plus
quick checks of the harness metrics.
"""

import dataclasses
import json
import math

import pytest
import torch

from benchmarks import metrics
from benchmarks.methods import PRESETS, make_dis_config, potential_on_device
from benchmarks.run import main, to_jsonable
from benchmarks.targets import get_target
from pyro_osds import OSDSConfig

D64 = torch.float64


def test_cli_smoke(tmp_path):
    methods = ["osds", "osds_paper", "cdds", "laplace_is", "nuts"]
    rc = main(["--targets", "ionosphere", "--methods", *methods, "--preset", "smoke", "--seed", "0",
               "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == sorted(f"ionosphere__{m}.json" for m in methods)
    assert (tmp_path / "draws" / "ionosphere__nuts.npy").exists()

    for m in methods:
        record = json.loads((tmp_path / f"ionosphere__{m}.json").read_text())
        assert record["status"] == "ok", record.get("traceback")
        assert record["target"] == "ionosphere" and record["method"] == m and record["dim"] == 35
        assert record["seed"] == 0 and record["preset"] == "smoke" and record["date"]
        for key in ("platform", "cpu_model", "cpu_count", "torch_threads"):
            assert key in record["machine"]
        assert record["machine"]["torch_threads"] == 1
        for key in ("python", "torch", "pyro", "pyro_osds", "git_commit"):
            assert key in record["versions"]
        assert record["config"] and record["harness_preset"]["name"] == "smoke"
        assert record["timings"]["total_s"] > 0 and record["timings"]["train_s"] > 0
        assert record["reference"]["log_z_source"] != "none"
        assert record["evaluations"]

    osds = json.loads((tmp_path / "ionosphere__osds.json").read_text())
    assert osds["config"]["osds"] == to_jsonable(OSDSConfig.preset("smoke").as_dict())
    # the default objective is evaluated at the step counts it trains
    keys = {(e["K"], e["weights"]) for e in osds["evaluations"]}
    assert keys == {(1, w) for w in ("exact", "hutchinson", "em")}
    paper = json.loads((tmp_path / "ionosphere__osds_paper.json").read_text())
    T = paper["config"]["osds"]["grid_size"]
    keys = {(e["K"], e["weights"]) for e in paper["evaluations"]}
    assert keys == {(K, w) for K in PRESETS["smoke"].budgets(T) for w in ("exact", "hutchinson", "em")}
    cdds = json.loads((tmp_path / "ionosphere__cdds.json").read_text())
    assert cdds["config"]["osds"]["method"] == "cdds"
    assert {(e["K"], e["weights"]) for e in cdds["evaluations"]} == {(1, "exact")}
    first = next(e for e in osds["evaluations"] if e["K"] == 1 and e["weights"] == "exact")
    assert first["repeats"] == PRESETS["smoke"].eval_repeats and first["nfe"] == 1
    assert math.isfinite(first["log_z"]["mean"]) and math.isfinite(first["abs_delta_log_z"]["mean"])
    assert first["elbo_invalid"] in (True, False)
    assert first["moments"]["mean_error_max"]["n"] == first["repeats"]
    assert first["sinkhorn"]["value"] >= 0 and first["mmd"]["value"] >= 0  # against the NUTS draws
    for key in ("draw_small_s", "draw_small_weighted_s", "draw_large_s"):
        assert osds["timings"][key] > 0

    nuts = json.loads((tmp_path / "ionosphere__nuts.json").read_text())["evaluations"][0]
    assert nuts["ess"]["bulk_min"] > 0 and nuts["ess_per_s"]["mean"] > 0
    laplace = json.loads((tmp_path / "ionosphere__laplace_is.json").read_text())["evaluations"][0]
    assert laplace["num_draws"] == PRESETS["smoke"].laplace_draws and 0 < laplace["ess_per_draw"]["mean"] <= 1

    report = (tmp_path / "report.md").read_text()
    for heading in ("## Headline", "## References", "### log Z (mean ± sd over repeats)", "### |Δ log Z|",
                    "### ELBO (mean log-weight)", "### ELBO > log Z_ref + 3 SE", "### Kish ESS / N", "### PSIS k-hat",
                    "### Posterior mean error", "### Sinkhorn divergence", "### MMD", "### NFE per draw",
                    "### Effective samples per second", "### ESS/s ratio against NUTS", "## Euler-Hutchinson",
                    "## EM path weights", "## Timings", "## NUTS diagnostics"):
        assert heading in report, heading
    for column in ("OSDS K=1", f"OSDS-paper K={T}", "OSDS K=1 (EH)", "OSDS K=1 (EM)", "CDDS K=1", "NUTS",
                   "Laplace IS"):
        assert f" {column} |" in report, column
    assert "| ionosphere |" in report


def test_sinkhorn_and_mmd():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(150, 3, dtype=D64, generator=gen)
    x = torch.randn(150, 3, dtype=D64, generator=gen) + 2.0
    eps = metrics.sinkhorn_epsilon(y)
    value, converged = metrics.sinkhorn_divergence_torch(x, y, eps)
    assert converged and value > 1.0
    same, _ = metrics.sinkhorn_divergence_torch(y, y, eps)
    assert same == pytest.approx(0.0, abs=1e-8)
    pytest.importorskip("ot")
    pot = metrics.sinkhorn_divergence(x, y, eps)
    assert pot["backend"].startswith("pot") and pot["converged"]
    assert pot["value"] == pytest.approx(value, rel=1e-6)
    assert metrics.mmd(y, y)["value"] == pytest.approx(0.0, abs=1e-7)
    assert metrics.mmd(x, y)["value"] > metrics.mmd(y[:75], y[75:])["value"]


def test_weights_and_moments():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=D64)
    mean, sd = metrics.weighted_moments(x, torch.log(torch.tensor([1.0, 3.0], dtype=D64)))
    assert torch.allclose(mean, torch.tensor([1.5, 2.5], dtype=D64))
    assert torch.allclose(sd, torch.full((2,), math.sqrt(0.75), dtype=D64))
    err = metrics.moment_errors(mean, sd, torch.tensor([1.5, 1.5]), torch.tensor([1.0, 2.0]))
    assert err["mean_error_max"] == pytest.approx(0.5) and err["mean_error_median"] == pytest.approx(0.25)
    assert metrics.kish_ess_fraction(torch.zeros(10)) == pytest.approx(1.0)
    assert metrics.elbo_exceeds_reference(1.0, 0.1, 0.0, 0.1) is True
    assert metrics.elbo_exceeds_reference(0.3, 0.1, 0.0, 0.1) is False
    assert metrics.elbo_exceeds_reference(0.3, 0.1, None) is None
    assert metrics.abs_delta_log_z(-1.5, -1.0) == pytest.approx(0.5)
    ms = metrics.mean_sd([1.0, 3.0, math.nan])
    assert ms["mean"] == 2.0 and ms["n"] == 2 and ms["sd"] == pytest.approx(math.sqrt(2.0))
    assert to_jsonable({"a": math.nan, "b": -math.inf, "c": torch.ones(2)}) == {"a": None, "b": "-inf", "c": [1.0, 1.0]}


def test_dis_config_and_presets():
    base = OSDSConfig.preset("smoke", flow_kl_weight=0.5)
    dis = make_dis_config(base)
    assert dis.method == "dis" and dis.objective.diffusion.sd_weight == 0.0 and dis.objective.flow_kl.weight == 0.0
    assert dis.process.grid_size == base.process.grid_size and dis.optim.num_iterations == base.optim.num_iterations
    assert dis.objective.diffusion.weight == 1.0  # the EM path loss is what DIS trains
    assert PRESETS["cpu"].osds_config() == OSDSConfig()
    assert PRESETS["cpu"].paper_config() == OSDSConfig.preset("paper-cpu")
    assert PRESETS["gpu"].paper_config() == OSDSConfig.preset("paper")
    assert PRESETS["smoke"].paper_config().objective.diffusion.weight == 1.0
    assert PRESETS["smoke"].paper_config().optim.num_iterations == OSDSConfig.preset("smoke").optim.num_iterations
    assert PRESETS["cpu"].budgets(32) == (1, 2, 4, 8, 16, 32)
    assert PRESETS["cpu"].repeats(32, "exact") == 5 and PRESETS["gpu"].repeats(128, "exact") == 5
    reduced = dataclasses.replace(PRESETS["cpu"], exact_reduced_above=8)
    assert reduced.repeats(8, "exact") == 5 and reduced.repeats(16, "exact") == 2 and reduced.repeats(16, "em") == 5
    target = get_target("funnel10")
    assert potential_on_device(target.potential, "cpu") is target.potential


def test_multimodal_benchmark_smoke(tmp_path):
    from benchmarks import multimodal

    assert multimodal.main(["--targets", "two_modes_w30_s6_2d", "--variants", "OSDS", "--seeds", "0", "--repeats",
                            "2", "--draws", "300", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "multimodal.json").read_text())["results"][0]
    assert record["components"] == 2 and len(record["records"]) == 2
    assert abs(record["records"][0]["error"]) < 0.1 and record["pooled_mode_weight_error"] < 0.1
    assert "| two_modes_w30_s6_2d | 2 | OSDS | 1 |" in (tmp_path / "multimodal.md").read_text()
