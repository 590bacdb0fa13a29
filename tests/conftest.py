"""Shared fixtures: small real data written in the layouts our loaders read, and tiny experiments."""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Iterator
import gzip
import struct
from pathlib import Path
from typing import Any

import numpy as np
import psycopg2
import pytest

# Searches in the tests keep one thread count (nas.threads: a count chosen by hand is kept), so that runs compared
# bit for bit are computed alike whatever else loads the machine; the sizing itself is tested in test_threads.py.
os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an idx file, gzipped when ``path`` ends with .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(payload)


def digits_as_fashion_mnist(folder: Path) -> Path:
    """scikit-learn's bundled digits (1,797 real 8x8 scans), upscaled to 16x16 and written
    as the four Fashion-MNIST idx files, so the real loader reads them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images, np.ones((2, 2))) * (255.0 / 16.0)
    images = images.round().clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    cut = 1500
    write_idx(folder / "train-images-idx3-ubyte.gz", images[:cut])
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels[:cut])
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images[cut:])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[cut:])
    return folder


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run torch on one thread: their models are tiny, and OpenMP threads spinning on
    a CPU shared with another busy process make tiny convolutions many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Latency lookup tables (and any other user cache) go to a temporary folder, never ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return digits_as_fashion_mnist(tmp_path_factory.mktemp("digits"))


TINY: dict[str, Any] = {
    "data": {"dataset": "fashion_mnist", "train": 0.6, "val": 0.1, "query": 0.1, "gallery": 0.2, "seed": 0},
    "gallery": {"model": "resnet18", "embed_dim": 32, "resolution": 16, "train": {"epochs": 3, "batch_size": 64, "lr": 0.003}},
    "space": {"name": "mobilenet", "options": {"resolutions": [16], "widths": [0.35, 0.5, 1.0]}},
    "budgets": {"max_mflops": 0.6, "latency": {"warmup": 2, "repeats": 5}},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.005},
    "search": {"study_name": "tiny", "trials": 6, "seed": 0, "n_startup_trials": 6, "pruner": "none"},
}


@pytest.fixture
def tiny_config(digits_dir: Path):
    """Factory: a tiny experiment mapping under ``out`` with nested ``overrides`` applied."""

    def make(out: Path, **overrides: Any) -> dict[str, Any]:
        config = copy.deepcopy(TINY)
        config["out"] = str(out)
        config["data"]["path"] = str(digits_dir)
        for dotted, value in overrides.items():
            node = config
            *parents, last = dotted.split("__")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        return config

    return make


@pytest.fixture(scope="session")
def small_gallery(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> str:
    """A gallery model checkpoint trained once on :data:`TINY` with 30 images per class (no trial run)."""
    from nas.config import config_from_dict
    from nas.search.driver import run_search

    raw = copy.deepcopy(TINY)
    raw["out"] = str(tmp_path_factory.mktemp("small-gallery"))
    raw["data"]["path"] = str(digits_dir)
    raw["data"]["max_per_class"] = 30
    raw["search"]["trials"] = 0
    config = config_from_dict(raw)
    run_search(config, log=lambda _: None)
    return str(config.out_dir / "gallery" / "gallery.safetensors")


#: The local PostgreSQL server of the tests marked ``postgres`` (trust auth).
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_databases() -> Iterator:
    """Factory of fresh PostgreSQL databases, ``make(password=None) -> URL``; all are dropped at the end of the test.

    A password is put into the URL as given (trust auth ignores it): for tests that check it is never shown.
    """
    created: list[str] = []

    def make(password: str | None = None) -> str:
        name = f"asymnas_{uuid.uuid4().hex[:12]}"
        conn = psycopg2.connect(PG_ADMIN)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        created.append(name)
        user = "postgres" if password is None else f"postgres:{password}"
        return f"postgresql://{user}@127.0.0.1:5432/{name}"

    yield make
    conn = psycopg2.connect(PG_ADMIN)
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in created:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
    conn.close()
