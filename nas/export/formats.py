"""Export formats: one :class:`Exporter` per ``--format`` name, registered in :data:`EXPORTERS`.

* ``state_dict``: ``arch.json`` and ``weights.safetensors`` (always written: it is what
  :func:`~nas.export.loading.load_query_model` reads);
* ``torchscript``: ``model.torchscript.pt``, traced;
* ``onnx``: ``model.onnx`` with a dynamic batch dimension, input ``images``, output
  ``embeddings``;
* ``onnx-int8``: ``model.int8.onnx``, ONNX Runtime static int8 quantisation (QDQ,
  per-channel weights, calibrated on training images) of ``model.onnx``, which it
  requires.

Adding a format is one :class:`Exporter` subclass decorated with :func:`_registered`,
after the formats it requires.
"""

from __future__ import annotations

import abc
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from safetensors.torch import save_file

from nas.data import Preprocessing, eval_batches
from nas.errors import NasError
from nas.export.loading import WEIGHTS_FILE, load_query_model, write_arch
from nas.hardware.runtimes import onnxruntime_session
from nas.registry import Registry
from search_spaces import Architecture, QueryNet

if TYPE_CHECKING:
    from nas.data import RetrievalData

__all__ = ["Exporter", "ExportContext", "EXPORTERS", "resolve_formats"]

#: Training images the int8 model is calibrated on (a fixed random subset).
CALIBRATION_IMAGES = 256


@dataclass(frozen=True)
class ExportContext:
    """What a format may need besides the trained module: the run's data (int8 calibration images)
    and the study's preprocessing (recorded in ``arch.json``)."""

    retrieval: RetrievalData
    preprocessing: Preprocessing


class Exporter(abc.ABC):
    """One ``--format``: a file of the export folder, written from the trained module.

    Contract:

    * ``name``: the ``--format`` name; ``filename``: the file :meth:`write` creates in the folder;
    * ``requires``: formats written before this one and chosen with it (``onnx-int8`` is
      quantised from the float ONNX model); they are registered before it;
    * ``always``: written whatever ``--format`` says;
    * ``verified_as``: the name this format's embeddings of the query images have in
      ``verification.json``'s ``min_cosine``, where they are held to the float thresholds;
      ``measured_as``: instead, the key of a quantised format's measurements (mAP drop,
      latency), which are reported, not held to a threshold. A format has at most one.
    * :meth:`embed` runs a written file (formats that cannot be run for verification have
      ``verified_as`` and ``measured_as`` None and need not implement it).
    """

    name: ClassVar[str]
    filename: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    always: ClassVar[bool] = False
    verified_as: ClassVar[str | None] = None
    measured_as: ClassVar[str | None] = None

    @abc.abstractmethod
    def write(self, model: QueryNet, out_dir: Path, context: ExportContext) -> Path:
        """Write ``out_dir / filename`` from the (CPU, eval-mode) ``model``; returns its path."""

    def embed(self, path: Path, batches: Iterable[torch.Tensor]) -> np.ndarray:
        """Embeddings (N, D) of the preprocessed ``batches`` (iterated once) computed by the written file ``path``."""
        raise NotImplementedError(f"export format {self.name!r} cannot be run for verification")


#: Every export format, by ``--format`` name, in the order they are written and verified.
EXPORTERS: Registry[Exporter] = Registry("--format")


def _registered(cls: type[Exporter]) -> type[Exporter]:
    """Register one instance of ``cls`` under ``cls.name``; what it requires must be registered already."""
    missing = [name for name in cls.requires if name not in EXPORTERS]
    if missing:
        raise ValueError(f"export format {cls.name!r} requires {missing!r}, which must be registered before it.")
    EXPORTERS.add(cls.name, cls())
    return cls


def _example(arch: Architecture, batch: int = 2) -> torch.Tensor:
    return torch.zeros(batch, arch.in_chans, arch.resolution, arch.resolution)


