"""nas.config: loading, validation, misspelled keys and overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from nas.config import (
    BudgetConfig,
    DataConfig,
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)
from nas.errors import ConfigError, NasError

REPO = Path(__file__).resolve().parents[1]


def write_yaml(tmp_path: Path, data: object, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


# --------------------------------------------------------------------------- defaults and round trip


def test_empty_mapping_gives_defaults() -> None:
    cfg = config_from_dict({})
    assert cfg == ExperimentConfig()
    assert cfg.budgets.max_mflops is None
    assert cfg.space.name == "mobilenet"


def test_empty_file_is_a_config_error(tmp_path: Path) -> None:
    """An empty file is a mistake, not a request for a full default run into the default folder."""
    with pytest.raises(ConfigError, match="is empty"):
        load_config(write_yaml(tmp_path, ""))


def test_config_error_is_a_nas_error_and_a_value_error() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"nope": 1})
    assert isinstance(info.value, NasError)
    assert isinstance(info.value, ValueError)


def test_quickstart_file_loads_and_round_trips() -> None:
    import yaml

    raw = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    cfg = load_config(REPO / "experiments" / "quickstart.yaml")
    assert cfg.budgets.max_mflops == raw["budgets"]["max_mflops"]
    assert cfg.gallery.model == raw["gallery"]["model"]
    assert cfg.train.loss_options == raw["train"]["loss_options"]
    assert cfg.space.options["resolutions"] == raw["space"]["options"]["resolutions"]
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_to_dict_round_trip_of_non_default_values() -> None:
    data = {
        "out": "somewhere",
        "data": {"dataset": "image_folder", "path": "/x", "channels": 3, "max_per_class": 10, "seed": 4},
        "gallery": {"model": "resnet10t", "embed_dim": None, "resolution": 16, "train": {"epochs": 2}},
        "space": {"name": "mobilenet", "options": {"widths": [0.5]}},
        "budgets": {"max_mflops": 2, "max_latency_ms": 1.5, "latency": {"threads": 2, "repeats": 5}},
        "train": {"loss": "regression", "epochs": 1, "optimizer": "sgd", "schedule": "none", "device": "cuda:1"},
        "search": {"study_name": "s", "storage": "sqlite:///x.db", "trials": 0, "timeout": 5, "threads": 1},
        "tracking": {"enabled": False},
    }
    cfg = config_from_dict(data)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert cfg.out_dir == Path("somewhere")
    assert cfg.storage_url == "sqlite:///x.db"
    assert cfg.gallery.embed_dim is None
    assert cfg.data.resolved_channels == 3


def test_ints_are_accepted_for_float_fields_and_become_floats() -> None:
    cfg = config_from_dict({"budgets": {"max_mflops": 3}, "train": {"lr": 1}})
    assert cfg.budgets.max_mflops == 3.0 and isinstance(cfg.budgets.max_mflops, float)
    assert isinstance(cfg.train.lr, float)


def test_resolved_channels_and_path_defaults() -> None:
    assert DataConfig().resolved_channels == 1
    assert DataConfig().resolved_path == "/usr/share/datasets/fashion-mnist"
    assert DataConfig(dataset="image_folder").resolved_channels == 3
    assert DataConfig(dataset="image_folder").resolved_path is None
    assert DataConfig(dataset="image_folder", channels=1).resolved_channels == 1


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("data", "bad", "suggestion"),
    [
        ({"budgets": {"max_mflop": 3}}, "budgets.max_mflop", "max_mflops"),
        ({"budget": {"max_mflops": 3}}, "budget", "budgets"),
        ({"budgets": {"latency": {"thread": 2}}}, "budgets.latency.thread", "threads"),
        ({"budgets": {"latency": {"runtim": "torch"}}}, "budgets.latency.runtim", "runtime"),
        ({"gallery": {"train": {"epoch": 2}}}, "gallery.train.epoch", "epochs"),
        ({"train": {"learning_rat": 0.1, "lr": 0.1}}, "train.learning_rat", None),
        ({"data": {"max_per_clas": 5}}, "data.max_per_clas", "max_per_class"),
        ({"search": {"trails": 3}}, "search.trails", "trials"),
        ({"tracking": {"enable": True}}, "tracking.enable", "enabled"),
    ],
)
def test_unknown_key_names_key_and_nearest_valid_one(data: dict, bad: str, suggestion: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    message = str(info.value)
    assert f"'{bad}'" in message
    if suggestion is not None:
        assert f"Did you mean '{suggestion}'" in message
    # every valid key of that level is listed
    assert "Valid keys here:" in message


def test_unknown_key_far_from_anything_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"budgets": {"zzzzqqqq": 1}})
    assert "'budgets.zzzzqqqq'" in str(info.value)
    assert "Did you mean" not in str(info.value)
    assert "max_mflops" in str(info.value)  # listed among the valid keys


def test_unknown_key_in_file_is_reported(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "budgets:\n  max_mflop: 3\n")
    with pytest.raises(ConfigError, match=r"budgets\.max_mflop.*max_mflops"):
        load_config(path)


# --------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"train": {"epochs": "3"}}, "train.epochs"),
        ({"train": {"epochs": 3.0}}, "train.epochs"),
        ({"train": {"epochs": True}}, "train.epochs"),
        ({"train": {"lr": "fast"}}, "train.lr"),
        ({"train": {"lr": False}}, "train.lr"),
        ({"budgets": {"max_mflops": "3"}}, "budgets.max_mflops"),
        ({"tracking": {"enabled": "yes"}}, "tracking.enabled"),
        ({"tracking": {"enabled": 1}}, "tracking.enabled"),
        ({"gallery": {"model": 18}}, "gallery.model"),
        ({"out": 5}, "out"),
        ({"search": {"threads": 2.5}}, "search.threads"),
        ({"space": {"options": [1, 2]}}, "space.options"),
        ({"train": {"loss_options": "l2"}}, "train.loss_options"),
        ({"data": 5}, "data"),
        ({"budgets": {"latency": [1]}}, "budgets.latency"),
        ({"train": {"epochs": None}}, "train.epochs"),
        ({"space": {"name": None}}, "space.name"),
    ],
)
def test_wrong_types_raise_config_error_naming_the_field(data: dict, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert f"'{where}'" in str(info.value)


@pytest.mark.parametrize("top", [[1, 2], "text", 3, None])
def test_top_level_must_be_a_mapping(top: object) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        config_from_dict(top)  # type: ignore[arg-type]


def test_null_section_means_defaults() -> None:
    cfg = config_from_dict({"budgets": None, "tracking": None})
    assert cfg.budgets == BudgetConfig()


# --------------------------------------------------------------------------- out-of-range values


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"data": {"image_size": 4}}, "data.image_size"),
        ({"data": {"channels": 2}}, "data.channels"),
        ({"data": {"max_per_class": 3}}, "data.max_per_class"),
        ({"data": {"train": 0.0}}, "data.train"),
        ({"data": {"train": 1.0}}, "data.train"),
        ({"data": {"val": -0.1}}, "data.val"),
        ({"data": {"query": float("nan")}}, "data.query"),
        ({"data": {"train": 0.7, "gallery": 0.3}}, "data.train + val + query + gallery"),
        ({"gallery": {"embed_dim": 1}}, "gallery.embed_dim"),
        ({"gallery": {"resolution": 7}}, "gallery.resolution"),
        ({"gallery": {"train": {"epochs": 0}}}, "gallery.train.epochs"),
        ({"gallery": {"train": {"batch_size": 1}}}, "gallery.train.batch_size"),
        ({"gallery": {"train": {"lr": 0}}}, "gallery.train.lr"),
        ({"gallery": {"train": {"scale": -1}}}, "gallery.train.scale"),
        ({"budgets": {"max_mflops": 0}}, "budgets.max_mflops"),
        ({"budgets": {"max_params_m": -1}}, "budgets.max_params_m"),
        ({"budgets": {"max_latency_ms": float("nan")}}, "budgets.max_latency_ms"),
        ({"budgets": {"latency": {"runtime": "gpu"}}}, "budgets.latency.runtime"),
        ({"budgets": {"latency": {"threads": 0}}}, "budgets.latency.threads"),
        ({"budgets": {"latency": {"batch_size": 0}}}, "budgets.latency.batch_size"),
        ({"budgets": {"latency": {"warmup": -1}}}, "budgets.latency.warmup"),
        ({"budgets": {"latency": {"repeats": 2}}}, "budgets.latency.repeats"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"batch_size": 1}}, "train.batch_size"),
        ({"train": {"optimizer": "adam"}}, "train.optimizer"),
        ({"train": {"lr": -0.1}}, "train.lr"),
        ({"train": {"lr": float("nan")}}, "train.lr"),
        ({"train": {"weight_decay": -1}}, "train.weight_decay"),
        ({"train": {"schedule": "linear"}}, "train.schedule"),
        ({"train": {"device": "tpu"}}, "train.device"),
        pytest.param({"search": {"study_name": ""}}, "search.study_name", id="search-name-empty"),
        ({"search": {"trials": -1}}, "search.trials"),
        ({"search": {"timeout": 0}}, "search.timeout"),
        ({"search": {"pruner": "asha"}}, "search.pruner"),
        ({"search": {"keep_best": 0}}, "search.keep_best"),
        ({"search": {"threads": 0}}, "search.threads"),
    ],
)
def test_out_of_range_values_raise_config_error_naming_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert field in str(info.value)
    assert "but got" in str(info.value) or "must not be empty" in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        {"data": {"channels": 1}},
        {"data": {"channels": 3}},
        {"data": {"image_size": 8, "max_per_class": 4}},
        {"data": {"train": 0.25, "val": 0.25, "query": 0.25, "gallery": 0.25}},
        {"budgets": {"latency": {"runtime": "cuda", "warmup": 0, "repeats": 3}}},
        {"train": {"device": "cuda:0", "weight_decay": 0, "schedule": "step"}},
        {"train": {"device": "cpu", "optimizer": "sgd"}},
        {"search": {"trials": 0, "pruner": "none"}},
    ],
)
def test_boundary_values_are_accepted(data: dict) -> None:
    config_from_dict(data)


# --------------------------------------------------------------------------- overrides and files


def test_dotted_overrides_apply_and_none_is_ignored(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"budgets": {"max_mflops": 3.0}, "search": {"trials": 7, "study_name": "a"}})
    cfg = load_config(
        path,
        {
            "budgets.max_mflops": 5.5,
            "budgets.latency.threads": 4,
            "search.trials": None,
            "search.study_name": "b",
            "gallery.checkpoint": None,
            "out": "elsewhere",
        },
    )
    assert cfg.budgets.max_mflops == 5.5
    assert cfg.budgets.latency.threads == 4
    assert cfg.search.trials == 7  # None override ignored
    assert cfg.search.study_name == "b"
    assert cfg.gallery.checkpoint is None
    assert cfg.out == "elsewhere"


def test_override_creates_missing_sections(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"search": {"trials": 2}})
    cfg = load_config(path, {"budgets.latency.repeats": 9, "train.epochs": 2})
    assert cfg.budgets.latency.repeats == 9
    assert cfg.train.epochs == 2


def test_override_does_not_touch_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"search": {"trials": 2}})
    before = path.read_text()
    load_config(path, {"search.trials": 5})
    assert path.read_text() == before
    assert load_config(path).search.trials == 2


def test_misspelled_override_key_is_a_config_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {})
    with pytest.raises(ConfigError, match=r"'budgets\.max_mflop'.*Did you mean 'max_mflops'"):
        load_config(path, {"budgets.max_mflop": 3.0})


def test_invalid_override_value_is_a_config_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {})
    with pytest.raises(ConfigError, match="search.trials"):
        load_config(path, {"search.trials": -3})


def test_override_into_a_null_section(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "budgets:\nsearch:\n  trials: 3\n")
    cfg = load_config(path, {"budgets.max_mflops": 3.0})
    assert cfg.budgets.max_mflops == 3.0


def test_override_below_a_scalar_is_a_config_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "search: 5\n")
    with pytest.raises(ConfigError, match="search"):
        load_config(path, {"search.trials": 3})


def test_missing_file_is_a_clear_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


def test_directory_instead_of_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


@pytest.mark.parametrize("text", ["budgets: {max_mflops: 3\n", "a: b: c\n", "search:\n  trials: 3\n bad_indent: 1\n", "key: [1, 2\n"])
def test_invalid_yaml_is_a_clear_config_error(tmp_path: Path, text: str) -> None:
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid YAML" in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_file_with_non_mapping_top_level_is_a_config_error(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write_yaml(tmp_path, text))


def test_out_dir_and_default_urls() -> None:
    cfg = config_from_dict({"search": {"study_name": "abc"}})
    assert cfg.out_dir == Path("runs") / "abc"
    assert cfg.storage_url.startswith("sqlite:///") and cfg.storage_url.endswith("optuna.db")
    assert cfg.tracking_uri.startswith("sqlite:///") and cfg.tracking_uri.endswith("mlflow.db")
    assert re.search(r"runs/abc/optuna\.db$", cfg.storage_url)


def test_configs_are_frozen() -> None:
    cfg = config_from_dict({})
    with pytest.raises(Exception):
        cfg.train.epochs = 10  # type: ignore[misc]


@pytest.mark.parametrize("name", ["quickstart.yaml", "cluster/distributed.yaml"])
def test_shipped_experiment_files_are_valid(name: str) -> None:
    config = load_config(REPO / "experiments" / name)
    assert config_from_dict(config_to_dict(config)) == config
