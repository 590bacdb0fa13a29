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

Images already in memory as one uint8 array (Fashion-MNIST, digits) are transformed a whole
batch at a time on tensors (:meth:`EvalTransform.apply_batch`, :meth:`TrainTransform.apply_batch`)
instead of image by image through PIL. :func:`resample_weights` rebuilds PIL's resampling
(Pillow's ``libImaging/Resample.c``: the same filters and supports, the same source window
per output pixel, the same 22-bit fixed-point coefficients, a horizontal then a vertical
pass each rounded to 8 bits) as two integer weight matrices per image, applied with float64
matrix products, which hold those integer sums exactly: the batch equals PIL's output pixel
for pixel (tested against PIL for every filter but ``nearest``, which stays on PIL).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "Preprocessing", "Augmentation", "EvalTransform", "TrainTransform", "INTERPOLATIONS", "LEGACY_PREPROCESSING", "resample_weights",
    "resize_batch",
]

#: Interpolation names (timm's) -> PIL resampling filter names.
INTERPOLATIONS = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS", "box": "BOX", "hamming": "HAMMING"}


def _resample(name: str) -> Any:
    from PIL import Image

    return getattr(Image.Resampling, INTERPOLATIONS[name])


# ---------------------------------------------------------------------------------------- PIL's resampling, batched
def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:  # a = -0.5, as PIL
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1, np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


def _hamming(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = x * math.pi
        w = np.sin(t) / t * (float(np.float32(0.54)) + float(np.float32(0.46)) * np.cos(t))
    return np.where(x == 0.0, 1.0, np.where(x >= 1.0, 0.0, w))


def _sinc(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = x * math.pi
        return np.where(x == 0.0, 1.0, np.sin(t) / t)


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((-3.0 <= x) & (x < 3.0), _sinc(x) * _sinc(x / 3), 0.0)


#: Interpolation name -> (filter, support), as PIL defines them; ``nearest`` is not a filter there.
_FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0), "box": (_box, 0.5), "hamming": (_hamming, 1.0), "lanczos": (_lanczos, 3.0)}
_PRECISION_BITS = 22  # PIL: 32 - 8 - 2


def resample_weights(in_size: int, box0: np.ndarray, box1: np.ndarray, out_size: int, interpolation: str) -> np.ndarray:
    """PIL's fixed-point resampling coefficients along one axis, as dense matrices ``(B, out_size, in_size)``.

    Image ``b``'s source window ``[box0[b], box1[b])`` (PIL takes box coordinates as float32)
    resampled to ``out_size`` pixels: output pixel ``i`` is ``clip(floor((sum_j W[b, i, j] *
    pixel_j + 2^21) / 2^22), 0, 255)``, as PIL computes it. Integer-valued float64 entries.
    """
    flt, base_support = _FILTERS[interpolation]
    in0 = np.asarray(box0, dtype=np.float32).astype(np.float64)
    scale = (np.asarray(box1, dtype=np.float32) - np.asarray(box0, dtype=np.float32)).astype(np.float64) / out_size
    filterscale = np.maximum(scale, 1.0)[:, None]
    support = base_support * filterscale
    ksize = int(math.ceil(float(support.max()))) * 2 + 1
    center = in0[:, None] + (np.arange(out_size) + 0.5)[None, :] * scale[:, None]  # (B, out)
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    w = np.where(taps < xmax[..., None], flt((xmin[..., None] + taps - center[..., None] + 0.5) * (1.0 / filterscale[..., None])), 0.0)
    total = np.zeros_like(center)
    for k in range(ksize):  # summed in PIL's order
        total = total + w[..., k]
    w = np.where(total[..., None] != 0.0, w / np.where(total == 0.0, 1.0, total)[..., None], w)
    fixed = np.where(w < 0, np.trunc(-0.5 + w * (1 << _PRECISION_BITS)), np.trunc(0.5 + w * (1 << _PRECISION_BITS)))
    dense = np.zeros((len(in0), out_size, in_size))
    columns = np.minimum(xmin[..., None] + taps, in_size - 1)  # taps past the window carry weight 0
    np.add.at(dense, (np.arange(len(in0))[:, None, None], np.arange(out_size)[None, :, None], columns), fixed)
    return dense


def _round8(sums: torch.Tensor) -> torch.Tensor:
    return torch.floor((sums + (1 << (_PRECISION_BITS - 1))) / (1 << _PRECISION_BITS)).clamp_(0, 255)


def _two_passes(x: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, vertical_first: bool) -> torch.Tensor:
    """``x`` ``(B, C, H, W)`` resampled by ``kx`` ``(B, out, W)`` along the width and ``ky`` ``(B, out, H)`` along the
    height, each pass rounded to 8 bits as PIL rounds it."""
    horizontal = lambda t: _round8(torch.matmul(t, kx.transpose(1, 2).unsqueeze(1)))  # noqa: E731
    vertical = lambda t: _round8(torch.matmul(ky.unsqueeze(1), t))  # noqa: E731
    return horizontal(vertical(x)) if vertical_first else vertical(horizontal(x))


