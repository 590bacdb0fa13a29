"""Retrieval benchmarks in the layouts their authors distribute, and split-aware scoring.

Each loader reads the official files and returns a :class:`RetrievalData`: the images
(``uint8 (N, H, W, C)``, resized to ``image_size`` like :func:`nas.data.load_image_folder`),
their labels and class names, the split the benchmark defines (a :class:`nas.data.Split`
whose ``val`` is a seeded part of the training data, so the search objective is held out
from training and never sees a query) and, for revisited Oxford/Paris, the per-query
ground truth.

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
* ``roxford5k`` / ``rparis6k``: revisited Oxford and Paris (Radenović et al., CVPR 2018)
  as their code lays them out: ``gnd_roxford5k.pkl`` (keys ``imlist``, ``qimlist``, ``gnd``;
  per query ``easy``, ``hard``, ``junk``, ``bbx``) and ``jpg/<name>.jpg``. The database
  images are the gallery; each query image is cropped to its ``bbx`` before anything
  else, as ``example_process_images.py`` does. The sets have no training data or labels
  (papers train on other data, e.g. SfM-120k): train here is the database images that
  are easy, hard or junk for *no* query, and val a seeded part of them scored by
  self-retrieval (``Split.val_against == "self"``). A gallery checkpoint must be given.

``max_per_class`` keeps a seeded subset of each class (for In-Shop: of each item in each
of train, query and gallery) so a user can try a benchmark on part of it.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nas.config import BENCHMARKS, DataConfig
from nas.data import ImageSet, Split, load_dataset, split_dataset
from nas.errors import ConfigError, DataError
from nas.metrics import retrieval_metrics, revisited_ground_truth, revisited_protocol_metrics

__all__ = [
    "RetrievalData",
    "RevisitedGroundTruth",
    "load_cub200",
    "load_sop",
    "load_inshop",
    "load_revisited",
    "load_roxford5k",
    "load_rparis6k",
    "load_benchmark",
    "load_retrieval_data",
    "score_part",
    "CUB_TRAIN_CLASSES",
]

#: CUB-200-2011 class ids trained on in the metric-learning convention; 101-200 are test.
CUB_TRAIN_CLASSES = range(1, 101)
SOP_HEADER = ("image_id", "class_id", "super_class_id", "path")
INSHOP_HEADER = ("image_name", "item_id", "evaluation_status")
INSHOP_STATUSES = ("train", "query", "gallery")


@dataclass(frozen=True, eq=False)
class RevisitedGroundTruth:
    """The ``gnd`` of revisited Oxford/Paris: per query, gallery positions of its ``easy``,
    ``hard`` and ``junk`` images (positions into ``split.gallery``), and the ``bbx``
    ``(x1, y1, x2, y2)`` its query image was cropped to."""

    easy: tuple[np.ndarray, ...]
    hard: tuple[np.ndarray, ...]
    junk: tuple[np.ndarray, ...]
    bbx: np.ndarray

    def __len__(self) -> int:
        return len(self.easy)

    def protocol(self, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per-query ``(positives, junk)`` of protocol ``easy``, ``medium`` or ``hard``."""
        return revisited_ground_truth(name, self.easy, self.hard, self.junk)


@dataclass(frozen=True, eq=False)
class RetrievalData:
    """Images and labels (``data``), their split and, for revisited Oxford/Paris, the ground truth.

    ``files`` are the image paths as the benchmark's files list them (in ``data`` order;
    empty for the labelled data sets). Score a part with :func:`score_part`.
    """

    data: ImageSet
    split: Split
    ground_truth: RevisitedGroundTruth | None = None
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.ground_truth is not None and len(self.ground_truth) != len(self.split.query):
            raise DataError(f"{self.data.name}: {len(self.ground_truth)} ground-truth entries for {len(self.split.query)} queries.")

    @property
    def query_is_gallery(self) -> bool:
        """Whether query and gallery are the same images (each query's own entry is excluded)."""
        return self.split.query_is_gallery


# --------------------------------------------------------------------------- files