@_registered
class StateDictExporter(Exporter):
    """``arch.json`` and the weights as safetensors: rebuilt with ``load_query_model`` (no pickle)."""

    name = "state_dict"
    filename = WEIGHTS_FILE
    always = True
    verified_as = "reloaded"

    def write(self, model: QueryNet, out_dir: Path, context: ExportContext) -> Path:
        write_arch(model.arch, out_dir, context.preprocessing)
        path = out_dir / self.filename
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path

    def embed(self, path: Path, batches: Iterable[torch.Tensor]) -> np.ndarray:
        model = load_query_model(path.parent)
        with torch.inference_mode():
            return torch.cat([model(b) for b in batches]).numpy()


@_registered
class TorchScriptExporter(Exporter):
    """TorchScript, traced at the model's resolution: runs without our code."""

    name = "torchscript"
    filename = "model.torchscript.pt"
    verified_as = "torchscript"

    def write(self, model: QueryNet, out_dir: Path, context: ExportContext) -> Path:
        path = out_dir / self.filename
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(model, _example(model.arch)), str(path))
        return path

    def embed(self, path: Path, batches: Iterable[torch.Tensor]) -> np.ndarray:
        with warnings.catch_warnings():  # TorchScript is the product here: torch's deprecation of torch.jit.load is no news
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
            scripted = torch.jit.load(str(path))
        with torch.inference_mode():
            return torch.cat([scripted(b) for b in batches]).numpy()


@_registered
class OnnxExporter(Exporter):
    """ONNX (dynamo exporter) with a dynamic batch dimension: input ``images``, output ``embeddings``."""

    name = "onnx"
    filename = "model.onnx"
    verified_as = "onnx"

    def write(self, model: QueryNet, out_dir: Path, context: ExportContext) -> Path:
        path = out_dir / self.filename
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (_example(model.arch),),
                str(path),
                input_names=["images"],
                output_names=["embeddings"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        return path

    def embed(self, path: Path, batches: Iterable[torch.Tensor]) -> np.ndarray:
        session = onnxruntime_session(path)
        return np.concatenate([session.run(["embeddings"], {"images": b.numpy()})[0] for b in batches])


@_registered
class OnnxInt8Exporter(OnnxExporter):
    """Static int8 quantisation (QDQ; per-channel int8 weights, uint8 activations) of ``model.onnx``,
    calibrated on :data:`CALIBRATION_IMAGES` training images; run like the float ONNX model."""

    name = "onnx-int8"
    filename = "model.int8.onnx"
    requires = ("onnx",)
    verified_as = None
    measured_as = "int8"

    def write(self, model: QueryNet, out_dir: Path, context: ExportContext) -> Path:
        # Deferred: ONNX Runtime's quantisation tools are heavy and needed only for this format.
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        data, split = context.retrieval.data, context.retrieval.split
        chosen = split.train[np.random.default_rng(0).permutation(len(split.train))[:CALIBRATION_IMAGES]]
        transform = context.preprocessing.for_channels(data.channels).eval_transform(model.arch.resolution)
        calibration = torch.cat(list(eval_batches(data.images, chosen, transform, 32)))

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"images": b.numpy()} for b in torch.split(calibration, 32)])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        path = out_dir / self.filename
        with tempfile.TemporaryDirectory() as tmp:
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(out_dir / OnnxExporter.filename), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(path),
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
        return path


def resolve_formats(formats: str | Sequence[str] | None = None) -> list[Exporter]:
    """The exporters of a ``--format`` value (comma-separated or a sequence; ``None``: all), in registry order.

    Adds what the chosen formats require and the formats always written; an unknown
    name is a :class:`NasError` listing the valid ones.
    """
    if formats is None:
        formats = EXPORTERS.names()
    items = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = [f for f in items if f not in EXPORTERS]
    if unknown:
        raise NasError(f"Unknown export format(s) {', '.join(unknown)}; valid formats: {', '.join(EXPORTERS.names())}.")
    chosen, pending = set(items), list(items)
    while pending:
        for needed in EXPORTERS.get(pending.pop()).requires:
            if needed not in chosen:
                chosen.add(needed)
                pending.append(needed)
    return [EXPORTERS.get(name) for name in EXPORTERS.names() if name in chosen or EXPORTERS.get(name).always]
