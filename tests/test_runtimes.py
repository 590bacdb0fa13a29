"""nas.hardware.runtimes: the runtime registry, the shared timing helpers, and the ``onnxruntime-basic`` entry."""

from __future__ import annotations

import io
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn

from nas.config import BudgetConfig, LatencyConfig, config_from_dict
from nas.errors import ConfigError
from nas.hardware import RUNTIMES, LatencyTable, Runtime, check_budgets, make_budgets, measure_latency
from nas.hardware.latency_table import default_table_path, machine_header
from nas.hardware.runtimes import OnnxRuntimeBasic, median_p90, onnxruntime_session, time_runs


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency lookup tables of these tests go to a temporary folder, never the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def tiny_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 4))


def onnx_bytes(model: nn.Module, shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.zeros(shape),), buffer, dynamo=False, opset_version=18)
    return buffer.getvalue()


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_runtime_in_order() -> None:
    assert RUNTIMES.names() == ("torch", "onnxruntime", "cuda", "onnxruntime-basic")
    assert all(isinstance(RUNTIMES.get(name), Runtime) for name in RUNTIMES.names())
    with pytest.raises(ConfigError, match=r"budgets.latency.runtime must be one of .* but got 'tflite'\."):
        RUNTIMES.get("tflite")


def test_config_checks_runtime_names_against_the_registry() -> None:
    for name in RUNTIMES.names():
        assert LatencyConfig(runtime=name).runtime == name
    with pytest.raises(ConfigError, match="Did you mean 'onnxruntime-basic'"):
        config_from_dict({"budgets": {"latency": {"runtime": "onnxruntime-basics"}}})


# --------------------------------------------------------------------------- shared helpers


def test_time_runs_warms_up_then_times_each_run() -> None:
    calls: list[int] = []
    times = time_runs(lambda: calls.append(1), warmup=3, repeats=5)
    assert len(calls) == 8 and len(times) == 5 and all(t >= 0 for t in times)


def test_median_p90() -> None:
    assert median_p90([1.0, 2.0, 3.0, 4.0, 100.0]) == (3.0, pytest.approx(61.6))  # numpy's linear interpolation
    assert median_p90([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_onnxruntime_session_threads_and_optimization(tmp_path: Path) -> None:
    model = onnx_bytes(tiny_net(), (1, 3, 8, 8))
    basic = onnxruntime_session(model, threads=2, optimization="basic")
    options = basic.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert basic.get_providers() == ["CPUExecutionProvider"]
    path = tmp_path / "tiny.onnx"
    path.write_bytes(model)
    default = onnxruntime_session(path)  # a path, ONNX Runtime's thread defaults, every optimisation
    assert default.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert default.get_session_options().intra_op_num_threads == 0
    x = torch.randn(1, 3, 8, 8).numpy()
    feed = {basic.get_inputs()[0].name: x}
    assert basic.run(None, feed)[0] == pytest.approx(default.run(None, feed)[0], abs=1e-5)
    with pytest.raises(ValueError, match="but got 'fast'"):
        onnxruntime_session(model, optimization="fast")


# --------------------------------------------------------------------------- onnxruntime-basic


def test_onnxruntime_basic_measures_a_small_net() -> None:
    runtime = RUNTIMES.get("onnxruntime-basic")
    assert isinstance(runtime, OnnxRuntimeBasic) and runtime.optimization == "basic"
    net = tiny_net().train()
    config = LatencyConfig(runtime="onnxruntime-basic", threads=1, warmup=1, repeats=5, predict=False)
    median, p90 = measure_latency(net, 16, 3, config)
    assert 0 < median <= p90 < 1000
    assert net.training and next(net.parameters()).device.type == "cpu"  # mode and device restored
    report = check_budgets(net, 16, 3, make_budgets(BudgetConfig(max_latency_ms=1e6, latency=config)))
    assert report.feasible and report.values["latency_ms"] > 0
    assert "onnxruntime-basic runtime" in make_budgets(BudgetConfig(latency=config))[-1].unit


def test_onnxruntime_basic_has_a_lookup_table_of_its_own(tmp_path: Path) -> None:
    config = LatencyConfig(runtime="onnxruntime-basic", warmup=1, repeats=3, table_dir=str(tmp_path))
    assert default_table_path(config).name.startswith("onnxruntime-basic-1t-b1-")
    assert machine_header(config)["runtime"] == "onnxruntime-basic"
    assert isinstance(RUNTIMES.get("onnxruntime-basic").overhead_probe(), nn.Conv2d)  # as for onnxruntime
    table = LatencyTable(config)
    assert table.predict(tiny_net(), 16, 3) > 0 and table.measured == 1
    assert default_table_path(config).exists()
