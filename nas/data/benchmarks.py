"""The metric-learning retrieval benchmarks in the layouts their authors distribute.

Each loader reads the official files and returns a :class:`~nas.data.registry.RetrievalData`:
the images (files decoded on demand, :class:`~nas.data.sources.FileImages`, like
:func:`nas.data.image_folder.load_image_folder`), their labels and class names, and the
split the benchmark defines (a :class:`~nas.data.images.Split` whose ``val`` is a seeded
part of the training classes, so the search objective is held out from training and
never sees a query).

* ``cub200``: CUB-200-2011 (Wah et al., 2011), ``CUB_200_2011.tgz`` extracted:
  ``images.txt`` (``<image_id> <class folder>/<file>.jpg``), ``image_class_labels.txt``
  (``<image_id> <class_id>``), ``classes.txt`` (``<class_id> <name>``) and ``images/``.
  The metric-learning convention (Song et al., CVPR 2016; Musgrave et al., ECCV 2020):
  classes 1-100 train, classes 101-200 test, query = gallery = the test images
  (``train_test_split.txt`` is not used).
* ``sop``: Stanford Online Products (Song et al., CVPR 2016), ``Ebay_train.txt`` and
  ``Ebay_test.txt`` (header ``image_id class_id super_class_id path``) beside the
  ``<super class>_final/`` image folders. Train and test classes as the files give them
  (disjoint); query = gallery = the test images.
* ``inshop``: In-Shop Clothes Retrieval (Liu et al., DeepFashion, CVPR 2016),
  ``Eval/list_eval_partition.txt`` (a count line, the header ``image_name item_id
  evaluation_status``, then ``<img/...jpg> <item id> <train|query|gallery>``) and the
  images of ``img.zip`` (``img/...``, directly under the folder or under ``Img/``).
  Items are the labels; train, query and gallery as the file gives them.

``max_per_class`` keeps a seeded subset of each class (for In-Shop: of each item in each
of train, query and gallery) so a user can try a benchmark on part of it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nas.data.files import dataset_root, need_file, parse_int, read_listed_images, read_rows
from nas.data.images import ImageSet, Split
from nas.data.registry import DATASETS, DatasetEntry, RetrievalData
from nas.errors import DataError

if TYPE_CHECKING:
    from nas.config import DataConfig

__all__ = ["load_cub200", "load_sop", "load_inshop", "CUB_TRAIN_CLASSES"]

#: CUB-200-2011 class ids trained on in the metric-learning convention; 101-200 are test.
CUB_TRAIN_CLASSES = range(1, 101)
SOP_HEADER = ("image_id", "class_id", "super_class_id", "path")
INSHOP_HEADER = ("image_name", "item_id", "evaluation_status")
INSHOP_STATUSES = ("train", "query", "gallery")


# --------------------------------------------------------------------------- split helpers


def _cap_per_class(indices: np.ndarray, labels: np.ndarray, max_per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    """A seeded subset of at most ``max_per_class`` of ``indices`` per label, sorted."""
    indices = np.asarray(indices, dtype=np.int64)
    if max_per_class is None:
        return np.sort(indices)
    keep = []
    for cls in np.unique(labels[indices]):
        members = indices[labels[indices] == cls]
        keep.append(members if len(members) <= max_per_class else rng.choice(members, max_per_class, replace=False))
    return np.sort(np.concatenate(keep)) if keep else indices[:0]


def _carve_val_classes(
    train: np.ndarray, labels: np.ndarray, val_classes: float, rng: np.random.Generator, title: str
) -> tuple[np.ndarray, np.ndarray]:
    """Move a seeded ``val_classes`` fraction of the training classes (at least two: with one,
    every val image's neighbours would all be positives) to val."""
    classes = np.unique(labels[train])
    if len(classes) < 3:
        raise DataError(f"{title}: the training part has {len(classes)} classes; at least 3 are needed to hold 2 out as val.")
    n_val = min(max(2, int(round(val_classes * len(classes)))), len(classes) - 1)
    chosen = rng.choice(classes, n_val, replace=False)
    in_val = np.isin(labels[train], chosen)
    val = train[in_val]
    if np.unique(labels[val], return_counts=True)[1].max() < 2:
        raise DataError(f"{title}: every val class has a single image, so no val image has a positive. Raise data.max_per_class or data.val_classes.")
    return train[~in_val], val


def _assemble(
    title: str,
    name: str,
    root: Path,
    files: Sequence[str],
    labels: np.ndarray,
    classes: tuple[str, ...],
    parts: dict[str, np.ndarray],
    image_size: int | None,
    channels: int,
    listed_in: str,
    query_is_gallery: bool,
) -> RetrievalData:
    """Read only the images some part uses and re-index the parts into them."""
    used = np.unique(np.concatenate(list(parts.values())))
    position = np.full(len(files), -1, dtype=np.int64)
    position[used] = np.arange(len(used))
    chosen = [files[i] for i in used]
    images = read_listed_images(title, root, chosen, image_size, channels, listed_in)
    split = Split(
        **{part: position[idx] for part, idx in parts.items()},
        query_is_gallery=query_is_gallery,
        val_against="val",
    )
    return RetrievalData(ImageSet(name, images, labels[used].astype(np.int64), classes), split, files=tuple(chosen))


# --------------------------------------------------------------------------- CUB-200-2011


def load_cub200(
    path: str | Path,
    image_size: int | None,
    channels: int = 3,
    max_per_class: int | None = None,
    val_classes: float = 0.1,
    seed: int = 0,
) -> RetrievalData:
    """CUB-200-2011: classes 1-100 train (``val_classes`` of them val), 101-200 query = gallery."""
    title = "CUB-200-2011"
    root = dataset_root(path, "CUB_200_2011", "images.txt")
    hint = "the folder that holds CUB_200_2011/ (or at CUB_200_2011/ itself), as CUB_200_2011.tgz extracts"
    images_txt = need_file(root / "images.txt", title, "the dataset's images.txt ('<image_id> <class folder>/<file>.jpg' per line)", hint)
    labels_txt = need_file(root / "image_class_labels.txt", title, "the dataset's image_class_labels.txt ('<image_id> <class_id>' per line)", hint)
    classes_txt = need_file(root / "classes.txt", title, "the dataset's classes.txt ('<class_id> <class name>' per line)", hint)
    if not (root / "images").is_dir():
        raise DataError(
            f"{title}: {root / 'images'} is missing; expected the image folders (001.Black_footed_Albatross/...) there. "
            f"Point data.path at {hint}."
        )

    paths = {}
    for number, (image_id, rel) in read_rows(images_txt, title, 2, "'<image_id> <class folder>/<file>.jpg'"):
        paths[parse_int(image_id, images_txt, number, title, "image_id")] = rel
    class_of = {}
    for number, (image_id, class_id) in read_rows(labels_txt, title, 2, "'<image_id> <class_id>'"):
        class_of[parse_int(image_id, labels_txt, number, title, "image_id")] = parse_int(class_id, labels_txt, number, title, "class_id")
    names = {}
    for number, (class_id, class_name) in read_rows(classes_txt, title, 2, "'<class_id> <class name>'"):
        names[parse_int(class_id, classes_txt, number, title, "class_id")] = class_name
    missing = sorted(set(paths) - set(class_of))
    if missing:
        raise DataError(f"{title}: image ids {missing[:5]} of {images_txt} have no class in {labels_txt}.")
    unknown = sorted({class_of[i] for i in paths} - set(names))
    if unknown:
        raise DataError(f"{title}: class ids {unknown[:5]} of {labels_txt} are not in {classes_txt}.")

    ids = sorted(paths)
    class_ids = sorted(names)
    label_of = {cid: i for i, cid in enumerate(class_ids)}
    files = [paths[i] for i in ids]
    raw = np.array([class_of[i] for i in ids], dtype=np.int64)
    labels = np.array([label_of[c] for c in raw], dtype=np.int64)
    is_train = np.isin(raw, list(CUB_TRAIN_CLASSES))
    if is_train.all() or not is_train.any():
        raise DataError(
            f"{title}: {images_txt} lists images of {'no' if not is_train.any() else 'only'} classes 1-100; the metric-learning "
            f"split needs classes 1-100 (train) and 101-200 (test). Use the complete images.txt."
        )
    rng = np.random.default_rng(seed)
    train = _cap_per_class(np.flatnonzero(is_train), labels, max_per_class, rng)
    test = _cap_per_class(np.flatnonzero(~is_train), labels, max_per_class, rng)
    train, val = _carve_val_classes(train, labels, val_classes, rng, title)
    parts = {"train": train, "val": val, "query": test, "gallery": test}
    classes = tuple(names[c] for c in class_ids)
    return _assemble(title, "cub200", root / "images", files, labels, classes, parts, image_size, channels, str(images_txt), True)


# --------------------------------------------------------------------------- Stanford Online Products


def load_sop(
    path: str | Path,
    image_size: int | None,
    channels: int = 3,
    max_per_class: int | None = None,
    val_classes: float = 0.1,
    seed: int = 0,
) -> RetrievalData:
    """Stanford Online Products: ``Ebay_train.txt`` train (``val_classes`` of its classes val), ``Ebay_test.txt`` query = gallery."""
    title = "Stanford Online Products"
    root = dataset_root(path, "Stanford_Online_Products", "Ebay_train.txt")
    hint = "the folder that holds Stanford_Online_Products/ (or at Stanford_Online_Products/ itself), as Stanford_Online_Products.zip extracts"
    files: list[str] = []
    raw: list[int] = []
    is_train: list[bool] = []
    for part in ("train", "test"):
        index = need_file(
            root / f"Ebay_{part}.txt",
            title,
            f"the dataset's Ebay_{part}.txt (header 'image_id class_id super_class_id path', then one image per line)",
            hint,
        )
        rows = read_rows(index, title, 4, "'<image_id> <class_id> <super_class_id> <path>'")
        if not rows or tuple(rows[0][1]) != SOP_HEADER:
            first = " ".join(rows[0][1]) if rows else "nothing"
            raise DataError(f"{title}: {index} starts with {first!r}; expected the header line {' '.join(SOP_HEADER)!r}.")
        for number, (_, class_id, _, rel) in rows[1:]:
            raw.append(parse_int(class_id, index, number, title, "class_id"))
            files.append(rel)
            is_train.append(part == "train")
    raw_ids = np.asarray(raw, dtype=np.int64)
    train_mask = np.asarray(is_train)
    if not train_mask.any() or train_mask.all():
        raise DataError(f"{title}: Ebay_{'train' if not train_mask.any() else 'test'}.txt lists no images.")
    shared = np.intersect1d(raw_ids[train_mask], raw_ids[~train_mask])
    if len(shared):
        raise DataError(
            f"{title}: class ids {shared[:5].tolist()} are in both Ebay_train.txt and Ebay_test.txt; the official split is class-disjoint."
        )
    class_ids, labels = np.unique(raw_ids, return_inverse=True)
    rng = np.random.default_rng(seed)
    train = _cap_per_class(np.flatnonzero(train_mask), labels, max_per_class, rng)
    test = _cap_per_class(np.flatnonzero(~train_mask), labels, max_per_class, rng)
    train, val = _carve_val_classes(train, labels, val_classes, rng, title)
    parts = {"train": train, "val": val, "query": test, "gallery": test}
    classes = tuple(str(c) for c in class_ids)
    listed = f"{root / 'Ebay_train.txt'} / Ebay_test.txt"
    return _assemble(title, "sop", root, files, labels.astype(np.int64), classes, parts, image_size, channels, listed, True)


# --------------------------------------------------------------------------- In-Shop Clothes Retrieval


def load_inshop(
    path: str | Path,
    image_size: int | None,
    channels: int = 3,
    max_per_class: int | None = None,
    val_classes: float = 0.1,
    seed: int = 0,
) -> RetrievalData:
    """In-Shop Clothes Retrieval: train (``val_classes`` of its items val), query and gallery as
    ``Eval/list_eval_partition.txt`` gives them; the item ids are the labels."""
    title = "In-Shop Clothes Retrieval"
    root = dataset_root(path, "In-shop Clothes Retrieval Benchmark", "Eval/list_eval_partition.txt")
    hint = "the benchmark's folder, the one that holds Eval/ and img/ (or Img/img/)"
    index = need_file(
        root / "Eval" / "list_eval_partition.txt",
        title,
        "the benchmark's list_eval_partition.txt (a count line, the header 'image_name item_id evaluation_status', then one image per line)",
        hint,
    )
    try:
        lines = [(n, line.split()) for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1) if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{title}: cannot read {index}: {exc}") from None
    if len(lines) < 2 or len(lines[0][1]) != 1 or tuple(lines[1][1]) != INSHOP_HEADER:
        raise DataError(
            f"{title}: {index} must start with two header lines, the number of images and {' '.join(INSHOP_HEADER)!r}, "
            f"but starts with {[' '.join(f) for _, f in lines[:2]]}."
        )
    declared = parse_int(lines[0][1][0], index, lines[0][0], title, "the image count")
    rows = lines[2:]
    if declared != len(rows):
        raise DataError(f"{title}: {index} declares {declared} images but lists {len(rows)}; the file is truncated or edited.")
    files, items, statuses = [], [], []
    for number, fields in rows:
        if len(fields) != 3 or fields[2] not in INSHOP_STATUSES:
            raise DataError(f"{title}: {index} line {number} is {' '.join(fields)!r}; expected '<img/...jpg> <item id> <train|query|gallery>'.")
        files.append(fields[0])
        items.append(fields[1])
        statuses.append(fields[2])
    if not rows:
        raise DataError(f"{title}: {index} lists no images.")
    image_root = root
    if not (root / files[0]).is_file() and (root / "Img" / files[0]).is_file():
        image_root = root / "Img"
    if not (image_root / files[0]).is_file():
        raise DataError(
            f"{title}: {root / files[0]} is missing; expected the images of img.zip extracted there (or under {root / 'Img'}). "
            f"Point data.path at {hint}."
        )
    item_ids, labels = np.unique(np.asarray(items), return_inverse=True)
    status = np.asarray(statuses)
    rng = np.random.default_rng(seed)
    parts = {name: _cap_per_class(np.flatnonzero(status == name), labels, max_per_class, rng) for name in INSHOP_STATUSES}
    for name in INSHOP_STATUSES:
        if len(parts[name]) == 0:
            raise DataError(f"{title}: {index} lists no {name} images.")
    train, val = _carve_val_classes(parts["train"], labels, val_classes, rng, title)
    parts = {"train": train, "val": val, "query": parts["query"], "gallery": parts["gallery"]}
    items = tuple(item_ids.tolist())
    return _assemble(title, "inshop", image_root, files, labels.astype(np.int64), items, parts, image_size, channels, str(index), False)


# --------------------------------------------------------------------------- registration


def _entry(loader: Callable[..., RetrievalData], query_is_gallery: bool) -> DatasetEntry:
    """A class-disjoint benchmark read by ``loader(path, image_size, channels, max_per_class, val_classes, seed)``."""

    def load(config: DataConfig) -> RetrievalData:
        return loader(
            config.resolved_path, config.image_size, config.resolved_channels, config.max_per_class, config.val_classes, config.seed
        )

    return DatasetEntry.benchmark(load, protocol="class_disjoint", query_is_gallery=query_is_gallery)


DATASETS.add("cub200", _entry(load_cub200, query_is_gallery=True))
DATASETS.add("sop", _entry(load_sop, query_is_gallery=True))
DATASETS.add("inshop", _entry(load_inshop, query_is_gallery=False))
