"""A folder of images with one sub-folder per class: the ``image_folder`` data set.

Any image format PIL reads (:data:`nas.data.sources.IMAGE_SUFFIXES`), listed once and
decoded on demand (:class:`~nas.data.sources.FileImages`); split by ``data.protocol``
(:mod:`nas.data.splits`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nas.data.images import ImageSet
from nas.data.sources import IMAGE_SUFFIXES, FileImages
from nas.data.registry import DATASETS, DatasetEntry
from nas.errors import DataError

if TYPE_CHECKING:
    from nas.config import DataConfig

__all__ = ["load_image_folder"]


def load_image_folder(path: str | Path, image_size: int | None = None, channels: int = 3) -> ImageSet:
    """List the ``path/<class>/<image>`` files (sorted) as an :class:`ImageSet` of
    :class:`~nas.data.sources.FileImages`; ``image_size``: the longest shorter side an image is
    decoded at (null: its own size).

    Nothing is decoded here: an unreadable image is an error naming the file when a loader
    first reads it (the gallery embedding reads every image once).
    """
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"Image folder {root} {what}. Set data.path to a folder with one sub-folder of images per class.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"Image folder {root} has no class sub-folders. Expected {root}/<class name>/<image files>.")
    files: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise DataError(f"Class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        files.extend(str(p.relative_to(root)) for p in found)
        labels.extend([label] * len(found))
    return ImageSet(
        name=f"image_folder:{root.name}",
        images=FileImages(root, files, channels, max_side=image_size),
        labels=np.asarray(labels, dtype=np.int64),
        classes=tuple(p.name for p in class_dirs),
    )


def _read(config: DataConfig) -> ImageSet:
    return load_image_folder(config.resolved_path, config.image_size, config.resolved_channels)


DATASETS.add("image_folder", DatasetEntry.labelled(_read, channels=3))
