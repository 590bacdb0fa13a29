"""nas.data's benchmarks: the loaders on tiny fixtures written in the official layouts,
the class-disjoint and query=gallery split modes, split-aware scoring, and the revisited
Oxford/Paris mAP / mP@k (nas.metrics) on hand-computed cases."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from nas.config import DataConfig, config_from_dict
from nas.data import (
    DATASETS,
    RetrievalData,
    Split,
    class_disjoint_split,
    load_cub200,
    load_inshop,
    load_retrieval_data,
    load_revisited,
    load_roxford5k,
    load_rparis6k,
    load_sop,
    split_dataset,
)
from nas.errors import ConfigError, DataError
from nas.metrics import REVISITED_PROTOCOLS, retrieval_metrics, revisited_ground_truth, revisited_metrics, revisited_protocol_metrics
from nas.scoring import score_part

SIZE = 8  # image_size the loaders resize to


def _color(label: int, k: int) -> tuple[int, int, int]:
    """A flat colour that tells an image's class and number apart after JPEG coding."""
    return ((37 * label) % 200 + 20, 40 * k + 10, 128)


def _write_jpeg(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG", quality=95)


def _mean_color(image: np.ndarray) -> np.ndarray:
    return image.reshape(-1, image.shape[-1]).mean(0)


# --------------------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = (1, 2, 3, 4, 101, 102, 103, 104)  # four train classes, four test classes


def write_cub(parent: Path, per_class: int = 3) -> Path:
    """CUB_200_2011/ as the tgz extracts: all 200 classes named, images of CUB_CLASSES only."""
    root = parent / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{c} {c:03d}.Bird_number_{c}\n" for c in range(1, 201)))
    images, labels, split = [], [], []
    image_id = 0
    for c in CUB_CLASSES:
        for k in range(per_class):
            image_id += 1
            rel = f"{c:03d}.Bird_number_{c}/Bird_Number_{c}_{k:04d}_{1000 + image_id}.jpg"
            _write_jpeg(root / "images" / rel, _color(c, k))
            images.append(f"{image_id} {rel}\n")
            labels.append(f"{image_id} {c}\n")
            split.append(f"{image_id} {k % 2}\n")
    (root / "images.txt").write_text("".join(images))
    (root / "image_class_labels.txt").write_text("".join(labels))
    (root / "train_test_split.txt").write_text("".join(split))  # present in the archive, unused by the convention
    return root


def test_cub_counts_labels_and_split(tmp_path: Path) -> None:
    write_cub(tmp_path)
    got = load_cub200(tmp_path, SIZE)
    assert isinstance(got, RetrievalData)
    data, split = got.data, got.split
    assert data.name == "cub200"
    assert data.images.stack(SIZE).shape == (24, SIZE, SIZE, 3) and True
    assert len(data.classes) == 200 and data.classes[0] == "001.Bird_number_1" and data.classes[199] == "200.Bird_number_200"
    assert sorted(set(data.labels.tolist())) == [c - 1 for c in CUB_CLASSES]
    # classes 1-100 train (two of the four carved out as val: the minimum), 101-200 query = gallery
    assert split.sizes() == {"train": 6, "val": 6, "query": 12, "gallery": 12}
    assert set(data.labels[split.train]) | set(data.labels[split.val]) == {0, 1, 2, 3}
    assert len(set(data.labels[split.val])) == 2 and not set(data.labels[split.val]) & set(data.labels[split.train])
    assert set(data.labels[split.query]) == {100, 101, 102, 103}
    np.testing.assert_array_equal(split.query, split.gallery)
    assert got.query_is_gallery and split.query_is_gallery and split.val_against == "val"
    # the pixels are those of the listed files, in images.txt order
    for i, rel in enumerate(got.files):
        c, k = int(rel[:3]), int(rel.split("_")[-2])
        assert data.labels[i] == c - 1
        np.testing.assert_allclose(_mean_color(data.images.stack(SIZE)[i]), _color(c, k), atol=4)


def test_cub_path_may_be_the_folder_itself_and_loading_is_seeded(tmp_path: Path) -> None:
    root = write_cub(tmp_path)
    a, b = load_cub200(tmp_path, SIZE, seed=3), load_cub200(root, SIZE, seed=3)
    assert a.split.fingerprint() == b.split.fingerprint()
    assert a.data.fingerprint() == b.data.fingerprint()
    vals = {tuple(load_cub200(root, SIZE, seed=s).split.val) for s in range(8)}
    assert len(vals) > 1  # the val class depends on the seed


def test_cub_max_per_class_and_gray(tmp_path: Path) -> None:
    write_cub(tmp_path)
    got = load_cub200(tmp_path, SIZE, channels=1, max_per_class=2)
    assert got.data.images.stack(SIZE).shape == (16, SIZE, SIZE, 1)
    assert np.bincount(got.data.labels).max() == 2
    assert got.split.sizes() == {"train": 4, "val": 4, "query": 8, "gallery": 8}


@pytest.mark.parametrize("name", ["images.txt", "image_class_labels.txt", "classes.txt"])
def test_cub_missing_index_file_is_named(tmp_path: Path, name: str) -> None:
    root = write_cub(tmp_path)
    (root / name).unlink()
    with pytest.raises(DataError) as info:
        load_cub200(tmp_path, SIZE)
    message = str(info.value)
    assert str(root / name) in message and "CUB-200-2011" in message and "data.path" in message


def test_cub_missing_everything_names_the_expected_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_cub200(tmp_path, SIZE)
    assert str(tmp_path / "CUB_200_2011" / "images.txt") in str(info.value)


def test_cub_missing_images_folder_and_missing_image(tmp_path: Path) -> None:
    root = write_cub(tmp_path)
    victim = next((root / "images").rglob("*.jpg"))
    victim.unlink()
    with pytest.raises(DataError) as info:
        load_cub200(tmp_path, SIZE)
    assert str(victim) in str(info.value) and "images.txt" in str(info.value)
    os.rename(root / "images", root / "imgs")
    with pytest.raises(DataError) as info:
        load_cub200(tmp_path, SIZE)
    assert str(root / "images") in str(info.value)


def test_cub_bad_lines_and_inconsistent_files(tmp_path: Path) -> None:
    root = write_cub(tmp_path)
    good = (root / "image_class_labels.txt").read_text()
    (root / "image_class_labels.txt").write_text(good + "25 7 extra\n")
    with pytest.raises(DataError, match="line 25"):
        load_cub200(tmp_path, SIZE)
    (root / "image_class_labels.txt").write_text("\n".join(good.splitlines()[:-1]) + "\n")
    with pytest.raises(DataError, match="no class"):
        load_cub200(tmp_path, SIZE)
    (root / "image_class_labels.txt").write_text(good.replace("\n1 1\n", "\n1 x\n") if "\n1 1\n" in good else "1 x\n" + good[4:])
    with pytest.raises(DataError, match="integer"):
        load_cub200(tmp_path, SIZE)


def test_cub_without_test_classes_is_data_error(tmp_path: Path) -> None:
    root = write_cub(tmp_path)
    lines = (root / "images.txt").read_text().splitlines()[:12]  # the train classes only
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="101-200"):
        load_cub200(tmp_path, SIZE)


