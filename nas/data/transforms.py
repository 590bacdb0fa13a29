"""How a decoded image becomes network input: :class:`Preprocessing` and :class:`Augmentation`.

:class:`Preprocessing` is the gallery model's data config (timm's ``resolve_data_config``:
mean, std, interpolation, centre-crop fraction). The gallery side uses it at the gallery
resolution; every query candidate uses the same normalisation at its own resolution, so
both sides see the same pixels scaled alike. It is recorded in the study, the MLflow runs,
the gallery cache key and the exported model (``nas embed`` applies it).

Evaluation (gallery embedding, val / query scoring, export): resize the shorter side to
``floor(resolution / crop_pct)`` and take the centre ``resolution`` square, as timm's eval
transform does. Training: a random resized crop (area fraction ``crop_scale``, aspect ratio
``crop_ratio``, log-uniform) resized to ``resolution`` and a horizontal flip with
probability ``hflip``, as timm's training transform does without colour jitter. The crop
and resize are one PIL resample (``resize(..., box=...)``).

A training transform draws from a ``random.Random`` seeded per image and epoch by the
loader, so a training run is the same with or without loader workers.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["Preprocessing", "Augmentation", "EvalTransform", "TrainTransform", "INTERPOLATIONS", "LEGACY_PREPROCESSING"]

#: Interpolation names (timm's) -> PIL resampling filter names.
INTERPOLATIONS = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS", "box": "BOX", "hamming": "HAMMING"}


def _resample(name: str) -> Any:
    from PIL import Image

    return getattr(Image.Resampling, INTERPOLATIONS[name])


@dataclass(frozen=True)
class Preprocessing:
    """Normalisation and resizing of one study's images (see the module docstring).

    ``mean`` and ``std`` have one value per channel (1 or 3); :meth:`for_channels` adapts
    a 3-channel config to grey images (the channel average) and back.
    """

    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise ValueError(f"mean and std must both have 1 or 3 values, but got mean {self.mean} and std {self.std}.")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, but got {self.std}.")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, but got {self.interpolation!r}.")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], but got {self.crop_pct}.")

    @classmethod
    def from_timm(cls, model: torch.nn.Module, channels: int) -> Preprocessing:
        """The data config timm resolves for ``model`` (its pretrained config), for ``channels`` channels."""
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        return cls(tuple(cfg["mean"]), tuple(cfg["std"]), str(cfg["interpolation"]), float(cfg["crop_pct"])).for_channels(channels)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(tuple(values["mean"]), tuple(values["std"]), str(values["interpolation"]), float(values["crop_pct"]))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def for_channels(self, channels: int) -> Preprocessing:
        if len(self.mean) == channels:
            return self
        if channels == 1:
            return Preprocessing((sum(self.mean) / 3,), (sum(self.std) / 3,), self.interpolation, self.crop_pct)
        return Preprocessing(self.mean * 3, self.std * 3, self.interpolation, self.crop_pct)

    def describe(self) -> str:
        """One line for model cards, logs and the gallery cache key."""
        fmt = lambda values: "(" + ", ".join(f"{v:.4g}" for v in values) + ")"  # noqa: E731
        return (
            f"decode -> resize shorter side to resolution / {self.crop_pct:g} ({self.interpolation}) -> centre crop "
            f"resolution x resolution -> [0, 1] -> (x - mean {fmt(self.mean)}) / std {fmt(self.std)}"
        )

    def eval_transform(self, resolution: int) -> EvalTransform:
        return EvalTransform(self, resolution)

    def train_transform(self, resolution: int, augmentation: Augmentation) -> EvalTransform | TrainTransform:
        """The training transform; with no augmentation, the evaluation transform."""
        return self.eval_transform(resolution) if augmentation.is_identity else TrainTransform(self, resolution, augmentation)

    def to_tensor(self, img: PILImage) -> torch.Tensor:
        """A PIL image of the network's size -> normalised float ``(C, H, W)``."""
        array = np.asarray(img, dtype=np.float32)
        x = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1)).permute(2, 0, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return x.div_(255.0).sub_(mean).div_(std).contiguous()


#: How images were prepared before preprocessing came from the gallery model: models saved then
#: (gallery checkpoints and exports without a preprocessing record) are read with it.
LEGACY_PREPROCESSING = Preprocessing((0.5,), (0.5,), "bilinear", 1.0)


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation: random resized crop (area ``crop_scale``, aspect ``crop_ratio``) and flip.

    ``crop_scale == (1, 1)`` with ``hflip == 0`` is no augmentation at all (the evaluation
    transform is used for training).
    """

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(float(v) for v in self.crop_ratio))
        lo, hi = self.crop_scale
        if len(self.crop_scale) != 2 or not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must be [min, max] with 0 < min <= max <= 1, but got {list(self.crop_scale)}.")
        r0, r1 = self.crop_ratio
        if len(self.crop_ratio) != 2 or not 0.0 < r0 <= r1:
            raise ValueError(f"crop_ratio must be [min, max] with 0 < min <= max, but got {list(self.crop_ratio)}.")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip must be a probability in [0, 1], but got {self.hflip}.")

    @property
    def is_identity(self) -> bool:
        return self.crop_scale == (1.0, 1.0) and self.hflip == 0.0


class EvalTransform:
    """Resize the shorter side to ``floor(resolution / crop_pct)``, centre crop ``resolution``, normalise."""

    def __init__(self, preprocessing: Preprocessing, resolution: int) -> None:
        self.preprocessing = preprocessing
        self.resolution = resolution
        self.scale_size = math.floor(resolution / preprocessing.crop_pct)
        self.decode_side = self.scale_size  # a JPEG may be decoded at a reduced scale no smaller than this

    def __call__(self, img: PILImage, rng: random.Random | None = None) -> torch.Tensor:
        width, height = img.size
        side = min(width, height) * self.resolution / self.scale_size  # the crop's side in source pixels
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
        out = img.resize((self.resolution, self.resolution), _resample(self.preprocessing.interpolation), box=box)
        return self.preprocessing.to_tensor(out)


class TrainTransform:
    """Random resized crop to ``resolution``, horizontal flip, normalise (see the module docstring)."""

    def __init__(self, preprocessing: Preprocessing, resolution: int, augmentation: Augmentation) -> None:
        self.preprocessing = preprocessing
        self.resolution = resolution
        self.augmentation = augmentation
        # the smallest crop side is sqrt(min area / most extreme aspect) of the image's: decode at least resolution / that
        extreme = max(augmentation.crop_ratio[1], 1 / augmentation.crop_ratio[0])
        self.decode_side = math.ceil(resolution / math.sqrt(augmentation.crop_scale[0] / extreme))

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[float, float, float, float]:
        """A crop of area ``crop_scale`` x the image's and aspect ``crop_ratio`` (log-uniform), placed
        uniformly; after ten misses the whole image, clipped to the ratio range (the usual rule)."""
        area = width * height
        lo, hi = self.augmentation.crop_scale
        log_r0, log_r1 = (math.log(r) for r in self.augmentation.crop_ratio)
        for _ in range(10):
            target = area * rng.uniform(lo, hi)
            aspect = math.exp(rng.uniform(log_r0, log_r1))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                x, y = rng.randint(0, width - w), rng.randint(0, height - h)
                return (x, y, x + w, y + h)
        ratio = width / height
        r0, r1 = self.augmentation.crop_ratio
        if ratio < r0:
            w, h = width, round(width / r0)
        elif ratio > r1:
            w, h = round(height * r1), height
        else:
            w, h = width, height
        x, y = (width - w) // 2, (height - h) // 2
        return (x, y, x + w, y + h)

    def __call__(self, img: PILImage, rng: random.Random | None = None) -> torch.Tensor:
        from PIL import Image

        rng = rng or random.Random()
        box = self.crop_box(img.size[0], img.size[1], rng)
        out = img.resize((self.resolution, self.resolution), _resample(self.preprocessing.interpolation), box=box)
        if rng.random() < self.augmentation.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.preprocessing.to_tensor(out)
