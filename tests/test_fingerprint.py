"""A study records what its numbers depend on; a resume with any of it changed is refused, naming the change,
before any gallery work, and leaves the study as it was."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from nas.config import config_from_dict
from nas.errors import ConfigError
from nas.records import StudyRecord, trial_records
from nas.search.driver import run_search
from nas.search.fingerprint import Fingerprint, check_fingerprint
from nas.search.optuna_setup import load_existing_study

SMALL = {"data__max_per_class": 30, "budgets__max_mflops": None, "train__epochs": 1, "search__trials": 1}


def _cache_files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in (out / "cache").rglob("*") if p.is_file()}


def test_a_resume_with_changed_data_is_refused_before_any_gallery_work_and_names_the_change(tmp_path, tiny_config, small_gallery) -> None:
    raw = tiny_config(tmp_path, gallery__checkpoint=small_gallery, **SMALL)
    config = config_from_dict(raw)
    study = run_search(config, log=lambda _: None)
    record = StudyRecord.load(study)
    assert set(record.fingerprint) == {"data", "split", "loss", "protocol", "preprocessing", "gallery"}
    digest = Fingerprint(record.fingerprint).digest
    assert [r.fingerprint for r in trial_records(study)] == [digest]  # the score carries what it was measured under
    before = (dict(study.user_attrs), len(study.trials), _cache_files(tmp_path))

    changed = copy.deepcopy(raw)
    changed["data"]["max_per_class"] = 25
    with pytest.raises(ConfigError) as refused:
        run_search(config_from_dict(changed), log=lambda _: None)
    message = str(refused.value)
    print(message)
    assert "Changed: split: recorded 'train " in message and "data:" not in message and "--study-name NEW" in message
    study = load_existing_study(config.storage_url, "tiny")
    assert (dict(study.user_attrs), len(study.trials), _cache_files(tmp_path)) == before  # no embedding of the new split, nothing rewritten

    other_loss = copy.deepcopy(raw)
    other_loss["train"]["loss"] = "relational"
    with pytest.raises(ConfigError, match=r"Changed: loss: recorded 'regression"):
        run_search(config_from_dict(other_loss), log=lambda _: None)

    study = run_search(config, log=lambda _: None)  # the same settings resume
    assert len(trial_records(study)) == 2 and {r.fingerprint for r in trial_records(study)} == {digest}


def test_a_study_from_before_fingerprints_gets_one_and_is_checked_from_then_on(tmp_path, tiny_config, small_gallery) -> None:
    raw = tiny_config(tmp_path, gallery__checkpoint=small_gallery, **SMALL)
    study = run_search(config_from_dict(raw), log=lambda _: None)
    study.set_user_attr("fingerprint", None)  # as an older study stored it: no fingerprint
    study = run_search(config_from_dict(raw), log=lambda _: None)
    assert StudyRecord.load(study).fingerprint is not None and len(study.trials) == 2
    changed = copy.deepcopy(raw)
    changed["gallery"]["resolution"] = 20
    with pytest.raises(ConfigError, match=r"gallery: recorded 'resnet18 weights sha256 \w+ at 16 px"):
        run_search(config_from_dict(changed), log=lambda _: None)


def test_differences_name_only_the_changed_parts() -> None:
    recorded = {"data": "a", "split": "b", "loss": "c"}
    assert Fingerprint({"data": "a", "split": "B", "loss": "c", "gallery": "new"}).differences(recorded) == ["split: recorded 'b', now 'B'"]
    check_fingerprint("s", None, Fingerprint({"data": "x"}))  # nothing recorded: nothing to refuse
    check_fingerprint("s", recorded, Fingerprint(recorded))
    with pytest.raises(ConfigError, match="Study 's'.*Changed: data: recorded 'a', now 'x'"):
        check_fingerprint("s", recorded, Fingerprint({**recorded, "data": "x"}))
