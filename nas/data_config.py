"""The ``data``, ``gallery`` and image sections of an experiment file (re-exported by :mod:`nas.config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nas.data.registry import DATASETS
from nas.data.splits import PROTOCOLS
from nas.data.transforms import INTERPOLATIONS
from nas.typed_config import check_config as _check

__all__ = ["DataConfig", "GalleryTrainConfig", "GalleryConfig", "PreprocessingConfig", "AugmentConfig"]


@dataclass(frozen=True)
class DataConfig:
    """Which images, and how they are split into train / val / query / gallery.

    ``protocol`` (labelled data sets; null means ``same_classes``):

    * ``same_classes``: ``train``, ``val``, ``query`` and ``gallery`` are fractions of every
      class (the split is stratified); val is searched against the gallery part.
    * ``class_disjoint``: a seeded ``test_classes`` fraction of the classes (at least 2) is
      held out for query and gallery; a seeded ``val_classes`` fraction of the remaining
      classes (at least 2) forms val (searched against itself, each image's own entry
      excluded); the rest is train. ``held_out_classes: last`` holds out the last
      ``test_classes`` of the classes in label order (an image folder's: by name) instead
      of a seeded choice, as CUB-200 and Cars-196 hold out their second half.
      ``train`` is unused; with ``query_is_gallery`` false each held-out class is split
      query : gallery in the ratio ``query`` : ``gallery``.

    ``query_is_gallery`` (null: false for ``same_classes``, true for ``class_disjoint``, the
    metric-learning convention) makes query and gallery the same images, each query's own
    gallery entry excluded by index when scoring.

    The data sets are those of :data:`nas.data.DATASETS`; each entry declares the facts
    checked here. The benchmarks (``cub200``, ``sop``, ``inshop``, ``roxford5k``,
    ``rparis6k``) take their split from their own files, so ``protocol`` and
    ``query_is_gallery`` may only restate it;
    ``val_classes`` of their training classes form val (``val`` of the training images for
    the unlabelled revisited Oxford/Paris sets).

    ``max_per_class`` caps how many images of each class are used at all. ``val`` images
    are held out from training and drive the search objective; ``query`` images are only
    used for the final, reported scores. Image files stay on disk and are decoded on the fly
    (:mod:`nas.data.loading`); ``image_size``, when set, caps the shorter side an image file
    is decoded at (a JPEG is then decoded at a reduced scale: fast for large photos; null:
    its own size; the in-memory Fashion-MNIST keeps its 28x28). ``workers``: loader worker
    processes that decode image files (null: the cores PyTorch's threads leave free, at most 4:
    none on a 2-core machine, where decoding in the training process is fastest; set it on a
    GPU machine; in-memory data uses none).
    ``channels`` null means the data set's own (1 for Fashion-MNIST, 3 otherwise).

    ``unlabeled``: a folder of images without labels (searched recursively, e.g. a user's own
    database photos) added to the training images of every candidate and of the supernet. The
    gallery model embeds them once (cached beside its other embeddings); they are distillation
    images only, so the loss must need no labels (``regression``, ``relational``, ``csd``).
    None of them may be a val or query image (checked by content before any training).
    """

    dataset: str = "fashion_mnist"
    path: str | None = None
    image_size: int | None = None
    workers: int | None = None
    channels: int | None = None
    max_per_class: int | None = None
    train: float = 0.6
    val: float = 0.05
    query: float = 0.1
    gallery: float = 0.25
    seed: int = 0
    protocol: str | None = None
    query_is_gallery: bool | None = None
    test_classes: float = 0.5
    val_classes: float = 0.1
    held_out_classes: str = "seeded"
    unlabeled: str | None = None

    def __post_init__(self) -> None:
        entry = DATASETS.get(self.dataset)
        if self.protocol is not None:
            PROTOCOLS.check(self.protocol)
        for name in ("test_classes", "val_classes"):
            value = getattr(self, name)
            _check(0.0 < value < 1.0, f"data.{name} must be a fraction in (0, 1), but got {value}.")
        if entry.fixed_split:
            protocol, same = entry.protocol, entry.query_is_gallery
            _check(
                self.protocol is None or self.protocol == protocol,
                f"data.protocol must be null for dataset {self.dataset!r}: its files fix the split "
                f"({protocol}), but got {self.protocol!r}.",
            )
            _check(
                self.query_is_gallery is None or self.query_is_gallery == same,
                f"data.query_is_gallery must be null for dataset {self.dataset!r}: its query and gallery are "
                f"{'the same' if same else 'different'} images, but got {self.query_is_gallery}.",
            )
        _check(
            entry.has_classes or self.max_per_class is None,
            f"data.max_per_class must be null for dataset {self.dataset!r} (it has no classes), but got {self.max_per_class}.",
        )
        _check(self.image_size is None or self.image_size >= 8, f"data.image_size must be >= 8 or null, but got {self.image_size}.")
        _check(self.held_out_classes in ("seeded", "last"), f"data.held_out_classes must be 'seeded' or 'last', but got {self.held_out_classes!r}.")
        _check(self.unlabeled is None or bool(str(self.unlabeled).strip()), "data.unlabeled must be a folder of images or null, but got ''.")
        _check(self.workers is None or self.workers >= 0, f"data.workers must be >= 0 or null, but got {self.workers}.")
        _check(self.seed >= 0, f"data.seed must be >= 0, but got {self.seed}.")  # numpy's generators refuse it, after loading
        _check(self.channels in (None, 1, 3), f"data.channels must be 1, 3 or null, but got {self.channels}.")
        _check(
            self.max_per_class is None or self.max_per_class >= 4,
            f"data.max_per_class must be >= 4 or null, but got {self.max_per_class}.",
        )
        for name in ("train", "val", "query", "gallery"):
            value = getattr(self, name)
            _check(0.0 < value < 1.0, f"data.{name} must be a fraction in (0, 1), but got {value}.")
        total = self.train + self.val + self.query + self.gallery
        _check(total <= 1.0 + 1e-9, f"data.train + val + query + gallery must be <= 1, but got {total:.3f}.")

    @property
    def resolved_channels(self) -> int:
        """``channels``, or the data set's own (1 for Fashion-MNIST, 3 for image folders)."""
        if self.channels is not None:
            return self.channels
        return DATASETS.get(self.dataset).channels

    @property
    def resolved_protocol(self) -> str:
        """``same_classes`` or ``class_disjoint``; a benchmark's own (``revisited`` for Oxford/Paris)."""
        entry = DATASETS.get(self.dataset)
        if entry.fixed_split:
            return entry.protocol
        return self.protocol or "same_classes"

    @property
    def resolved_query_is_gallery(self) -> bool:
        """Whether query and gallery are the same images (then each query's own entry is excluded)."""
        entry = DATASETS.get(self.dataset)
        if entry.fixed_split:
            return entry.query_is_gallery
        if self.query_is_gallery is not None:
            return self.query_is_gallery
        return self.resolved_protocol == "class_disjoint"

    @property
    def resolved_path(self) -> str | None:
        """``path``, or the data set's default (Fashion-MNIST's Debian package folder)."""
        if self.path is not None:
            return self.path
        return DATASETS.get(self.dataset).default_path


@dataclass(frozen=True)
class GalleryTrainConfig:
    """How ``nas gallery train`` trains a gallery model when the user has no checkpoint."""

    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    scale: float = 16.0

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"gallery.train.epochs must be >= 1, but got {self.epochs}.")
        _check(self.batch_size >= 2, f"gallery.train.batch_size must be >= 2, but got {self.batch_size}.")
        _check(self.lr > 0, f"gallery.train.lr must be > 0, but got {self.lr}.")
        _check(self.scale > 0, f"gallery.train.scale must be > 0, but got {self.scale}.")


