"""Budgets written as a fraction of the gallery model's own figures: resolved once the gallery model is
loaded, printed, recorded in the study as the absolute limit and the fraction written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from nas.config import BudgetConfig, config_from_dict
from nas.errors import ConfigError
from nas.records import StudyRecord, trial_records
from nas.search.driver import run_search


@pytest.mark.parametrize(("written", "fraction"), [("1/10", 0.1), ("10%", 0.1), ("3/4", 0.75), (" 2.5 % ", 0.025)])
def test_a_fraction_of_the_gallery_resolves_against_its_figure(written: str, fraction: float) -> None:
    budgets = BudgetConfig(max_mflops=written, max_params_m=2.0)
    assert budgets.unresolved == {"max_mflops": pytest.approx(fraction)}
    resolved = budgets.resolved({"mflops": 200.0, "params_m": 11.0})
    assert resolved.max_mflops == pytest.approx(200.0 * fraction) and resolved.max_params_m == 2.0
    assert resolved.relative == {"max_mflops": written} and not resolved.unresolved


@pytest.mark.parametrize("bad", ["1/0", "ten", "-1/10", "1/10 of it", True, -3])
def test_a_limit_that_is_neither_a_number_nor_a_fraction_is_refused(bad) -> None:
    with pytest.raises(ConfigError, match=r"'budgets.max_mflops' must be > 0, a fraction of the gallery model's own figure \('1/10'"):
        BudgetConfig(max_mflops=bad)


def test_a_search_with_a_relative_budget_keeps_within_that_share_of_the_gallery(tmp_path, tiny_config, small_gallery) -> None:
    raw = tiny_config(tmp_path, gallery__checkpoint=small_gallery, data__max_per_class=30, budgets__max_mflops="1/4",
                      train__epochs=1, search__trials=2)
    logs: list[str] = []
    study = run_search(config_from_dict(raw), log=logs.append)
    record = StudyRecord.load(study)
    gallery_mflops = record.gallery_budgets["mflops"]
    limit = record.config["budgets"]["max_mflops"]
    assert limit == pytest.approx(gallery_mflops / 4) and record.config["budgets"]["relative"] == {"max_mflops": "1/4"}
    line = next(line for line in logs if line.startswith("Budgets relative to the gallery model"))
    assert f"max_mflops 1/4 of {gallery_mflops:.4g} = {limit:.4g} M multiply-accumulates" in line
    feasible = [r for r in trial_records(study) if r.feasible and r.budgets]
    assert feasible and all(r.budgets["mflops"] <= limit for r in feasible)


def test_the_command_line_takes_a_fraction_and_refuses_nonsense(tmp_path, tiny_config) -> None:
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path / "run")))
    out = subprocess.run([sys.executable, "-m", "nas.cli", "search", str(path), "--max-mflops", "a tenth"], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "'budgets.max_mflops' must be > 0, a fraction of the gallery model's own figure" in out.stderr
    assert not (tmp_path / "run" / "gallery").exists()
