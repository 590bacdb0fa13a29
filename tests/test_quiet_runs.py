"""A normal run prints no torch.jit deprecation warnings: TorchScript is used only where it is the product."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import sys, warnings
warnings.simplefilter("always")
import nas.cli, nas.search.driver, nas.export  # what nas search and nas export import
from nas.export.formats import TorchScriptExporter
from nas.hardware import count_mflops
from search_spaces import build, create_space, timm_architecture
import torch
space = create_space("mobilenet", embed_dim=8, in_chans=1, resolutions=[16], widths=[0.35])
for arch in (space.extreme(smallest=True, resolution=16), timm_architecture("lcnet_050", 32, 8, 1)):
    assert count_mflops(build(arch), arch.resolution, 1) > 0
    if arch.timm_model is None:
        path = TorchScriptExporter().write(build(arch).eval(), __import__("pathlib").Path(sys.argv[1]), None)
        assert TorchScriptExporter().embed(path, [torch.zeros(2, 1, 16, 16)]).shape == (2, 8)
print("done")
"""


@pytest.mark.slow  # a fresh interpreter importing torch, timm, Optuna and MLflow: 15 s to a minute on 2 busy cores
def test_mac_counting_and_the_torchscript_export_print_no_jit_deprecation(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr
    assert "torch.jit" not in done.stderr, done.stderr
