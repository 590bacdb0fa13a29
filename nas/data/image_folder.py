"""A folder of images with one sub-folder per class: the ``image_folder`` data set.

Any image format PIL reads (:data:`nas.data.images.IMAGE_SUFFIXES`), resized to
``data.image_size``; split by ``data.protocol`` (:mod:`nas.data.splits`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nas.data.images import IMAGE_ERRORS, IMAGE_SUFFIXES, ImageSet, read_image
from nas.data.registry import DATASETS, DatasetEntry
from nas.errors import DataError

if TYPE_CHECKING:
    from nas.config import DataConfig

__all__ = ["load_image_folder"]


def load_image_folder(path: str | Path, image_size: int, channels: int = 3) -> ImageSet:
    """Load ``path/<class>/<image>`` files, resized to ``image_size`` squared.

    An unreadable image is an error naming the file: a retrieval benchmark with silently
    missing images gives wrong scores.
    """
    root = Path(path)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"Image folder {root} {what}. Set data.path to a folder with one sub-folder of images per class.")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"Image folder {root} has no class sub-folders. Expected {root}/<class name>/<image files>.")
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"Class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        for file in files:
            try:
                images.append(read_image(file, image_size, channels))
            except IMAGE_ERRORS as exc:
                raise DataError(f"Cannot read image {file}: {exc}. Remove or replace the file.") from None
            labels.append(label)
    return ImageSet(
        name=f"image_folder:{root.name}",
        images=np.stack(images),
        labels=np.asarray(labels, dtype=np.int64),
        classes=tuple(p.name for p in class_dirs),
    )


def _read(config: DataConfig) -> ImageSet:
    return load_image_folder(config.resolved_path, config.image_size, config.resolved_channels)


DATASETS.add("image_folder", DatasetEntry.labelled(_read, channels=3))