@functools.lru_cache(maxsize=65536)
def _pil_vertical_first(height: int, width: int, box: tuple[float, float, float, float], size: int, interpolation: str) -> bool:
    """Whether this PIL resamples the height before the width for this geometry (Pillow before 12.2 always does
    the width first; later ones the height first when that is cheaper). Asked of PIL itself, once per geometry,
    with random probe images until the two orders give different pixels (where none does, the order does not matter)."""
    from PIL import Image

    kx = torch.from_numpy(resample_weights(width, np.array([box[0]]), np.array([box[2]]), size, interpolation))
    ky = torch.from_numpy(resample_weights(height, np.array([box[1]]), np.array([box[3]]), size, interpolation))
    rng = np.random.default_rng(0)
    for _ in range(64):  # each probe of 3 random channels tells the orders apart with a fair chance; the first that does decides
        probe = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        resized = Image.fromarray(probe, "RGB").resize((size, size), _resample(interpolation), box=box)
        pil = torch.from_numpy(np.asarray(resized, dtype=np.float64)).permute(2, 0, 1)
        x = torch.from_numpy(probe.astype(np.float64)).permute(2, 0, 1)[None]
        width_first, height_first = torch.equal(_two_passes(x, kx, ky, False)[0], pil), torch.equal(_two_passes(x, kx, ky, True)[0], pil)
        if width_first != height_first:
            return height_first
    return False


def resize_batch(pixels: np.ndarray, boxes: np.ndarray, size: int, interpolation: str) -> torch.Tensor:
    """uint8 images ``(B, H, W, C)``, each cropped to its ``boxes[b]`` ``(x0, y0, x1, y1)`` and resized to ``size`` x
    ``size`` exactly as PIL's ``resize((size, size), filter, box=...)`` does: float64 ``(B, C, size, size)`` of
    integers 0-255 (see :func:`resample_weights`). A box shared by every image is given as one row ``(1, 4)``."""
    n, height, width, _ = pixels.shape
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).to(torch.float64)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).astype(np.float64)  # PIL holds a box as float32
    need_x = ~((size == width) & (boxes[:, 0] == 0) & (boxes[:, 2] == width))  # PIL skips a pass that changes nothing
    need_y = ~((size == height) & (boxes[:, 1] == 0) & (boxes[:, 3] == height))
    if not need_x.any() and not need_y.any():
        return x
    # an identity pass is exact, so a pass one image of the batch needs is run on all of them
    kx = torch.from_numpy(resample_weights(width, boxes[:, 0], boxes[:, 2], size, interpolation))
    ky = torch.from_numpy(resample_weights(height, boxes[:, 1], boxes[:, 3], size, interpolation))
    if not need_x.any():
        return _round8(torch.matmul(ky.unsqueeze(1), x))
    if not need_y.any():
        return _round8(torch.matmul(x, kx.transpose(1, 2).unsqueeze(1)))
    vertical_first = np.array(
        [bool(need_x[b] and need_y[b]) and _pil_vertical_first(height, width, tuple(boxes[b].tolist()), size, interpolation) for b in range(len(boxes))]
    )
    if not vertical_first.any():
        return _two_passes(x, kx, ky, False)
    if len(boxes) == 1:
        return _two_passes(x, kx, ky, True)
    out = torch.empty((n, x.shape[1], size, size), dtype=torch.float64)
    for order in (False, True):
        rows = torch.from_numpy(np.flatnonzero(vertical_first == order))
        if len(rows):
            out[rows] = _two_passes(x[rows], kx[rows], ky[rows], order)
    return out


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

    def normalise_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel values 0-255 ``(B, C, H, W)`` -> normalised float32, the same arithmetic as :meth:`to_tensor`."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return x.to(torch.float32).div_(255.0).sub_(mean).div_(std).contiguous()


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

    @property
    def batched(self) -> bool:
        """Whether :meth:`apply_batch` can do this transform (every interpolation but ``nearest``)."""
        return self.preprocessing.interpolation in _FILTERS

    def apply_batch(self, pixels: np.ndarray, seeds: Sequence[int | None] | None = None) -> torch.Tensor:
        """uint8 images ``(B, H, W, C)`` of one size -> the batch ``(B, C, resolution, resolution)`` that calling
        the transform on each would give."""
        _, height, width, _ = pixels.shape
        side = min(width, height) * self.resolution / self.scale_size
        left, top = (width - side) / 2, (height - side) / 2
        box = np.array([[left, top, left + side, top + side]])
        return self.preprocessing.normalise_batch(resize_batch(pixels, box, self.resolution, self.preprocessing.interpolation))


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

    @property
    def batched(self) -> bool:
        """Whether :meth:`apply_batch` can do this transform (every interpolation but ``nearest``)."""
        return self.preprocessing.interpolation in _FILTERS

    def apply_batch(self, pixels: np.ndarray, seeds: Sequence[int | None] | None = None) -> torch.Tensor:
        """uint8 images ``(B, H, W, C)`` of one size, image ``b`` augmented from ``random.Random(seeds[b])`` ->
        the batch that calling the transform on each with that generator would give (the same draws, in
        the same order: crop box, then flip)."""
        n, height, width, _ = pixels.shape
        seeds = [None] * n if seeds is None else seeds
        boxes, flips = np.empty((n, 4)), np.zeros(n, dtype=bool)
        for b, seed in enumerate(seeds):
            rng = random.Random(seed)
            boxes[b] = self.crop_box(width, height, rng)
            flips[b] = rng.random() < self.augmentation.hflip
        x = resize_batch(pixels, boxes, self.resolution, self.preprocessing.interpolation)
        if flips.any():
            rows = torch.from_numpy(np.flatnonzero(flips))
            x[rows] = x[rows].flip(-1)
        return self.preprocessing.normalise_batch(x)
