"""Revisited Oxford and Paris (Radenović et al., CVPR 2018): the ``roxford5k`` and ``rparis6k`` data sets.

As their code lays them out: ``gnd_roxford5k.pkl`` (keys ``imlist``, ``qimlist``, ``gnd``;
per query ``easy``, ``hard``, ``junk``, ``bbx``) and ``jpg/<name>.jpg``. The database
images are the gallery; each query image is cropped to its ``bbx`` before anything
else, as ``example_process_images.py`` does. The sets have no training data or labels
(papers train on other data, e.g. SfM-120k): train here is the database images that
are easy, hard or junk for *no* query, and val a seeded part of them scored by
self-retrieval (``Split.val_against == "self"``). A gallery checkpoint must be given.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nas.data.files import dataset_root, need_file, read_listed_images
from nas.data.images import ImageSet, Split
from nas.data.sources import FileImages
from nas.data.registry import DATASETS, DatasetEntry, RetrievalData
from nas.errors import DataError
from nas.metrics import revisited_ground_truth

if TYPE_CHECKING:
    from nas.config import DataConfig

__all__ = ["RevisitedGroundTruth", "load_revisited", "load_roxford5k", "load_rparis6k"]


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
    image_size: int | None,
    channels: int = 3,
    val: float = 0.05,
    seed: int = 0,
) -> RetrievalData:
    """Revisited Oxford (``roxford5k``) or Paris (``rparis6k``): database images are the
    gallery, the ``bbx``-cropped query images follow them; see the module docstring."""
    if name not in ("roxford5k", "rparis6k"):
        raise ValueError(f"name must be 'roxford5k' or 'rparis6k', but got {name!r}.")
    title = {"roxford5k": "Revisited Oxford", "rparis6k": "Revisited Paris"}[name]
    root = dataset_root(path, name, f"gnd_{name}.pkl")
    hint = f"the folder that holds {name}/ (or at {name}/ itself), as the revisitop code lays it out (datasets/{name}/)"
    gnd_file = need_file(root / f"gnd_{name}.pkl", title, f"the revisited ground truth gnd_{name}.pkl (keys imlist, qimlist, gnd)", hint)
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
    database = read_listed_images(title, jpg, [f + ".jpg" for f in imlist], image_size, channels, str(gnd_file) + " imlist")
    queries = read_listed_images(title, jpg, [f + ".jpg" for f in qimlist], image_size, channels, str(gnd_file) + " qimlist", crops=bbx)
    boxes = {n + q: box for q, box in queries.boxes.items()}
    images = FileImages(jpg, database.files + queries.files, channels, boxes=boxes, max_side=image_size, listed_in=str(gnd_file), title=title)
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


def load_roxford5k(path: str | Path, image_size: int | None = None, channels: int = 3, val: float = 0.05, seed: int = 0) -> RetrievalData:
    """Revisited Oxford 5k: see :func:`load_revisited`."""
    return load_revisited(path, "roxford5k", image_size, channels, val, seed)


def load_rparis6k(path: str | Path, image_size: int | None = None, channels: int = 3, val: float = 0.05, seed: int = 0) -> RetrievalData:
    """Revisited Paris 6k: see :func:`load_revisited`."""
    return load_revisited(path, "rparis6k", image_size, channels, val, seed)


# --------------------------------------------------------------------------- registration


def _entry(name: str) -> DatasetEntry:
    """Revisited ``name``: its files fix the split, query and gallery differ, there are no classes."""

    def load(config: DataConfig) -> RetrievalData:
        return load_revisited(config.resolved_path, name, config.image_size, config.resolved_channels, config.val, config.seed)

    return DatasetEntry.benchmark(load, protocol="revisited", query_is_gallery=False, has_classes=False)


DATASETS.add("roxford5k", _entry("roxford5k"))
DATASETS.add("rparis6k", _entry("rparis6k"))