def _root(path: str | Path, folder: str, marker: str) -> Path:
    """``path`` when it holds ``marker`` or is itself named ``folder``; otherwise ``path/folder``."""
    path = Path(path)
    if (path / marker).is_file() or path.name == folder:
        return path
    return path / folder


def _need(file: Path, title: str, expected: str, hint: str) -> Path:
    if not file.is_file():
        raise DataError(f"{title}: {file} is missing; expected {expected} there. Point data.path at {hint}.")
    return file


def _rows(file: Path, title: str, width: int, expected: str) -> list[tuple[int, list[str]]]:
    """Non-empty lines of ``file`` as ``(line number, fields)``; each must have ``width`` fields."""
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{title}: cannot read {file}: {exc}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != width:
            raise DataError(f"{title}: {file} line {number} is {line.strip()!r}; expected {expected}.")
        rows.append((number, fields))
    return rows


def _int(value: str, file: Path, number: int, title: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{title}: {file} line {number}: {what} must be an integer, but got {value!r}.") from None


def _read_images(
    title: str,
    root: Path,
    files: Sequence[str],
    image_size: int,
    channels: int,
    listed_in: str,
    crops: Sequence[Sequence[float] | None] | None = None,
) -> np.ndarray:
    """``root/file`` for each file, optionally cropped to ``(x1, y1, x2, y2)`` first, as uint8 ``(N, S, S, C)``.

    JPEGs that are not cropped are decoded at a reduced scale no smaller than ``image_size``
    (PIL's ``draft``) before the bilinear resize, which makes large benchmarks load fast.
    """
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    for i, name in enumerate(files):
        file = root / name
        box = None if crops is None else crops[i]
        try:
            with Image.open(file) as img:
                if box is None:
                    img.draft(mode, (image_size, image_size))
                img = img.convert(mode)
                if box is not None:
                    img = img.crop(tuple(float(v) for v in box))  # PIL rounds the box, as the revisited code's crop does
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
                out[i] = np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)
        except FileNotFoundError:
            raise DataError(f"{title}: image {file} (listed in {listed_in}) is missing. Extract all of the dataset's images there.") from None
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:  # PIL's PNG plugin raises SyntaxError
            raise DataError(f"{title}: cannot read image {file} (listed in {listed_in}): {exc}. Replace the file.") from None
    return out


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
    image_size: int,
    channels: int,
    listed_in: str,
    query_is_gallery: bool,
) -> RetrievalData:
    """Read only the images some part uses and re-index the parts into them."""
    used = np.unique(np.concatenate(list(parts.values())))
    position = np.full(len(files), -1, dtype=np.int64)
    position[used] = np.arange(len(used))
    chosen = [files[i] for i in used]
    images = _read_images(title, root, chosen, image_size, channels, listed_in)
    split = Split(
        **{part: position[idx] for part, idx in parts.items()},
        query_is_gallery=query_is_gallery,
        val_against="val",
    )
    return RetrievalData(ImageSet(name, images, labels[used].astype(np.int64), classes), split, files=tuple(chosen))


# --------------------------------------------------------------------------- CUB-200-2011


