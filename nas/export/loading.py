"""Using an export: rebuild its query network (no pickle) and embed a folder of images with it.

An export folder always holds ``arch.json`` (the architecture, input shape and
preprocessing) and ``weights.safetensors`` (the trained weights); :func:`write_arch`
writes the first, :func:`load_query_model` reads both back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from nas.data import IMAGE_SUFFIXES, LEGACY_PREPROCESSING, Preprocessing
from nas.data.sources import IMAGE_ERRORS, read_image
from nas.errors import DataError, NasError
from search_spaces import Architecture, QueryNet, build
from trainers import check_state_dict, read_safetensors

if TYPE_CHECKING:
    from nas.data.transforms import EvalTransform

__all__ = ["ARCH_FILE", "WEIGHTS_FILE", "write_arch", "load_query_model", "load_preprocessing", "input_pipeline", "query_input", "embed_folder"]

#: The architecture file of an export folder (JSON; rebuildable without pickle).
ARCH_FILE = "arch.json"
#: The weights file of an export folder (safetensors; the ``state_dict`` format).
WEIGHTS_FILE = "weights.safetensors"


def write_arch(arch: Architecture, folder: Path, preprocessing: Preprocessing) -> Path:
    """Write ``folder/arch.json``: the architecture, the input shape and preprocessing, the output."""
    path = folder / ARCH_FILE
    path.write_text(
        json.dumps(
            {
                "architecture": arch.to_dict(),
                "input": {
                    "shape": ["batch", arch.in_chans, arch.resolution, arch.resolution],
                    "preprocessing": {**preprocessing.to_dict(), "description": preprocessing.describe()},
                },
                "output": {"embedding_dim": arch.embed_dim, "normalised": "L2"},
            },
            indent=2,
        )
    )
    return path


def load_query_model(folder: str | Path) -> QueryNet:
    """Rebuild an exported query network from ``arch.json`` and ``weights.safetensors`` (no pickle)."""
    folder = Path(folder)
    arch_file, weights_file = folder / ARCH_FILE, folder / WEIGHTS_FILE
    for file in (arch_file, weights_file):
        if not file.is_file():
            raise NasError(f"{file} is missing: {folder} is not a complete export (see 'nas export').")
    try:
        meta = json.loads(arch_file.read_text())
        arch = Architecture.from_dict(meta["architecture"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise NasError(f"{arch_file} is not a valid architecture file ({type(exc).__name__}: {exc}); export the model again ('nas export').") from None
    advice = "export the model again ('nas export')"
    state, _ = read_safetensors(weights_file, "The export's weights", advice, NasError)
    model = build(arch)
    check_state_dict(state, model, f"The export's weights {weights_file}", advice, NasError, f"the architecture in {arch_file}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_preprocessing(folder: str | Path) -> Preprocessing:
    """The preprocessing recorded in an export's ``arch.json`` (exports that recorded only a
    description used :data:`nas.data.LEGACY_PREPROCESSING`)."""
    arch_file = Path(folder) / ARCH_FILE
    try:
        recorded = json.loads(arch_file.read_text())["input"]["preprocessing"]
        return Preprocessing.from_dict(recorded) if isinstance(recorded, dict) else LEGACY_PREPROCESSING
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise NasError(f"{arch_file} does not record valid preprocessing: {exc}") from None


def input_pipeline(export_dir: str | Path, model: QueryNet) -> tuple[EvalTransform, str]:
    """The export's eval transform (its recorded preprocessing) and the PIL mode its images are converted to."""
    arch = model.arch
    transform = load_preprocessing(export_dir).for_channels(arch.in_chans).eval_transform(arch.resolution)
    return transform, "L" if arch.in_chans == 1 else "RGB"


def query_input(file: str | Path, transform: EvalTransform, mode: str) -> torch.Tensor:
    """One image file as the query network's input tensor, decoded as a viewer shows it
    (:func:`nas.data.sources.read_image`) and preprocessed as :func:`embed_folder` does; raises one of
    :data:`nas.data.sources.IMAGE_ERRORS` for a missing, corrupt, floating-point or too large file."""
    return transform(read_image(file, mode, transform.decode_side))


def embed_folder(export_dir: str | Path, images_dir: str | Path, batch_size: int = 64) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Embed every image under ``images_dir`` with an exported model, with the preprocessing its
    ``arch.json`` records (the gallery model's normalisation, resize and centre crop).

    Returns the embeddings (float32, one row per readable image), their ids (paths
    relative to ``images_dir``), and the ``(path, reason)`` of every image that was
    skipped because it could not be read (corrupt, not an image, a floating-point image, or over
    :data:`nas.data.sources.MAX_IMAGE_PIXELS`). Images are decoded as a viewer shows them
    (:func:`nas.data.sources.read_image`). A folder where no image can be read is a
    :class:`~nas.errors.DataError` listing them. Images are decoded one batch at a time.
    """
    model = load_query_model(export_dir)
    transform, mode = input_pipeline(export_dir, model)
    root = Path(images_dir)
    if not root.is_dir():
        raise NasError(f"{root} is not a folder of images.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise NasError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    ids: list[str] = []
    skipped: list[tuple[str, str]] = []
    batch: list[torch.Tensor] = []
    out: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            with torch.inference_mode():
                out.append(model(torch.stack(batch)).numpy().astype(np.float32))
            batch.clear()

    for file in files:
        try:
            batch.append(query_input(file, transform, mode))
        except IMAGE_ERRORS as exc:
            skipped.append((str(file.relative_to(root)), f"{type(exc).__name__}: {exc}"))
            continue
        ids.append(str(file.relative_to(root)))
        if len(batch) == batch_size:
            flush()
    flush()
    if not out:
        listed = "; ".join(f"{path} ({reason})" for path, reason in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        raise DataError(
            f"None of the {len(files)} image file(s) under {root} could be read, so nothing was written: {listed}{more}. "
            f"Check that the folder holds real image files ({', '.join(IMAGE_SUFFIXES)})."
        )
    return np.concatenate(out), ids, skipped
