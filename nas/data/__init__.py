"""Data sets behind one registry, their splits, and preprocessing.

* :mod:`nas.data.images`: :class:`ImageSet` and :class:`Split`;
* :mod:`nas.data.sources`: where pixels come from, one image at a time
  (:class:`ArrayImages` in memory, :class:`FileImages` on disk);
* :mod:`nas.data.decoding`: :func:`~nas.data.decoding.decode`, how every image file becomes the
  8-bit picture a viewer shows (orientation, transparency, 16-bit images), or is refused by name;
* :mod:`nas.data.transforms`: :class:`Preprocessing` (the gallery model's data config) and
  :class:`Augmentation`;
* :mod:`nas.data.loading`: the streaming path, :func:`eval_batches` and
  :class:`StreamingImages` (``DataLoader`` workers decode, augment and resize on the fly);
* :mod:`nas.data.splits`: the labelled data sets' splits, one per ``data.protocol``
  (:data:`PROTOCOLS`);
* :mod:`nas.data.registry`: :data:`DATASETS`, :class:`RetrievalData` and
  :func:`load_retrieval_data`, the one way to load a data set;
* :mod:`nas.data.checks`: :func:`~nas.data.checks.check_scorable`, which refuses data that
  retrieval cannot score (one class in a part, no query with a positive) before training;
* one module per family of data sets, each registering its entries:
  :mod:`~nas.data.fashion_mnist`, :mod:`~nas.data.image_folder`,
  :mod:`~nas.data.benchmarks` (``cub200``, ``sop``, ``inshop``) and
  :mod:`~nas.data.revisited` (``roxford5k``, ``rparis6k``).

Importing this package registers every data set.
"""

from __future__ import annotations

# Each loader module registers its data sets when imported, in this order (the order
# DATASETS lists them in, e.g. in the error for an unknown name).
from nas.data.fashion_mnist import load_fashion_mnist, read_idx
from nas.data.image_folder import load_image_folder
from nas.data.benchmarks import load_cub200, load_inshop, load_sop
from nas.data.revisited import RevisitedGroundTruth, load_revisited, load_roxford5k, load_rparis6k
from nas.data.images import VAL_AGAINST, ImageSet, Split
from nas.data.loading import StreamingImages, eval_batches, resolve_workers
from nas.data.sources import IMAGE_SUFFIXES, ArrayImages, FileImages, ImageReadError, ImageSource
from nas.data.transforms import LEGACY_PREPROCESSING, Augmentation, Preprocessing
from nas.data.registry import DATASETS, DatasetEntry, RetrievalData, load_retrieval_data, split_dataset
from nas.data.splits import PROTOCOLS, class_disjoint_split, stratified_split

__all__ = [
    "ImageSet",
    "Split",
    "RetrievalData",
    "RevisitedGroundTruth",
    "DatasetEntry",
    "DATASETS",
    "PROTOCOLS",
    "load_retrieval_data",
    "split_dataset",
    "stratified_split",
    "class_disjoint_split",
    "ImageSource",
    "ArrayImages",
    "FileImages",
    "ImageReadError",
    "Preprocessing",
    "Augmentation",
    "LEGACY_PREPROCESSING",
    "StreamingImages",
    "eval_batches",
    "resolve_workers",
    "IMAGE_SUFFIXES",
    "VAL_AGAINST",
    "read_idx",
    "load_fashion_mnist",
    "load_image_folder",
    "load_cub200",
    "load_sop",
    "load_inshop",
    "load_revisited",
    "load_roxford5k",
    "load_rparis6k",
]