def load_cub200(
    path: str | Path,
    image_size: int,
    channels: int = 3,
    max_per_class: int | None = None,
    val_classes: float = 0.1,
    seed: int = 0,
) -> RetrievalData:
    """CUB-200-2011: classes 1-100 train (``val_classes`` of them val), 101-200 query = gallery."""
    title = "CUB-200-2011"
    root = _root(path, "CUB_200_2011", "images.txt")
    hint = "the folder that holds CUB_200_2011/ (or at CUB_200_2011/ itself), as CUB_200_2011.tgz extracts"
    images_txt = _need(root / "images.txt", title, "the dataset's images.txt ('<image_id> <class folder>/<file>.jpg' per line)", hint)
    labels_txt = _need(root / "image_class_labels.txt", title, "the dataset's image_class_labels.txt ('<image_id> <class_id>' per line)", hint)
    classes_txt = _need(root / "classes.txt", title, "the dataset's classes.txt ('<class_id> <class name>' per line)", hint)
    if not (root / "images").is_dir():
        raise DataError(
            f"{title}: {root / 'images'} is missing; expected the image folders (001.Black_footed_Albatross/...) there. "
            f"Point data.path at {hint}."
        )

    paths = {}
    for number, (image_id, rel) in _rows(images_txt, title, 2, "'<image_id> <class folder>/<file>.jpg'"):
        paths[_int(image_id, images_txt, number, title, "image_id")] = rel
    class_of = {}
    for number, (image_id, class_id) in _rows(labels_txt, title, 2, "'<image_id> <class_id>'"):
        class_of[_int(image_id, labels_txt, number, title, "image_id")] = _int(class_id, labels_txt, number, title, "class_id")
    names = {}
    for number, (class_id, class_name) in _rows(classes_txt, title, 2, "'<class_id> <class name>'"):
        names[_int(class_id, classes_txt, number, title, "class_id")] = class_name
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
    image_size: int,
    channels: int = 3,
    max_per_class: int | None = None,
    val_classes: float = 0.1,
    seed: int = 0,
) -> RetrievalData:
    """Stanford Online Products: ``Ebay_train.txt`` train (``val_classes`` of its classes val), ``Ebay_test.txt`` query = gallery."""
    title = "Stanford Online Products"
    root = _root(path, "Stanford_Online_Products", "Ebay_train.txt")
    hint = "the folder that holds Stanford_Online_Products/ (or at Stanford_Online_Products/ itself), as Stanford_Online_Products.zip extracts"
    files: list[str] = []
    raw: list[int] = []
    is_train: list[bool] = []
    for part in ("train", "test"):
        index = _need(
            root / f"Ebay_{part}.txt",
            title,
            f"the dataset's Ebay_{part}.txt (header 'image_id class_id super_class_id path', then one image per line)",
            hint,
        )
        rows = _rows(index, title, 4, "'<image_id> <class_id> <super_class_id> <path>'")
        if not rows or tuple(rows[0][1]) != SOP_HEADER:
            first = " ".join(rows[0][1]) if rows else "nothing"
            raise DataError(f"{title}: {index} starts with {first!r}; expected the header line {' '.join(SOP_HEADER)!r}.")
        for number, (_, class_id, _, rel) in rows[1:]:
            raw.append(_int(class_id, index, number, title, "class_id"))
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
    image_size: int,
    channels: int = 3,
    max_per_class: int | None = None,
    val_classes: float = 0.1,
    seed: int = 0,
) -> RetrievalData:
    """In-Shop Clothes Retrieval: train (``val_classes`` of its items val), query and gallery as
    ``Eval/list_eval_partition.txt`` gives them; the item ids are the labels."""
    title = "In-Shop Clothes Retrieval"
    root = _root(path, "In-shop Clothes Retrieval Benchmark", "Eval/list_eval_partition.txt")
    hint = "the benchmark's folder, the one that holds Eval/ and img/ (or Img/img/)"
    index = _need(
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
    declared = _int(lines[0][1][0], index, lines[0][0], title, "the image count")
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


# --------------------------------------------------------------------------- revisited Oxford and Paris


class _GndUnpickler(pickle.Unpickler):
    """Reads a ``gnd_*.pkl`` without running code: only numpy arrays may be rebuilt."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles
        ("builtins", "bytes"),
        ("__builtin__", "bytes"),
        ("numpy.core.numeric", "_frombuffer"),  # arrays in protocol-5 pickles
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a ground-truth file has no use for")


def _gnd_indices(value: Any, n: int, file: Path, title: str, where: str) -> np.ndarray:
    try:
        array = np.asarray(value if value is not None else [], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"{title}: {file}: {where} must be a list of database indices, but got {value!r}.") from None
    if len(array) and (array.min() < 0 or array.max() >= n):
        raise DataError(f"{title}: {file}: {where} holds indices outside the {n} images of imlist.")
    return array


def load_revisited(
    path: str | Path,
    name: str,
    image_size: int,
    channels: int = 3,
    val: float = 0.05,
    seed: int = 0,
) -> RetrievalData:
    """Revisited Oxford (``roxford5k``) or Paris (``rparis6k``): database images are the
    gallery, the ``bbx``-cropped query images follow them; see the module docstring."""
    if name not in ("roxford5k", "rparis6k"):
        raise ValueError(f"name must be 'roxford5k' or 'rparis6k', but got {name!r}.")
    title = {"roxford5k": "Revisited Oxford", "rparis6k": "Revisited Paris"}[name]
    root = _root(path, name, f"gnd_{name}.pkl")
    hint = f"the folder that holds {name}/ (or at {name}/ itself), as the revisitop code lays it out (datasets/{name}/)"
    gnd_file = _need(root / f"gnd_{name}.pkl", title, f"the revisited ground truth gnd_{name}.pkl (keys imlist, qimlist, gnd)", hint)
    if not (root / "jpg").is_dir():
        archives = "oxbuild_images.tgz" if name == "roxford5k" else "paris_1.tgz and paris_2.tgz"
        raise DataError(f"{title}: {root / 'jpg'} is missing; expected the images of {archives} extracted flat into it. Point data.path at {hint}.")
    try:
        with open(gnd_file, "rb") as handle:
            cfg = _GndUnpickler(handle, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, IndexError, TypeError, ValueError) as exc:
        raise DataError(f"{title}: cannot read {gnd_file}: {exc}. Download the file again.") from None
    if not isinstance(cfg, dict) or any(key not in cfg for key in ("imlist", "qimlist", "gnd")):
        found = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise DataError(f"{title}: {gnd_file} must hold a dict with keys imlist, qimlist and gnd, but holds {found}.")
    imlist, qimlist, gnd = [str(x) for x in cfg["imlist"]], [str(x) for x in cfg["qimlist"]], list(cfg["gnd"])
    if len(gnd) != len(qimlist) or not qimlist or not imlist:
        raise DataError(
            f"{title}: {gnd_file} has {len(imlist)} images, {len(qimlist)} queries and {len(gnd)} gnd entries; "
            f"expected one gnd entry per query."
        )
    n = len(imlist)
    easy, hard, junk, bbx = [], [], [], []
    for q, entry in enumerate(gnd):
        where = f"gnd[{q}]"
        if not isinstance(entry, dict) or any(key not in entry for key in ("easy", "hard", "junk", "bbx")):
            found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f"{title}: {gnd_file}: {where} must have keys easy, hard, junk and bbx, but has {found}.")
        easy.append(_gnd_indices(entry["easy"], n, gnd_file, title, where + "['easy']"))
        hard.append(_gnd_indices(entry["hard"], n, gnd_file, title, where + "['hard']"))
        junk.append(_gnd_indices(entry["junk"], n, gnd_file, title, where + "['junk']"))
        try:
            box = np.asarray(entry["bbx"], dtype=np.float64).reshape(4)
        except (TypeError, ValueError):
            raise DataError(f"{title}: {gnd_file}: {where}['bbx'] must be (x1, y1, x2, y2), but got {entry['bbx']!r}.") from None
        bbx.append(box)
    relevant = np.unique(np.concatenate([*easy, *hard, *junk]))
    eligible = np.setdiff1d(np.arange(n), relevant)
    if len(eligible) < 3:
        raise DataError(f"{title}: {len(eligible)} database images are relevant to no query; at least 3 are needed for train and val.")
    rng = np.random.default_rng(seed)
    n_val = min(max(2, int(round(val * len(eligible)))), len(eligible) - 1)  # with one, self-retrieval is trivially perfect
    val_idx = np.sort(rng.choice(eligible, n_val, replace=False))
    train_idx = np.setdiff1d(eligible, val_idx)
    jpg = root / "jpg"
    database = _read_images(title, jpg, [f + ".jpg" for f in imlist], image_size, channels, str(gnd_file) + " imlist")
    queries = _read_images(title, jpg, [f + ".jpg" for f in qimlist], image_size, channels, str(gnd_file) + " qimlist", crops=bbx)
    images = np.concatenate([database, queries])
    split = Split(
        train=train_idx,
        val=val_idx,
        query=n + np.arange(len(qimlist)),
        gallery=np.arange(n),
        val_against="self",
    )
    truth = RevisitedGroundTruth(tuple(easy), tuple(hard), tuple(junk), np.stack(bbx))
    data = ImageSet(name, images, np.full(len(images), -1, dtype=np.int64), ())
    return RetrievalData(data, split, truth, files=tuple(f + ".jpg" for f in imlist + qimlist))


def load_roxford5k(path: str | Path, image_size: int, channels: int = 3, val: float = 0.05, seed: int = 0) -> RetrievalData:
    """Revisited Oxford 5k: see :func:`load_revisited`."""
    return load_revisited(path, "roxford5k", image_size, channels, val, seed)


def load_rparis6k(path: str | Path, image_size: int, channels: int = 3, val: float = 0.05, seed: int = 0) -> RetrievalData:
    """Revisited Paris 6k: see :func:`load_revisited`."""
    return load_revisited(path, "rparis6k", image_size, channels, val, seed)


# --------------------------------------------------------------------------- entry points


def load_benchmark(config: DataConfig) -> RetrievalData:
    """The benchmark ``config.dataset`` (one of :data:`nas.config.BENCHMARKS`) at ``config.path``."""
    if config.dataset not in BENCHMARKS:
        raise ConfigError(f"{config.dataset!r} is not a benchmark; benchmarks: {', '.join(sorted(BENCHMARKS))}.")
    if config.resolved_path is None:
        raise ConfigError(f"data.path must be set for dataset {config.dataset!r}.")
    path, size, channels = config.resolved_path, config.image_size, config.resolved_channels
    if config.dataset in ("roxford5k", "rparis6k"):
        return load_revisited(path, config.dataset, size, channels, config.val, config.seed)
    loader = {"cub200": load_cub200, "sop": load_sop, "inshop": load_inshop}[config.dataset]
    return loader(path, size, channels, config.max_per_class, config.val_classes, config.seed)


def load_retrieval_data(config: DataConfig) -> RetrievalData:
    """Any data set with its split: a benchmark's own, or ``config.protocol``'s for the labelled sets."""
    if config.dataset in BENCHMARKS:
        return load_benchmark(config)
    data = load_dataset(config)
    return RetrievalData(data, split_dataset(data, config))


def score_part(data: RetrievalData, part: str, embeddings: np.ndarray, gallery_side: Any) -> dict[str, float]:
    """Score the embeddings of split part ``part`` (``val`` or ``query``, in split order).

    ``gallery_side`` holds the gallery model's embeddings of the split parts as attributes
    ``val`` and ``gallery`` (a :class:`nas.gallery.GalleryEmbeddings`); ``embeddings`` come
    from the candidate (asymmetric) or from the gallery model itself (paragon).

    * ``query``: against the gallery part; with revisited ground truth, mAP and mP@k under
      the easy, medium and hard protocols (:func:`nas.metrics.revisited_protocol_metrics`),
      else by labels (:func:`nas.metrics.retrieval_metrics`), each query's own entry excluded
      by index when query and gallery are the same images.
    * ``val``: as ``split.val_against`` says: against the gallery part; against val itself
      with each image's own entry excluded; or against val itself with each image's own
      gallery-model embedding its only positive (``self``).
    """
    split, labels = data.split, data.data.labels
    if part not in ("val", "query"):
        raise ValueError(f"part must be 'val' or 'query', but got {part!r}.")
    rows = getattr(split, part)
    if len(embeddings) != len(rows):
        raise ValueError(f"{len(embeddings)} {part} embeddings for {len(rows)} {part} images.")
    if part == "query":
        if data.ground_truth is not None:
            truth = data.ground_truth
            return revisited_protocol_metrics(embeddings, gallery_side.gallery, truth.easy, truth.hard, truth.junk)
        exclude = np.arange(len(rows)) if split.query_is_gallery else None
        return retrieval_metrics(embeddings, labels[rows], gallery_side.gallery, labels[split.gallery], exclude=exclude)
    if split.val_against == "gallery":
        return retrieval_metrics(embeddings, labels[rows], gallery_side.gallery, labels[split.gallery])
    if split.val_against == "val":
        return retrieval_metrics(embeddings, labels[rows], gallery_side.val, labels[rows], exclude=np.arange(len(rows)))
    own = np.arange(len(rows))
    return retrieval_metrics(embeddings, own, gallery_side.val, own)