# --------------------------------------------------------------------------- Stanford Online Products

SOP_HEADER = "image_id class_id super_class_id path\n"


def write_sop(parent: Path, train_classes=(1, 2, 3, 4), test_classes=(5, 6, 7), per_class: int = 3) -> Path:
    root = parent / "Stanford_Online_Products"
    image_id = 0
    for part, classes in (("train", train_classes), ("test", test_classes)):
        lines = [SOP_HEADER]
        for c in classes:
            superclass, name = (1, "bicycle") if c % 2 else (2, "cabinet")
            for k in range(per_class):
                image_id += 1
                rel = f"{name}_final/{111085122000 + c}_{k}.JPG"
                _write_jpeg(root / rel, _color(c, k))
                lines.append(f"{image_id} {c} {superclass} {rel}\n")
        (root / f"Ebay_{part}.txt").write_text("".join(lines))
    (root / "Ebay_info.txt").write_text("image_id class_id super_class_id path\n")
    return root


def test_sop_counts_labels_and_split(tmp_path: Path) -> None:
    write_sop(tmp_path)
    got = load_sop(tmp_path, SIZE)
    data, split = got.data, got.split
    assert data.images.stack(SIZE).shape == (21, SIZE, SIZE, 3)
    assert data.classes == tuple(str(c) for c in range(1, 8))
    assert split.sizes() == {"train": 6, "val": 6, "query": 9, "gallery": 9}
    assert set(data.labels[split.query]) == {4, 5, 6}
    assert not set(data.labels[split.query]) & set(data.labels[np.concatenate([split.train, split.val])])
    assert got.query_is_gallery and split.val_against == "val"
    np.testing.assert_array_equal(split.query, split.gallery)
    for i, rel in enumerate(got.files):
        c, k = int(rel.split("/")[1].split("_")[0]) - 111085122000, int(rel.split("_")[-1][0])
        np.testing.assert_allclose(_mean_color(data.images.stack(SIZE)[i]), _color(c, k), atol=4)
    capped = load_sop(tmp_path / "Stanford_Online_Products", SIZE, max_per_class=2)
    assert len(capped.data.images) == 14 and np.bincount(capped.data.labels).max() == 2


