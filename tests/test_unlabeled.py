"""``data.unlabeled``: a folder of images without labels trained on after the split's training images, with the
gallery model's embeddings as targets; refused when it holds a val or query image, or with a loss that needs labels."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nas.config import config_from_dict
from nas.data import load_retrieval_data
from nas.data.unlabeled import JoinedImages, load_unlabeled
from nas.errors import ConfigError, DataError
from nas.records import StudyRecord
from nas.scoring import embed
from nas.search.context import prepare
from nas.search.driver import run_search

SMALL = {"data__max_per_class": 30, "budgets__max_mflops": None, "train__epochs": 1, "search__trials": 1}


def _write_folder(folder: Path, pictures: np.ndarray) -> Path:
    """``pictures`` (N, H, W) uint8 as PNG files in two sub-folders (any layout is read)."""
    for i, picture in enumerate(pictures):
        path = folder / ("a" if i % 2 else "b") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture, "L").save(path)
    return folder


def _new_pictures(config, n: int) -> np.ndarray:
    """``n`` pictures that are in no part of the data: training images transposed."""
    data = load_retrieval_data(config.data)
    return np.stack([data.data.images.pixels(np.array([i]))[0, ..., 0].T.copy() for i in data.split.train[:n]])


def test_the_unlabeled_images_follow_the_training_images_with_the_gallery_embeddings_as_targets(tmp_path, tiny_config, small_gallery) -> None:
    raw = tiny_config(tmp_path, gallery__checkpoint=small_gallery, **SMALL)
    folder = _write_folder(tmp_path / "unlabeled", _new_pictures(config_from_dict(raw), 30))
    raw["data"]["unlabeled"] = str(folder)
    config = config_from_dict(raw)
    logged: list[str] = []
    ctx = prepare(config, log=logged.append)
    training, n_train = ctx.training, len(ctx.split.train)
    assert training.unlabeled == 30 and len(training.indices) == n_train + 30
    assert isinstance(training.source, JoinedImages) and len(training.source) == len(ctx.data.images) + 30
    assert ctx.targets.targets.shape == (n_train + 30, ctx.gallery.embed_dim)
    assert (ctx.targets.labels[n_train:] == -1).all() and (ctx.targets.labels[:n_train] >= 0).all()
    torch.testing.assert_close(ctx.targets.targets[:n_train], torch.from_numpy(ctx.embeddings.train))  # the split's, unchanged
    own = embed(ctx.gallery, load_unlabeled(folder, 1), config.gallery.resolution, ctx.gallery.preprocessing)
    torch.testing.assert_close(ctx.targets.targets[n_train:], torch.from_numpy(own))  # what the gallery model says about them
    # the last streamed index is the folder's last file in sorted order
    last = np.asarray(training.source.open(int(training.indices[-1])))
    assert np.array_equal(last, np.asarray(Image.open(folder / "b" / "028.png")))
    assert "unlabeled" in ctx.fingerprint.parts and "30 images" in ctx.fingerprint.parts["unlabeled"]
    assert any("embedded by the gallery model" in line for line in logged)

    logged.clear()
    again = prepare(config, log=logged.append)
    assert any("loaded from the cache" in line for line in logged)
    torch.testing.assert_close(again.targets.targets, ctx.targets.targets)


def test_a_search_with_unlabeled_images_records_them_and_refuses_a_resume_without(tmp_path, tiny_config, small_gallery) -> None:
    raw = tiny_config(tmp_path, gallery__checkpoint=small_gallery, **SMALL)
    raw["data"]["unlabeled"] = str(_write_folder(tmp_path / "unlabeled", _new_pictures(config_from_dict(raw), 20)))
    study = run_search(config_from_dict(raw), log=lambda _: None)
    record = StudyRecord.load(study)
    assert record.fingerprint["unlabeled"].startswith("20 images") and len(study.trials) == 1
    assert study.trials[0].state.name == "COMPLETE"
    without = copy.deepcopy(raw)
    without["data"]["unlabeled"] = None
    with pytest.raises(ConfigError, match=r"Changed: unlabeled: recorded '20 images.*now 'none'"):
        run_search(config_from_dict(without), log=lambda _: None)


def test_an_unlabeled_folder_holding_a_val_or_query_image_is_refused_before_any_gallery_work(tmp_path, tiny_config, small_gallery) -> None:
    raw = tiny_config(tmp_path, gallery__checkpoint=small_gallery, **SMALL)
    config = config_from_dict(raw)
    data = load_retrieval_data(config.data)
    query = data.data.images.pixels(np.array([data.split.query[3]]))[0, ..., 0]
    pictures = np.concatenate([_new_pictures(config, 4), query[None]])
    raw["data"]["unlabeled"] = str(_write_folder(tmp_path / "unlabeled", pictures))
    with pytest.raises(DataError, match=r"holds 1 of the val or query images.*004\.png is image") as refused:
        prepare(config_from_dict(raw), log=lambda _: None)
    print(refused.value)
    assert not (tmp_path / "cache").exists()  # refused before the gallery model embedded anything


def test_unlabeled_images_need_a_loss_without_labels_and_an_existing_folder(tmp_path, tiny_config, small_gallery) -> None:
    raw = tiny_config(tmp_path, gallery__checkpoint=small_gallery, **SMALL)
    raw["data"]["unlabeled"] = str(_write_folder(tmp_path / "unlabeled", _new_pictures(config_from_dict(raw), 2)))
    raw["train"]["loss"] = {"regression": 1.0, "contrastive": 0.5}
    with pytest.raises(ConfigError, match=r"uses class labels, but data.unlabeled adds images without"):
        prepare(config_from_dict(raw), log=lambda _: None)
    raw["train"]["loss"] = "regression"
    raw["data"]["unlabeled"] = str(tmp_path / "missing")
    with pytest.raises(DataError, match=r"data.unlabeled: .*missing does not exist"):
        prepare(config_from_dict(raw), log=lambda _: None)
    (tmp_path / "empty").mkdir()
    raw["data"]["unlabeled"] = str(tmp_path / "empty")
    with pytest.raises(DataError, match=r"holds no images"):
        prepare(config_from_dict(raw), log=lambda _: None)
