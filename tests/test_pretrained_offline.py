"""gallery.pretrained without a network: a clear error at once when the weights are not cached; read from the cache when they are."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from nas.errors import GalleryError
from nas.pretrained import check_pretrained

REPO = Path(__file__).resolve().parents[1]

LOAD = """
from nas.config import config_from_dict
from nas.errors import GalleryError
from nas.gallery import load_gallery_weights
config = config_from_dict({"gallery": {"model": "lcnet_050", "pretrained": True, "embed_dim": None}})
try:
    model = load_gallery_weights(config.gallery, in_chans=1)
except GalleryError as exc:
    print("GalleryError:", exc)
else:
    print("loaded", float(model.backbone.conv_stem.weight.sum()))
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: a connection is refused at once


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    return {**env, "HF_HOME": str(home), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "OMP_NUM_THREADS": "1",
            "TORCH_HOME": str(home / "torch"), "PYTHONPATH": str(REPO), **extra}


def _run(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    return done, time.monotonic() - start


def _fake_cache(home: Path) -> Path:
    """A Hugging Face cache holding random lcnet_050 weights where timm's download looks for them; returns the file."""
    import timm

    snapshot = home / "hub" / "models--timm--lcnet_050.ra2_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    state = timm.create_model("lcnet_050", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


def test_check_pretrained_answers_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _env(tmp_path / "hf").items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    with pytest.raises(GalleryError, match="127.0.0.1 does not answer"):
        check_pretrained("lcnet_050")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GalleryError, match="HF_HUB_OFFLINE is set"):
        check_pretrained("lcnet_050")
    assert time.monotonic() - start < 10
    _fake_cache(tmp_path / "hf")
    assert check_pretrained("lcnet_050") is True  # cached: no network needed


@pytest.mark.slow  # two runs of nas search in fresh interpreters: one to four minutes on 2 busy cores
def test_unreachable_host_and_no_cache_fail_at_once_before_the_data(tmp_path: Path, tiny_config) -> None:
    config = tiny_config(tmp_path / "run", gallery__model="lcnet_050", gallery__pretrained=True, gallery__embed_dim=None)
    file = tmp_path / "exp.yaml"
    file.write_text(yaml.safe_dump(config))
    for extra in ({}, {"HF_HUB_OFFLINE": "1"}):
        done, _ = _run(["-m", "nas.cli", "search", str(file)], _env(tmp_path / "hf", **extra), tmp_path)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and "Retrying" not in done.stderr + done.stdout
        assert "pretrained weights for 'lcnet_050' are not in the cache" in done.stderr
        assert ("HF_HUB_OFFLINE is set" if extra else "127.0.0.1 does not answer") in done.stderr
        assert "gallery.weights" in done.stderr
        assert not (tmp_path / "run" / "gallery").exists()


@pytest.mark.slow  # two fresh interpreters loading timm: one to three minutes on 2 busy cores
def test_cached_weights_are_read_without_asking_the_unreachable_host(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    home = tmp_path / "hf"
    weights = _fake_cache(home)
    done, _ = _run(["-c", LOAD], _env(home), tmp_path)
    assert done.returncode == 0, done.stderr
    expected = float(load_file(str(weights))["conv_stem.weight"].sum())  # RGB filters summed for one channel: the same sum
    assert done.stdout.startswith("loaded") and abs(float(done.stdout.split()[1]) - expected) < 1e-3, done.stdout
    assert "Retrying" not in done.stderr
    weights.unlink()  # the cache emptied: the clear error, at once
    done, _ = _run(["-c", LOAD], _env(home), tmp_path)
    assert done.stdout.startswith("GalleryError:") and "does not answer" in done.stdout, done.stdout + done.stderr