@pytest.mark.parametrize("name", ["Ebay_train.txt", "Ebay_test.txt"])
def test_sop_missing_index_file_is_named(tmp_path: Path, name: str) -> None:
    root = write_sop(tmp_path)
    (root / name).unlink()
    with pytest.raises(DataError) as info:
        load_sop(tmp_path, SIZE)
    assert str(root / name) in str(info.value) and "image_id class_id super_class_id path" in str(info.value)


def test_sop_header_image_and_class_overlap_errors(tmp_path: Path) -> None:
    root = write_sop(tmp_path)
    text = (root / "Ebay_test.txt").read_text()
    (root / "Ebay_test.txt").write_text(text.replace(SOP_HEADER, ""))
    with pytest.raises(DataError, match="header"):
        load_sop(tmp_path, SIZE)
    (root / "Ebay_test.txt").write_text(text)
    victim = root / "cabinet_final" / f"{111085122000 + 6}_1.JPG"
    victim.unlink()
    with pytest.raises(DataError) as info:
        load_sop(tmp_path, SIZE)
    assert str(victim) in str(info.value)
    other = tmp_path / "other"
    write_sop(other, train_classes=(1, 2, 3), test_classes=(3, 4))
    with pytest.raises(DataError, match="class-disjoint"):
        load_sop(other, SIZE)


# --------------------------------------------------------------------------- In-Shop Clothes Retrieval


def write_inshop(root: Path, under_img_folder: bool = False) -> Path:
    """Eval/list_eval_partition.txt with its two header lines (columns padded with spaces, as
    the released file is) and the images of img.zip under img/ (or Img/img/)."""
    items = {  # item -> [(status, count)]
        "id_00000001": [("train", 3)],
        "id_00000002": [("train", 2)],
        "id_00000003": [("train", 3)],
        "id_00000004": [("train", 2)],
        "id_00000005": [("query", 2), ("gallery", 1)],
        "id_00000006": [("query", 1), ("gallery", 2)],
        "id_00000007": [("query", 1), ("gallery", 1)],
    }
    base = root / "Img" if under_img_folder else root
    rows = []
    for n, (item, parts) in enumerate(items.items()):
        k = 0
        for status, count in parts:
            for _ in range(count):
                rel = f"img/{'WOMEN' if n % 2 else 'MEN'}/Dresses/{item}/{k + 1:02d}_{k + 1}_front.jpg"
                _write_jpeg(base / rel, _color(n, k))
                rows.append(f"{rel:<60}{item} {status}\n")
                k += 1
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(rows))
    return root


@pytest.mark.parametrize("under_img_folder", [False, True])
def test_inshop_counts_labels_and_split(tmp_path: Path, under_img_folder: bool) -> None:
    root = write_inshop(tmp_path / "inshop", under_img_folder)
    got = load_inshop(root, SIZE)
    data, split = got.data, got.split
    assert data.images.stack(SIZE).shape == (18, SIZE, SIZE, 3)
    assert data.classes == tuple(f"id_0000000{i}" for i in range(1, 8))
    assert len(split.train) + len(split.val) == 10 and (len(split.query), len(split.gallery)) == (4, 4)
    assert not got.query_is_gallery and split.val_against == "val"
    assert not set(split.query) & set(split.gallery)
    assert set(data.labels[split.query]) == set(data.labels[split.gallery]) == {4, 5, 6}
    assert len(set(data.labels[split.val])) == 2 and len(set(data.labels[split.train])) == 2
    assert not set(data.labels[split.val]) & set(data.labels[split.train])
    for i, rel in enumerate(got.files):
        n, k = int(rel.split("/")[3][-1]) - 1, int(rel.split("/")[4][:2]) - 1
        np.testing.assert_allclose(_mean_color(data.images.stack(SIZE)[i]), _color(n, k), atol=4)


def test_inshop_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_inshop(tmp_path / "nothing", SIZE)
    assert "Eval/list_eval_partition.txt" in str(info.value) or os.sep.join(["Eval", "list_eval_partition.txt"]) in str(info.value)
    root = write_inshop(tmp_path / "inshop")
    index = root / "Eval" / "list_eval_partition.txt"
    text = index.read_text()
    index.write_text(text.replace("image_name item_id evaluation_status\n", ""))
    with pytest.raises(DataError, match="two header lines"):
        load_inshop(root, SIZE)
    index.write_text(text.replace("18\n", "19\n", 1))
    with pytest.raises(DataError, match="declares 19"):
        load_inshop(root, SIZE)
    index.write_text(text.replace(" query\n", " test\n", 1))
    with pytest.raises(DataError, match="train|query|gallery"):
        load_inshop(root, SIZE)
    index.write_text(text)
    os.rename(root / "img", root / "images")
    with pytest.raises(DataError) as info:
        load_inshop(root, SIZE)
    assert str(root / "img") in str(info.value) and "img.zip" in str(info.value)


# --------------------------------------------------------------------------- revisited Oxford / Paris

