"""Search requests that cannot work are refused before any data or gallery work; what a search prints afterwards is true."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from nas.cli import main
from nas.config import config_from_dict
from nas.errors import ConfigError
from nas.results import summary
from nas.search.driver import run_search
from nas.search.preflight import check_warm_start


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("how", ["flag", "config"])
def test_search_of_zero_trials_is_refused_before_any_work(tmp_path: Path, tiny_config, capsys, how: str) -> None:
    config = tiny_config(tmp_path / "run", search__trials=0 if how == "config" else 3)
    argv = ["search", str(_write(tmp_path / "exp.yaml", config))] + (["--trials", "0"] if how == "flag" else [])
    err = _refused(capsys, argv)
    assert "got 0" in err and "--trials N with N >= 1" in err and f"nas results --study-name tiny --run-dir {tmp_path / 'run'}" in err
    assert not (tmp_path / "run").exists()  # no gallery trained, no study created


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("lcnet_051@32", "timm does not know"),
        ("lcnet_050", "expected 'timm_model@resolution'"),
        ("lcnet_050@x", "expected 'timm_model@resolution'"),
        ("space=mobilenet res=16 width=0.35 stem=16 stages=zz_r1_k3_s1_c16 head=256 embed=32 in=1", "Unknown block type 'zz'"),
        ("space=mobilenet res=16 width=0.35", "missing field(s)"),
        ("space=timm res=32 width=1.0 model=no_such_net embed=32 in=1", "timm does not know"),
        ("space=timm res=32 width=1.0 model=lcnet_050 embed=32 in=3", "the data has 1"),
    ],
)
def test_a_bad_warm_start_is_refused_before_the_gallery(tmp_path: Path, tiny_config, capsys, entry: str, fragment: str) -> None:
    config = tiny_config(tmp_path / "run", search__warm_start=["lcnet_050@32", entry])
    err = _refused(capsys, ["search", str(_write(tmp_path / "exp.yaml", config))])
    assert "search.warm_start" in err and fragment in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="search.warm_start"):  # nas worker and the API check it as early
        run_search(config_from_dict(config), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_good_warm_starts_pass_the_early_check(tmp_path: Path, tiny_config) -> None:
    entries = ["lcnet_050@32", "space=timm res=32 width=0.5 model=lcnet_050 embed=32 in=1"]
    check_warm_start(config_from_dict(tiny_config(tmp_path, search__warm_start=entries)))


@pytest.mark.parametrize("tracking", [True, False])
def test_summary_of_a_study_without_feasible_trials(tmp_path: Path, tiny_config, tracking: bool) -> None:
    config = config_from_dict(tiny_config(tmp_path / "run", tracking__enabled=tracking))
    study = optuna.create_study(study_name="tiny")
    text = summary(study, config)
    assert "No feasible trial has completed yet." in text
    assert "nas export" not in text  # nothing to export
    assert "nas results --study-name tiny --run-dir" in text
    if tracking:
        assert f"Browse the trials in the MLflow UI:\n  .venv/bin/nas ui --run-dir {config.out_dir}" in text
    else:
        assert "Browse" not in text and "nas ui" not in text and "tracking.enabled: true" in text
