"""nas.hardware.latency_table: per-piece latencies cached on disk, predictions, and the predicted-reject path."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from torch import nn

import nas.hardware.budgets
import nas.hardware.latency_table
from nas.config import BudgetConfig, LatencyConfig
from nas.hardware import check_budgets, make_budgets, measure_latency
from nas.hardware.budgets import LatencyBudget
from nas.hardware.latency_table import LatencyTable, default_table_dir, default_table_path, machine_header, piece_key, split_pieces
from search_spaces import build, create_space


@pytest.fixture
def config(tmp_path: Path) -> LatencyConfig:
    return LatencyConfig(runtime="torch", threads=1, batch_size=1, warmup=1, repeats=3, table_dir=str(tmp_path / "tables"))


def small_arch():
    return create_space("mobilenet", 16, 1).extreme(smallest=True)


def count_measurements(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Record the input shape of every piece (and overhead) measurement the table makes."""
    calls: list[tuple[int, ...]] = []
    real = nas.hardware.latency_table.measure_latency_of_input

    def counting(model, shape, cfg):
        calls.append(tuple(shape))
        return real(model, shape, cfg)

    monkeypatch.setattr(nas.hardware.latency_table, "measure_latency_of_input", counting)
    return calls


def forbid_measurements(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("measured although it should not have been")

    monkeypatch.setattr(nas.hardware.latency_table, "measure_latency_of_input", fail)


# --------------------------------------------------------------------------- keys and paths


def test_piece_key_depends_on_repr_hidden_attributes_and_shape() -> None:
    a, b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    assert piece_key(a, (1, 8, 10, 10)) == piece_key(b, (1, 8, 10, 10))  # weights do not matter
    assert piece_key(a, (1, 8, 10, 10)) != piece_key(a, (1, 8, 12, 12))
    assert piece_key(a, (1, 8, 10, 10)) != piece_key(nn.Conv2d(8, 8, 5, padding=2), (1, 8, 10, 10))
    # an attribute the repr does not show (timm's has_skip) still tells pieces apart
    c, d = nn.Sequential(nn.Identity()), nn.Sequential(nn.Identity())
    c.has_skip, d.has_skip = True, False
    assert repr(c) == repr(d) and piece_key(c, (1, 4)) != piece_key(d, (1, 4))
    # training mode does not
    assert piece_key(a.train(), (1, 8, 10, 10)) == piece_key(b.eval(), (1, 8, 10, 10))


def test_default_paths_follow_xdg_and_name_the_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_table_dir() == tmp_path / "asymnas" / "latency"
    path = default_table_path(LatencyConfig(runtime="onnxruntime", threads=2, batch_size=4))
    assert path.parent == tmp_path / "asymnas" / "latency"
    assert path.name.startswith("onnxruntime-2t-b4-") and path.suffix == ".json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_table_dir() == Path.home() / ".cache" / "asymnas" / "latency"
    assert default_table_path(LatencyConfig(table_dir=str(tmp_path / "t"))).parent == tmp_path / "t"


def test_split_pieces_uses_pieces_or_the_whole_model() -> None:
    net = build(small_arch())
    assert [repr(p) for p in split_pieces(net)] == [repr(p) for p in net.pieces()]
    seq = nn.Sequential(nn.Conv2d(1, 2, 3))
    assert split_pieces(seq) == [seq]


# --------------------------------------------------------------------------- prediction


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_prediction_is_close_to_measurement(runtime: str, config: LatencyConfig) -> None:
    config = replace(config, runtime=runtime, warmup=3, repeats=15)
    arch = small_arch()
    net = build(arch)
    table = LatencyTable(config)
    predicted = table.predict(net, arch.resolution, 1)
    measured = measure_latency(net, arch.resolution, 1, config)[0]
    assert 0 < predicted
    assert measured / 3 < predicted < measured * 3  # loose: timings on a shared CPU are noisy
    # the prediction is the sum of the pieces less the per-call overhead of all but one
    times = [e["ms"] for e in table.entries.values()]
    assert len(times) == len(net.pieces())
    assert table.overhead_ms is not None and table.overhead_ms >= 0
    assert predicted == pytest.approx(max(sum(times) - (len(times) - 1) * table.overhead_ms, max(times)))


def test_cache_file_has_a_header_and_is_reused(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    arch = small_arch()
    net = build(arch)
    calls = count_measurements(monkeypatch)
    first = LatencyTable(config)
    predicted = first.predict(net, arch.resolution, 1)
    pieces = len(net.pieces())
    assert first.measured == pieces and len(calls) == pieces + 1  # every piece, and the overhead once
    data = json.loads(default_table_path(config).read_text())
    header = data["header"]
    assert header == machine_header(config)
    assert {"runtime", "threads", "batch_size", "torch", "onnxruntime", "cpu", "host"} <= set(header)
    assert (header["runtime"], header["threads"], header["batch_size"]) == ("torch", 1, 1)
    assert len(data["entries"]) == pieces and data["overhead_ms"] == first.overhead_ms
    assert not list(default_table_path(config).parent.glob("*.tmp"))  # written via a temporary file
    # a second table (another worker, a later study) measures nothing
    forbid_measurements(monkeypatch)
    second = LatencyTable(config)
    assert len(second) == pieces and second.stale_reason is None
    assert second.predict(net, arch.resolution, 1) == predicted
    assert second.measured == 0


def test_candidates_share_pieces(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    space = create_space("mobilenet", 16, 1)
    a = space.make(16, 0.35, [(1, 3, 3, False)] * 4)
    b = space.make(16, 0.35, [(1, 3, 3, False)] * 3 + [(1, 5, 3, False)])  # only the last stage differs
    table = LatencyTable(config)
    table.predict(build(a), 16, 1)
    calls = count_measurements(monkeypatch)
    table.predict(build(b), 16, 1)
    assert len(calls) == 1 and table.measured == len(build(a).pieces()) + 1
    # a new resolution is a new input shape for every piece
    table.predict(build(a), 20, 1)
    assert len(calls) == 1 + len(build(a).pieces())


def test_header_mismatch_starts_fresh_and_replaces_the_file(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    arch = small_arch()
    net = build(arch)
    LatencyTable(config).predict(net, arch.resolution, 1)
    path = default_table_path(config)
    data = json.loads(path.read_text())
    data["header"]["torch"] = "0.0.1"
    data["entries"] = {"old": {"ms": 123.0}}
    path.write_text(json.dumps(data))
    messages: list[str] = []
    calls = count_measurements(monkeypatch)
    table = LatencyTable(config, log=messages.append)
    assert len(table) == 0 and table.overhead_ms is None
    assert "torch" in table.stale_reason and len(messages) == 1 and "starting a fresh one" in messages[0]
    table.predict(net, arch.resolution, 1)
    assert len(calls) == len(net.pieces()) + 1  # measured again, overhead included
    saved = json.loads(path.read_text())
    assert saved["header"] == machine_header(config) and "old" not in saved["entries"]  # replaced, not mixed


def test_unreadable_file_starts_fresh(config: LatencyConfig) -> None:
    path = default_table_path(config)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    messages: list[str] = []
    table = LatencyTable(config, log=messages.append)
    assert len(table) == 0 and "unreadable" in table.stale_reason and messages
    arch = small_arch()
    table.predict(build(arch), arch.resolution, 1)
    assert json.loads(path.read_text())["header"] == machine_header(config)


def test_other_configurations_use_other_files(config: LatencyConfig) -> None:
    arch = small_arch()
    LatencyTable(config).predict(build(arch), arch.resolution, 1)
    two = replace(config, threads=2)
    assert default_table_path(two) != default_table_path(config)
    assert len(LatencyTable(two)) == 0
    # an explicit path holding another configuration's table is not used
    other = LatencyTable(two, path=default_table_path(config), log=None)
    assert len(other) == 0 and "threads" in other.stale_reason


def test_two_workers_merge_their_entries(config: LatencyConfig) -> None:
    space = create_space("mobilenet", 16, 1)
    a, b = space.make(16, 0.35, [(1, 3, 3, False)] * 4), space.make(16, 0.5, [(1, 3, 3, False)] * 4)
    first, second = LatencyTable(config), LatencyTable(config)  # both opened before either saved
    first.predict(build(a), 16, 1)
    second.predict(build(b), 16, 1)
    saved = json.loads(default_table_path(config).read_text())["entries"]
    assert set(first.entries) <= set(saved) and set(second.entries) <= set(saved)


def test_a_model_without_pieces_is_one_piece(config: LatencyConfig) -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    table = LatencyTable(config)
    predicted = table.predict(net, 12, 1)
    assert predicted > 0 and table.measured == 1 and len(table) == 1


# --------------------------------------------------------------------------- in the latency budget


def test_predicted_over_the_margin_is_rejected_without_measuring(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    arch = small_arch()
    net = build(arch)
    predicted = LatencyTable(config).predict(net, arch.resolution, 1)

    def no_measurement(*args, **kwargs):
        raise AssertionError("the candidate was measured")

    monkeypatch.setattr(nas.hardware.budgets, "measure_latency", no_measurement)
    forbid_measurements(monkeypatch)  # everything comes from the table
    limit = predicted / 2
    budgets = make_budgets(BudgetConfig(max_latency_ms=limit, latency=config))
    report = check_budgets(net, arch.resolution, 1, budgets)
    assert not report.feasible
    assert "latency_ms" not in report.values and "latency_p90_ms" not in report.values
    assert report.values["latency_predicted_ms"] == pytest.approx(predicted)
    assert report.reason.startswith("latency_ms")
    assert "predicted from the latency lookup table, not measured" in report.reason
    assert "15% over the limit" in report.reason
    assert report.constraints[-1] == pytest.approx((predicted - limit) / limit)
    assert set(report.values) == {"params_m", "mflops", "memory_mb", "latency_predicted_ms"}


def test_predicted_within_the_margin_is_measured(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    arch = small_arch()
    net = build(arch)
    predicted = LatencyTable(config).predict(net, arch.resolution, 1)
    calls: list[int] = []
    real = nas.hardware.budgets.measure_latency

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(nas.hardware.budgets, "measure_latency", counting)
    # just above the limit, but within the 15% margin: measured, and judged on the measurement
    budget = LatencyBudget(predicted / 1.1, config)
    measured = budget.measure(net, arch.resolution, 1)
    assert calls == [1] and measured.measured and measured.note == ""
    assert measured.extra["latency_predicted_ms"] == pytest.approx(predicted)
    assert measured.extra["latency_p90_ms"] >= measured.value > 0
    # a generous limit: measured as well
    report = check_budgets(net, arch.resolution, 1, [LatencyBudget(1e6, config)])
    assert report.feasible and calls == [1, 1]
    assert {"latency_ms", "latency_p90_ms", "latency_predicted_ms"} <= set(report.values)


def test_predict_off_measures_and_writes_no_table(config: LatencyConfig) -> None:
    arch = small_arch()
    report = check_budgets(build(arch), arch.resolution, 1, [LatencyBudget(1e-6, replace(config, predict=False))])
    assert not report.feasible and "predicted" not in report.reason
    assert "latency_ms" in report.values and "latency_predicted_ms" not in report.values
    assert not default_table_path(config).exists()


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_predict_leaves_every_module_in_its_mode(runtime: str, config: LatencyConfig) -> None:
    # pieces are fresh containers (in training mode) around the net's own layers: measuring
    # them must not switch those layers of an eval-mode net to training, nor the reverse
    arch = small_arch()
    net = build(arch)
    table = LatencyTable(replace(config, runtime=runtime))
    for training in (False, True):
        net.train(training)
        table.predict(net, arch.resolution, 1)
        assert all(m.training == training for m in net.modules())
    net.eval()
    measure_latency(net.pieces()[0], 8, 1, replace(config, runtime=runtime))
    assert not any(m.training for m in net.modules())