IMLIST = [f"all_souls_{i:06d}" for i in range(1, 13)]
QIMLIST = ["all_souls_000013", "radcliffe_camera_000519"]
QUERY_SIZE = (48, 36)
BBX = [(5.4, 4.6, 25.2, 19.5), (20.0, 10.0, 44.0, 30.0)]
GND = [
    {"easy": [0, 1], "hard": [2], "junk": [3]},
    {"easy": [4], "hard": [5, 6], "junk": []},
]


def write_revisited(parent: Path, name: str = "roxford5k", as_numpy: bool = False, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    """datasets/<name>/ as the revisitop code lays it out: gnd_<name>.pkl and jpg/<name>.jpg.
    Query images are black with a white rectangle exactly at their (rounded) bbx."""
    root = parent / name
    for i, image in enumerate(IMLIST):
        _write_jpeg(root / "jpg" / f"{image}.jpg", _color(i, 0), size=(30, 24))
    for image, box in zip(QIMLIST, BBX):
        array = np.zeros((QUERY_SIZE[1], QUERY_SIZE[0], 3), np.uint8)
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        array[y1:y2, x1:x2] = 255
        Image.fromarray(array).save(root / "jpg" / f"{image}.jpg", format="JPEG", quality=100)
    conv = (lambda x: np.asarray(x, dtype=np.int64)) if as_numpy else list
    gnd = [
        {"easy": conv(g["easy"]), "hard": conv(g["hard"]), "junk": conv(g["junk"]), "bbx": np.asarray(b) if as_numpy else list(b)}
        for g, b in zip(GND, BBX)
    ]
    with open(root / f"gnd_{name}.pkl", "wb") as handle:
        pickle.dump({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": gnd}, handle, protocol=protocol)
    return root


@pytest.mark.parametrize(("as_numpy", "protocol"), [(False, 2), (True, 2), (True, pickle.HIGHEST_PROTOCOL)])
def test_revisited_oxford_layout(tmp_path: Path, as_numpy: bool, protocol: int) -> None:
    write_revisited(tmp_path, as_numpy=as_numpy, protocol=protocol)
    got = load_roxford5k(tmp_path, SIZE)
    data, split, truth = got.data, got.split, got.ground_truth
    assert data.images.stack(SIZE).shape == (14, SIZE, SIZE, 3)
    assert data.classes == () and (data.labels == -1).all()
    np.testing.assert_array_equal(split.gallery, np.arange(12))
    np.testing.assert_array_equal(split.query, [12, 13])
    # train + val: the database images relevant to no query (7..11), two of them (the minimum) val
    assert sorted(np.concatenate([split.train, split.val]).tolist()) == [7, 8, 9, 10, 11]
    assert len(split.val) == 2 and split.val_against == "self" and not got.query_is_gallery
    # queries are cropped to their bbx before resizing: only the white rectangle remains
    assert data.images.stack(SIZE)[12:].min() > 200
    for i in range(12):
        np.testing.assert_allclose(_mean_color(data.images.stack(SIZE)[i]), _color(i, 0), atol=4)
    assert got.files[:12] == tuple(f"{n}.jpg" for n in IMLIST) and got.files[12:] == tuple(f"{n}.jpg" for n in QIMLIST)
    assert len(truth) == 2
    np.testing.assert_allclose(truth.bbx, BBX)
    positives, junk = truth.protocol("medium")
    assert [p.tolist() for p in positives] == [[0, 1, 2], [4, 5, 6]] and [j.tolist() for j in junk] == [[3], []]
    positives, junk = truth.protocol("easy")
    assert [p.tolist() for p in positives] == [[0, 1], [4]] and [sorted(j.tolist()) for j in junk] == [[2, 3], [5, 6]]
    positives, junk = truth.protocol("hard")
    assert [p.tolist() for p in positives] == [[2], [5, 6]] and [sorted(j.tolist()) for j in junk] == [[0, 1, 3], [4]]


def test_revisited_paris_and_the_datasets_folder(tmp_path: Path) -> None:
    write_revisited(tmp_path / "datasets", name="rparis6k")
    got = load_rparis6k(tmp_path / "datasets", SIZE, channels=1)
    assert got.data.images.stack(SIZE).shape == (14, SIZE, SIZE, 1) and got.data.name == "rparis6k"
    same = load_revisited(tmp_path / "datasets" / "rparis6k", "rparis6k", SIZE, channels=1)
    assert same.data.fingerprint() == got.data.fingerprint()


def test_revisited_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_roxford5k(tmp_path, SIZE)
    assert str(tmp_path / "roxford5k" / "gnd_roxford5k.pkl") in str(info.value)
    root = write_revisited(tmp_path)
    victim = root / "jpg" / f"{QIMLIST[1]}.jpg"
    victim.unlink()
    with pytest.raises(DataError) as info:
        load_roxford5k(tmp_path, SIZE)
    assert str(victim) in str(info.value) and "qimlist" in str(info.value)
    os.rename(root / "jpg", root / "images")
    with pytest.raises(DataError) as info:
        load_roxford5k(tmp_path, SIZE)
    assert str(root / "jpg") in str(info.value) and "oxbuild_images.tgz" in str(info.value)


def test_revisited_bad_gnd_files(tmp_path: Path) -> None:
    root = write_revisited(tmp_path)
    gnd_file = root / "gnd_roxford5k.pkl"
    with open(gnd_file, "wb") as handle:
        pickle.dump({"imlist": IMLIST, "gnd": []}, handle)
    with pytest.raises(DataError, match="qimlist"):
        load_roxford5k(tmp_path, SIZE)
    with open(gnd_file, "wb") as handle:
        pickle.dump({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": [{"easy": [0], "hard": [], "junk": []}] * 2}, handle)
    with pytest.raises(DataError, match="bbx"):
        load_roxford5k(tmp_path, SIZE)
    with open(gnd_file, "wb") as handle:
        pickle.dump({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": [{"easy": [99], "hard": [], "junk": [], "bbx": BBX[0]}] * 2}, handle)
    with pytest.raises(DataError, match="outside"):
        load_roxford5k(tmp_path, SIZE)
    gnd_file.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=str(gnd_file)):
        load_roxford5k(tmp_path, SIZE)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_revisited_gnd_file_cannot_run_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_revisited(tmp_path)
    monkeypatch.chdir(tmp_path)
    with open(root / "gnd_roxford5k.pkl", "wb") as handle:
        pickle.dump({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": _Exploit()}, handle)
    with pytest.raises(DataError, match="system"):
        load_roxford5k(tmp_path, SIZE)
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- config and the load_* entry points


def test_dataset_names_are_wired() -> None:
    assert DATASETS.names() == ("fashion_mnist", "image_folder", "cub200", "sop", "inshop", "roxford5k", "rparis6k")
    benchmarks = {name for name in DATASETS.names() if DATASETS.get(name).fixed_split}
    assert benchmarks == {"cub200", "sop", "inshop", "roxford5k", "rparis6k"}
    with pytest.raises(ConfigError, match="Did you mean 'cub200'"):
        DataConfig(dataset="cub_200")


def test_config_validation_of_the_new_fields() -> None:
    assert DataConfig().resolved_protocol == "same_classes" and not DataConfig().resolved_query_is_gallery
    assert DataConfig(protocol="class_disjoint").resolved_query_is_gallery
    assert not DataConfig(protocol="class_disjoint", query_is_gallery=False).resolved_query_is_gallery
    assert DataConfig(dataset="cub200").resolved_protocol == "class_disjoint" and DataConfig(dataset="sop").resolved_query_is_gallery
    assert DataConfig(dataset="inshop").resolved_query_is_gallery is False
    assert DataConfig(dataset="roxford5k").resolved_protocol == "revisited"
    assert DataConfig(dataset="cub200", protocol="class_disjoint", query_is_gallery=True).resolved_channels == 3
    for bad in (
        dict(protocol="disjoint"),
        dict(test_classes=1.0),
        dict(val_classes=0.0),
        dict(dataset="cub200", protocol="same_classes"),
        dict(dataset="sop", query_is_gallery=False),
        dict(dataset="inshop", query_is_gallery=True),
        dict(dataset="rparis6k", max_per_class=10),
    ):
        with pytest.raises(ConfigError):
            DataConfig(**bad)
    cfg = config_from_dict({"data": {"dataset": "image_folder", "path": "/x", "protocol": "class_disjoint", "query_is_gallery": False}})
    assert cfg.data.protocol == "class_disjoint" and cfg.data.query_is_gallery is False
    with pytest.raises(ConfigError, match="true or false"):
        config_from_dict({"data": {"query_is_gallery": "yes"}})


def test_load_entry_points_for_a_benchmark(tmp_path: Path) -> None:
    write_cub(tmp_path)
    config = DataConfig(dataset="cub200", path=str(tmp_path), image_size=SIZE, val_classes=0.75, seed=1)
    got = load_retrieval_data(config)
    assert got.split.sizes() == {"train": 3, "val": 9, "query": 12, "gallery": 12}
    assert load_cub200(tmp_path, SIZE, val_classes=0.75, seed=1).split.fingerprint() == got.split.fingerprint()
    with pytest.raises(ValueError, match="load_retrieval_data"):
        split_dataset(got.data, config)
    with pytest.raises(ConfigError, match="data.path"):
        load_retrieval_data(DataConfig(dataset="sop"))
    gray = load_retrieval_data(DataConfig(dataset="cub200", path=str(tmp_path), image_size=SIZE, channels=1)).data
    assert gray.images.stack(SIZE).shape == (24, SIZE, SIZE, 1)


@pytest.mark.parametrize("name", ["cub200", "sop", "inshop", "roxford5k"])
def test_each_benchmark_loads_as_its_entry_declares(tmp_path: Path, name: str) -> None:
    writers = {"cub200": write_cub, "sop": write_sop, "inshop": write_inshop, "roxford5k": write_revisited}
    writers[name](tmp_path)
    entry, config = DATASETS.get(name), DataConfig(dataset=name, path=str(tmp_path), image_size=SIZE)
    got = load_retrieval_data(config)
    assert entry.fixed_split and got.query_is_gallery == entry.query_is_gallery == config.resolved_query_is_gallery
    assert (got.ground_truth is not None) == (entry.protocol == "revisited") == (not entry.has_classes)


# --------------------------------------------------------------------------- class-disjoint and query=gallery on real data


def _digits(digits_dir: Path, **fields) -> RetrievalData:
    return load_retrieval_data(DataConfig(dataset="fashion_mnist", path=str(digits_dir), **fields))


def test_class_disjoint_split_on_digits(digits_dir: Path) -> None:
    got = _digits(digits_dir, protocol="class_disjoint", seed=0)
    labels, split = got.data.labels, got.split
    train, val, test = (set(labels[p].tolist()) for p in (split.train, split.val, split.query))
    assert len(test) == 5 and len(val) == 2 and len(train) == 3  # half the classes held out; val: 10% of the rest, at least 2
    assert not train & val and not train & test and not val & test
    np.testing.assert_array_equal(split.query, split.gallery)
    assert split.query_is_gallery and split.val_against == "val"
    assert sum(len(p) for p in (split.train, split.val, split.query)) == len(labels) == 1797
    again, other = _digits(digits_dir, protocol="class_disjoint", seed=0), _digits(digits_dir, protocol="class_disjoint", seed=1)
    assert again.split.fingerprint() == split.fingerprint() and other.split.fingerprint() != split.fingerprint()


def test_class_disjoint_with_separate_query_and_gallery(digits_dir: Path) -> None:
    got = _digits(digits_dir, protocol="class_disjoint", query_is_gallery=False, max_per_class=40, test_classes=0.3)
    labels, split = got.data.labels, got.split
    assert not split.query_is_gallery and not set(split.query) & set(split.gallery)
    assert set(labels[split.query]) == set(labels[split.gallery]) and len(set(labels[split.query])) == 3
    for cls in set(labels[split.query]):
        n_query, n_gallery = (int((labels[p] == cls).sum()) for p in (split.query, split.gallery))
        assert (n_query, n_gallery) == (int(np.floor(0.1 / 0.35 * 40)), 40 - int(np.floor(0.1 / 0.35 * 40)))
    used = np.concatenate([split.train, split.val, split.query, split.gallery])
    assert len(np.unique(used)) == len(used) and np.bincount(labels[used]).max() == 40


def test_same_classes_with_query_is_gallery_pools_query_and_gallery(digits_dir: Path) -> None:
    plain, pooled = _digits(digits_dir), _digits(digits_dir, query_is_gallery=True)
    np.testing.assert_array_equal(pooled.split.query, np.sort(np.concatenate([plain.split.query, plain.split.gallery])))
    np.testing.assert_array_equal(pooled.split.query, pooled.split.gallery)
    np.testing.assert_array_equal(pooled.split.train, plain.split.train)
    assert pooled.split.val_against == "gallery" and not plain.split.query_is_gallery


def test_class_disjoint_split_errors() -> None:
    with pytest.raises(DataError, match="at least 5 classes"):
        class_disjoint_split(np.repeat(np.arange(4), 5), 0.5, 0.1, 0.1, 0.25, seed=0)
    with pytest.raises(DataError, match="one image"):
        class_disjoint_split(np.arange(6), 0.5, 0.3, 0.1, 0.25, seed=0)
    with pytest.raises(ValueError, match="same index array"):
        Split(np.arange(2), np.arange(2, 4), np.arange(4, 6), np.arange(6, 8), query_is_gallery=True)
    with pytest.raises(ValueError, match="val_against"):
        Split(np.arange(2), np.arange(2, 4), np.arange(4, 6), np.arange(6, 8), val_against="train")


# --------------------------------------------------------------------------- split-aware scoring


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _class_embeddings(labels: np.ndarray, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((int(labels.max()) + 1, 16))
    return _unit(centers[labels] + noise * rng.standard_normal((len(labels), 16)))


def test_score_part_excludes_each_query_by_index(digits_dir: Path) -> None:
    got = _digits(digits_dir, protocol="class_disjoint", max_per_class=30)
    labels, split = got.data.labels, got.split
    everything = _class_embeddings(labels, noise=2.0, seed=0)  # the "gallery model" on every image
    side = SimpleNamespace(val=everything[split.val], gallery=everything[split.gallery])
    paragon = score_part(got, "query", everything[split.query], side)
    expected = retrieval_metrics(everything[split.query], labels[split.query], side.gallery, labels[split.gallery], exclude=np.arange(len(split.query)))
    assert paragon == pytest.approx(expected)
    # without the exclusion every query would find its own copy first
    assert retrieval_metrics(everything[split.query], labels[split.query], side.gallery, labels[split.gallery])["R@1"] == 1.0
    assert paragon["R@1"] < 1.0 and paragon["queries"] == len(split.query)
    val = score_part(got, "val", everything[split.val], side)
    assert val == pytest.approx(retrieval_metrics(side.val, labels[split.val], side.val, labels[split.val], exclude=np.arange(len(split.val))))
    assert val["R@1"] < 1.0
    with pytest.raises(ValueError, match="embeddings"):
        score_part(got, "query", everything[split.val], side)


def test_score_part_same_classes_val_against_gallery(digits_dir: Path) -> None:
    got = _digits(digits_dir, max_per_class=40)
    labels, split = got.data.labels, got.split
    emb = _class_embeddings(labels, noise=1.5, seed=1)
    side = SimpleNamespace(val=emb[split.val], gallery=emb[split.gallery])
    assert score_part(got, "val", emb[split.val], side) == pytest.approx(
        retrieval_metrics(emb[split.val], labels[split.val], emb[split.gallery], labels[split.gallery])
    )
    assert score_part(got, "query", emb[split.query], side) == pytest.approx(
        retrieval_metrics(emb[split.query], labels[split.query], emb[split.gallery], labels[split.gallery])
    )


def test_score_part_on_revisited(tmp_path: Path) -> None:
    write_revisited(tmp_path)
    got = load_roxford5k(tmp_path, SIZE)
    split = got.split
    gallery = _unit(np.random.default_rng(0).standard_normal((12, 8)))
    query = _unit(np.stack([gallery[[0, 1, 2]].sum(0), gallery[[4, 5, 6]].sum(0)]))  # near their medium positives
    side = SimpleNamespace(val=gallery[split.val], gallery=gallery)
    scores = score_part(got, "query", query, side)
    truth = got.ground_truth
    assert scores == pytest.approx(revisited_protocol_metrics(query, gallery, truth.easy, truth.hard, truth.junk))
    assert scores["mAP"] == scores["mAP_medium"]
    # self-retrieval on val: the gallery model's own embedding is the only positive
    val_scores = score_part(got, "val", side.val, side)
    assert val_scores["mAP"] == 1.0 and val_scores["R@1"] == 1.0


# --------------------------------------------------------------------------- revisited mAP / mP@k by hand


def _ranked_gallery(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A query and ``n`` gallery embeddings it ranks exactly 0, 1, ..., n-1 (distinct scores)."""
    angles = np.linspace(0.0, 1.2, n)
    return np.array([[1.0, 0.0]], np.float32), np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)


def test_revisited_map_removes_junk_before_ranking() -> None:
    query, gallery = _ranked_gallery(6)
    # ranking g0 (junk), g1 (pos), g2, g3, g4 (pos), g5; without the junk image the positives sit at ranks 0 and 3
    got = revisited_metrics(query, gallery, [np.array([1, 4])], [np.array([0])])
    assert got["mAP"] == pytest.approx((1.0 + (1 / 3 + 2 / 4) / 2) / 2)  # 17/24
    assert got["mP@1"] == 1.0 and got["mP@5"] == pytest.approx(0.5) and got["mP@10"] == pytest.approx(0.5)
    # the same ranking with g0 a plain negative: positives at ranks 1 and 4
    plain = revisited_metrics(query, gallery, [np.array([1, 4])], [np.array([], np.int64)])
    assert plain["mAP"] == pytest.approx(((0 + 1 / 2) / 2 + (1 / 4 + 2 / 5) / 2) / 2)  # 0.2875
    assert plain["mP@1"] == 0.0 and plain["mP@5"] == pytest.approx(2 / 5)
    # junk below every positive changes nothing; it matches retrieval_metrics' AP then
    after = revisited_metrics(query, gallery, [np.array([1, 4])], [np.array([5])])
    assert after["mAP"] == pytest.approx(plain["mAP"])
    labels = np.array([0, 1, 0, 0, 1, 0])
    assert plain["mAP"] == pytest.approx(retrieval_metrics(query, np.array([1]), gallery, labels)["mAP"])


def test_revisited_protocols_by_hand() -> None:
    query, gallery = _ranked_gallery(8)
    easy, hard, junk = [np.array([0, 5])], [np.array([2, 6])], [np.array([3])]
    got = revisited_protocol_metrics(query, gallery, easy, hard, junk)
    # easy: positives 0, 5; junk 3, 2, 6 -> remaining ranking 0 1 4 5 7, positives at ranks 0 and 3
    assert got["mAP_easy"] == pytest.approx(17 / 24)
    assert (got["mP@1_easy"], got["mP@5_easy"], got["mP@10_easy"]) == pytest.approx((1.0, 0.5, 0.5))
    # medium: positives 0, 2, 5, 6; junk 3 -> ranks 0, 2, 4, 5
    assert got["mAP_medium"] == pytest.approx((1 + 7 / 12 + 11 / 20 + 19 / 30) / 4)  # 83/120
    assert (got["mP@1_medium"], got["mP@5_medium"], got["mP@10_medium"]) == pytest.approx((1.0, 3 / 5, 4 / 6))
    # hard: positives 2, 6; junk 3, 0, 5 -> remaining ranking 1 2 4 6 7, positives at ranks 1 and 3
    assert got["mAP_hard"] == pytest.approx(1 / 3)
    assert (got["mP@1_hard"], got["mP@5_hard"], got["mP@10_hard"]) == pytest.approx((0.0, 0.5, 0.5))
    assert got["mAP"] == got["mAP_medium"] and got["queries"] == 1 and got["skipped"] == 0
    assert set(REVISITED_PROTOCOLS) == {"easy", "medium", "hard"}


def test_revisited_skips_queries_without_positives() -> None:
    query, gallery = _ranked_gallery(6)
    two = np.concatenate([query, query])
    got = revisited_metrics(two, gallery, [np.array([1, 4]), np.array([], np.int64)], [np.array([0]), np.array([2])])
    assert got["queries"] == 1 and got["skipped"] == 1
    assert got["mAP"] == pytest.approx(17 / 24)
    with pytest.raises(ValueError, match="positive"):
        revisited_metrics(query, gallery, [np.array([], np.int64)], [np.array([0])])
    with pytest.raises(ValueError, match="gallery indices"):
        revisited_metrics(query, gallery, [np.array([6])], [np.array([], np.int64)])
    with pytest.raises(ValueError, match="protocol"):
        revisited_ground_truth("medium-hard", easy=[[0]], hard=[[1]], junk=[[2]])


def _compute_map_reference(scores: np.ndarray, positives: list, junk: list, kappas=(1, 5, 10)):
    """The revisited Oxford/Paris compute_map, written out from its definition: ranks from a
    full argsort, each positive's 0-based position lowered by the junk images above it,
    trapezoidal AP with recall step 1/len(positives), mP@k with k capped at the last positive."""
    ranks = np.argsort(-scores, axis=1)
    aps, prs = [], []
    for i in range(len(scores)):
        ok, bad = set(positives[i].tolist()), set(junk[i].tolist())
        if not ok:
            continue
        pos, junk_seen = [], 0
        for position, g in enumerate(ranks[i]):
            if g in ok:
                pos.append(position - junk_seen)
            if g in bad:  # counts for the positives below it, even when it is a positive itself
                junk_seen += 1
        ap = 0.0
        for j, rank in enumerate(pos):
            precision_0 = 1.0 if rank == 0 else j / rank
            precision_1 = (j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) / (2 * len(ok))
        aps.append(ap)
        one_based = np.array(pos) + 1
        prs.append([(one_based <= min(one_based.max(), k)).sum() / min(one_based.max(), k) for k in kappas])
    return float(np.mean(aps)), np.mean(prs, axis=0)


@pytest.mark.parametrize("seed", range(4))
def test_revisited_metrics_match_the_reference_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    query, gallery = _unit(rng.standard_normal((9, 6))), _unit(rng.standard_normal((40, 6)))
    easy, hard, junk = [], [], []
    for _ in range(9):
        chosen = rng.permutation(40)
        a, b, c = rng.integers(0, 6, size=3)
        easy.append(chosen[:a])
        hard.append(chosen[a : a + b])
        extra = chosen[:1] if seed % 2 else chosen[:0]  # odd seeds: the first easy image (if any) is junk too
        junk.append(np.concatenate([extra if a > 0 else chosen[:0], chosen[a + b : a + b + c]]))
    scores = query.astype(np.float64) @ gallery.astype(np.float64).T
    for protocol in REVISITED_PROTOCOLS:
        positives, junk_lists = revisited_ground_truth(protocol, easy, hard, junk)
        if not any(len(p) for p in positives):
            continue
        expected_map, expected_pr = _compute_map_reference(scores, positives, junk_lists)
        got = revisited_metrics(query, gallery, positives, junk_lists, chunk=4)
        assert got["mAP"] == pytest.approx(expected_map, abs=1e-9)
        assert [got["mP@1"], got["mP@5"], got["mP@10"]] == pytest.approx(expected_pr.tolist(), abs=1e-9)
