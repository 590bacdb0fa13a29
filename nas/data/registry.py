"""The data sets ``data.dataset`` may name, and the one way to load any of them.

Each data set is one :class:`DatasetEntry` in :data:`DATASETS`, registered in the module
that reads its files. An entry says how to load the data set into a
:class:`RetrievalData` (images, split, ground truth) and declares the facts the config
checks before anything is read: whether the data set's files fix its split (its
protocol and whether query and gallery are the same images), whether it has class
labels, its own number of channels and its default path. Adding a data set is one
registered entry (and its test)::

    DATASETS.add("my_set", DatasetEntry.labelled(read_my_set, channels=3))

:func:`load_retrieval_data` loads every data set. This module does not import
:mod:`nas.config` at run time: the config imports :data:`DATASETS` to check names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nas.data.checks import check_scorable
from nas.data.images import ImageSet, Split
from nas.data.splits import PROTOCOLS
from nas.errors import ConfigError, DataError
from nas.registry import Registry

if TYPE_CHECKING:
    from nas.config import DataConfig
    from nas.data.revisited import RevisitedGroundTruth

__all__ = ["RetrievalData", "DatasetEntry", "DATASETS", "load_retrieval_data", "split_dataset"]


@dataclass(frozen=True, eq=False)
class RetrievalData:
    """Images and labels (``data``), their split and, for revisited Oxford/Paris, the ground truth.

    ``files`` are the image paths as the benchmark's files list them (in ``data`` order;
    empty for the labelled data sets). Score a part with :func:`nas.scoring.score_part`.
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


@dataclass(frozen=True)
class DatasetEntry:
    """How to load one data set, and the facts about it the config checks.

    * ``load(config) -> RetrievalData``: reads the data set at ``config.resolved_path``
      (ideally already with ``config.resolved_channels`` channels; other channel counts are
      converted by :func:`load_retrieval_data`).
    * ``protocol``: ``None`` for a labelled data set split by ``data.protocol`` (one of
      :data:`nas.data.splits.PROTOCOLS`); otherwise the protocol its files fix
      (``class_disjoint``, ``revisited``), which ``data.protocol`` may only restate.
    * ``query_is_gallery``: ``None`` when ``data.query_is_gallery`` decides (labelled sets);
      otherwise whether the files make query and gallery the same images.
    * ``has_classes``: false for a data set without class labels (``data.max_per_class``
      must then be null).
    * ``channels``: the data set's own channels (1 or 3), used when ``data.channels`` is null.
    * ``default_path``: ``data.path`` when it is null (``None``: the path must be given).

    Build one with :meth:`labelled` or :meth:`benchmark`.
    """

    load: Callable[[DataConfig], RetrievalData]
    protocol: str | None = None
    query_is_gallery: bool | None = None
    has_classes: bool = True
    channels: int = 3
    default_path: str | None = None

    def __post_init__(self) -> None:
        if (self.protocol is None) != (self.query_is_gallery is None):
            raise ValueError(
                f"A data set's files fix both its protocol and query_is_gallery, or neither, but got "
                f"protocol={self.protocol!r}, query_is_gallery={self.query_is_gallery!r}."
            )
        if self.channels not in (1, 3):
            raise ValueError(f"A data set's channels must be 1 or 3, but got {self.channels!r}.")

    @property
    def fixed_split(self) -> bool:
        """Whether the data set's files define its split (a benchmark), not ``data.protocol``."""
        return self.protocol is not None

    @classmethod
    def labelled(
        cls, read: Callable[[DataConfig], ImageSet], *, channels: int = 3, default_path: str | None = None
    ) -> DatasetEntry:
        """A labelled data set: ``read(config)`` gives its images, ``data.protocol`` splits them."""

        def load(config: DataConfig) -> RetrievalData:
            data = read(config).with_channels(config.resolved_channels)
            return RetrievalData(data, split_dataset(data, config))

        return cls(load, channels=channels, default_path=default_path)

    @classmethod
    def benchmark(
        cls,
        load: Callable[[DataConfig], RetrievalData],
        *,
        protocol: str,
        query_is_gallery: bool,
        has_classes: bool = True,
        channels: int = 3,
        default_path: str | None = None,
    ) -> DatasetEntry:
        """A benchmark: ``load(config)`` gives its images with the split its files define."""
        return cls(load, protocol, query_is_gallery, has_classes, channels, default_path)


#: Every data set ``data.dataset`` may name, in registration order.
DATASETS: Registry[DatasetEntry] = Registry("data.dataset")


def split_dataset(data: ImageSet, config: DataConfig) -> Split:
    """The split ``config`` describes (protocol, fractions, seed, per-class cap) of ``data``.

    Only for the labelled data sets; a benchmark's split comes from its files
    (:func:`load_retrieval_data`).
    """
    if DATASETS.get(config.dataset).fixed_split:
        raise ValueError(f"{config.dataset}'s split is defined by its files: use nas.data.load_retrieval_data.")
    return PROTOCOLS.get(config.resolved_protocol)(data.labels, config)


def load_retrieval_data(config: DataConfig) -> RetrievalData:
    """The data set ``config.dataset`` with its split (a benchmark's own, or ``data.protocol``'s)
    and ``config.resolved_channels`` channels; data that retrieval cannot score (one class in a
    scored part, no query with a positive) is a :class:`DataError` (:func:`nas.data.checks.check_scorable`), as is an
    image file whose header cannot be read (:meth:`~nas.data.sources.ImageSource.check_headers`)."""
    entry = DATASETS.get(config.dataset)
    if config.resolved_path is None:
        raise ConfigError(f"data.path must be set for dataset {config.dataset!r}.")
    retrieval = entry.load(config)
    check_scorable(retrieval)
    retrieval.data.images.check_headers()  # a bad file fails here, before any training (pixels are read later)
    data = retrieval.data.with_channels(config.resolved_channels)
    return retrieval if data is retrieval.data else dataclasses.replace(retrieval, data=data)