@dataclass(frozen=True)
class PreprocessingConfig:
    """``gallery.preprocessing``: the gallery model's input normalisation and resizing, when
    it is not the one timm resolves for the model (see :class:`nas.data.Preprocessing`)."""

    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        _check(len(self.mean) in (1, 3) and len(self.std) == len(self.mean), f"gallery.preprocessing.mean and std must both have 1 or 3 values, but got {self.mean} and {self.std}.")
        _check(all(v > 0 for v in self.std), f"gallery.preprocessing.std values must be > 0, but got {self.std}.")
        _check(self.interpolation in INTERPOLATIONS, f"gallery.preprocessing.interpolation must be one of {', '.join(INTERPOLATIONS)}, but got {self.interpolation!r}.")
        _check(0 < self.crop_pct <= 1, f"gallery.preprocessing.crop_pct must be in (0, 1], but got {self.crop_pct}.")


@dataclass(frozen=True)
class GalleryConfig:
    """The fixed gallery model: a timm architecture, optionally projected to ``embed_dim``.

    Where its weights come from, first match wins:

    * ``checkpoint``: a file written by ``nas gallery train`` (safetensors + JSON header);
    * ``weights``: a timm-compatible state dict of ``model`` (``.safetensors``, or ``.pth``
      read with ``weights_only=True``), e.g. converted by
      ``experiments/convert_efficientnet_lite.py``; its classifier is dropped;
    * ``pretrained: true``: timm's own pretrained weights (downloaded by timm when online);
    * none of them: the search looks for ``<out>/gallery/gallery.safetensors`` and trains one
      there if it is missing.

    With ``weights`` or ``pretrained`` the embedding is the pooled features, or with
    ``embed_dim`` a fixed projection of them (random orthogonal rows, seeded by
    ``data.seed``): no training. ``preprocessing`` null: timm's data config for the model
    (``resolve_data_config``); a checkpoint of ``nas gallery train`` records its own.
    """

    model: str = "resnet18"
    checkpoint: str | None = None
    weights: str | None = None
    pretrained: bool = False
    embed_dim: int | None = 128
    resolution: int = 32
    batch_size: int = 256
    preprocessing: PreprocessingConfig | None = None
    train: GalleryTrainConfig = field(default_factory=GalleryTrainConfig)

    def __post_init__(self) -> None:
        _check(self.embed_dim is None or self.embed_dim >= 2, f"gallery.embed_dim must be >= 2, but got {self.embed_dim}.")
        _check(self.resolution >= 8, f"gallery.resolution must be >= 8, but got {self.resolution}.")
        _check(self.batch_size >= 1, f"gallery.batch_size must be >= 1, but got {self.batch_size}.")  # else a crash after training
        given = [name for name in ("checkpoint", "weights") if getattr(self, name) is not None] + (["pretrained"] if self.pretrained else [])
        both = "both" if len(given) == 2 else "all"
        _check(len(given) <= 1, f"gallery.{' and gallery.'.join(given)} are {both} set: give the gallery model's weights one way only.")

    @property
    def source(self) -> str:
        """Where the weights come from: ``checkpoint``, ``weights``, ``pretrained`` or ``train``."""
        if self.checkpoint is not None:
            return "checkpoint"
        if self.weights is not None:
            return "weights"
        return "pretrained" if self.pretrained else "train"


@dataclass(frozen=True)
class AugmentConfig:
    """``train.augment``: a candidate's training augmentation (see :class:`nas.data.Augmentation`):
    a random resized crop of area ``crop_scale`` [min, max] and aspect ``crop_ratio`` [min, max],
    and a horizontal flip with probability ``hflip``. ``crop_scale: [1, 1]`` with ``hflip: 0``
    trains on the evaluation view (resize and centre crop). The targets stay the gallery model's
    embeddings of the evaluation view."""

    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])
    hflip: float = 0.5

    def __post_init__(self) -> None:
        _check(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, f"train.augment.crop_scale must be [min, max] with 0 < min <= max <= 1, but got {self.crop_scale}.")
        _check(len(self.crop_ratio) == 2 and 0 < self.crop_ratio[0] <= self.crop_ratio[1], f"train.augment.crop_ratio must be [min, max] with 0 < min <= max, but got {self.crop_ratio}.")
        _check(0 <= self.hflip <= 1, f"train.augment.hflip must be a probability in [0, 1], but got {self.hflip}.")
