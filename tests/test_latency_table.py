"""nas.hardware.latency_table: per-piece latencies cached on disk, predictions, the predicted-reject path, and
entries measured under load or with noise (refused, re-measured on disagreement, ``nas profile --refresh``)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
from torch import nn

import nas.hardware.budgets
import nas.hardware.latency_table
import nas.hardware.runtimes
from nas.cli import main
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
    real = nas.hardware.latency_table.measure_runs_of_input

    def counting(model, shape, cfg):
        calls.append(tuple(shape))
        return real(model, shape, cfg)

    monkeypatch.setattr(nas.hardware.latency_table, "measure_runs_of_input", counting)
    return calls


def forbid_measurements(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("measured although it should not have been")

    monkeypatch.setattr(nas.hardware.latency_table, "measure_runs_of_input", fail)


def steady_machine(monkeypatch: pytest.MonkeyPatch, spread_check: bool = True) -> None:
    """A load probe that always reads the same, so only what a test simulates looks like load.

    Without ``spread_check`` no piece is refused as noisy either: for tests that count measurements.
    """
    monkeypatch.setattr(nas.hardware.latency_table, "load_probe_ms", lambda threads: 0.1)
    if not spread_check:
        monkeypatch.setattr(nas.hardware.latency_table, "MAX_SPREAD", float("inf"))


def slowed(factor: float):
    """``time_runs`` of a machine where another job slows every run ``factor`` times (pieces and load probe alike)."""
    real = nas.hardware.runtimes.time_runs

    def slow(run, warmup, repeats):
        return [t * factor for t in real(run, warmup, repeats)]

    return slow


class Jittery(nn.Module):
    """Two of every three calls sleep 2 ms: the median of its runs sits far above its fastest runs."""

    def __init__(self) -> None:
        super().__init__()
        self._calls = 0  # private: not part of the piece's key

    def forward(self, x):
        self._calls += 1
        if self._calls % 3:
            time.sleep(0.002)
        return x


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
    measured = min(measure_latency(net, arch.resolution, 1, config)[0] for _ in range(3))  # load only ever slows a run
    assert 0 < predicted
    # the right magnitude only: timings on a shared CPU are noisy, and the table's accuracy is what
    # experiments/benchmarks/latency_table.py measures (Spearman, median error), not a test
    assert measured / 10 < predicted < measured * 10
    # the prediction is the sum of the pieces less the per-call overhead of all but one
    times = [e["ms"] for e in table.entries.values()]
    assert len(times) == len(net.pieces())
    assert table.overhead_ms is not None and table.overhead_ms >= 0
    assert predicted == pytest.approx(max(sum(times) - (len(times) - 1) * table.overhead_ms, max(times)))


def test_cache_file_has_a_header_and_is_reused(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    steady_machine(monkeypatch, spread_check=False)
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
    assert len(data["entries"]) == pieces and data["overhead"]["ms"] == first.overhead_ms
    assert not list(default_table_path(config).parent.glob("*.tmp"))  # written via a temporary file
    # a second table (another worker, a later study) measures nothing
    forbid_measurements(monkeypatch)
    second = LatencyTable(config)
    assert len(second) == pieces and second.stale_reason is None
    assert second.predict(net, arch.resolution, 1) == predicted
    assert second.measured == 0


def test_candidates_share_pieces(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    steady_machine(monkeypatch, spread_check=False)
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
    steady_machine(monkeypatch, spread_check=False)
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
    steady_machine(monkeypatch)
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
    assert calls and measured.measured
    assert (calls == [1]) == (measured.note == "")  # read once, or (its first reading over the limit) again, saying so
    assert measured.extra["latency_predicted_ms"] == pytest.approx(predicted)
    assert measured.extra["latency_p90_ms"] >= measured.value > 0
    # a generous limit: measured as well
    before = len(calls)
    report = check_budgets(net, arch.resolution, 1, [LatencyBudget(1e6, config)])
    assert report.feasible and len(calls) == before + 1
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


# --------------------------------------------------------------------------- poisoned entries, noise and --refresh


def test_pieces_measured_under_load_are_not_trusted_once_the_load_is_gone(config: LatencyConfig) -> None:
    # The reported fault: a table filled while another job ran predicted 76x the measured
    # latency, and every later search predicted (and rejected fitting candidates) from it.
    arch = small_arch()
    net = build(arch)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(nas.hardware.runtimes, "time_runs", slowed(1000))
        loaded = LatencyTable(config, log=None).predict(net, arch.resolution, 1)
    predicted = LatencyTable(config, log=None).predict(net, arch.resolution, 1)
    assert predicted is None or predicted < loaded / 20  # the loaded entries are re-measured, not used
    limit = loaded / 100  # ~10x what the candidate takes: it fits
    report = check_budgets(net, arch.resolution, 1, [LatencyBudget(limit, config)])
    assert report.feasible, report.reason


def test_a_busy_machine_stores_nothing_and_the_candidate_is_measured_whole(config: LatencyConfig) -> None:
    space = create_space("mobilenet", 16, 1)
    a, b = space.make(16, 0.35, [(1, 3, 3, False)] * 4), space.make(16, 0.5, [(1, 5, 3, False)] * 4)
    table = LatencyTable(config, log=None)
    assert table.predict(build(a), 16, 1) is not None or table.refused  # an idle machine: measured and stored
    before = json.loads(default_table_path(config).read_text())["entries"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(nas.hardware.runtimes, "time_runs", slowed(100))
        assert table.predict(build(b), 16, 1) is None  # the load probe reads 100x its fastest: nothing measured
        measured = LatencyBudget(None, config).measure(build(b), 16, 1)
    assert measured.measured and "latency_predicted_ms" not in measured.extra
    assert json.loads(default_table_path(config).read_text())["entries"].keys() == before.keys()


def test_a_poisoned_entry_is_replaced_when_a_whole_measurement_disagrees(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    steady_machine(monkeypatch)
    arch = small_arch()
    net = build(arch)
    LatencyTable(config, log=None).predict(net, arch.resolution, 1)
    path = default_table_path(config)
    data = json.loads(path.read_text())
    key = next(k for k, e in data["entries"].items() if "ms" in e)
    poisoned = data["entries"][key]["ms"] = 10_000.0  # a poisoned entry that looks clean (low dispersion, idle machine)
    path.write_text(json.dumps(data))
    # today: every later prediction uses it, and a candidate that fits is rejected unmeasured
    assert LatencyTable(config, log=None).predict(net, arch.resolution, 1) >= poisoned
    # a candidate measured whole (no limit here, or `nas profile`) shows the disagreement
    measured = LatencyBudget(None, config).measure(net, arch.resolution, 1)
    assert measured.measured and measured.extra["latency_predicted_ms"] >= poisoned > 100 * measured.value
    saved = json.loads(path.read_text())["entries"][key]
    assert saved.get("ms") is None or saved["ms"] < poisoned / 100  # replaced (or refused if the re-measurement was noisy)
    predicted = LatencyTable(config, log=None).predict(net, arch.resolution, 1)
    assert predicted is None or predicted < poisoned / 100
    assert check_budgets(net, arch.resolution, 1, [LatencyBudget(poisoned / 100, config)]).feasible


def test_a_noisy_piece_is_re_measured_then_refused(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    steady_machine(monkeypatch)
    calls = count_measurements(monkeypatch)
    config = replace(config, repeats=5)
    table = LatencyTable(config, log=None)
    piece = Jittery()
    assert table.predict(piece, 8, 1) is None  # no prediction: the candidate is measured whole
    assert calls.count((1, 1, 8, 8)) == nas.hardware.latency_table.ATTEMPTS  # measured, re-measured, then refused
    assert len(table) == 0 and table.refused == 1 and table.measured == 1
    entry = json.loads(default_table_path(config).read_text())["entries"][piece_key(piece, (1, 1, 8, 8))]
    assert "ms" not in entry and "noisy" in entry["refused"] and entry["spread"] > nas.hardware.latency_table.MAX_SPREAD
    assert table.predict(piece, 8, 1) is None and calls.count((1, 1, 8, 8)) == nas.hardware.latency_table.ATTEMPTS  # not retried here
    report = check_budgets(piece, 8, 1, [LatencyBudget(1e6, config)])
    assert report.feasible and "latency_ms" in report.values and "latency_predicted_ms" not in report.values


def test_entries_record_their_dispersion_and_the_machine_load(config: LatencyConfig) -> None:
    arch = small_arch()
    LatencyTable(config, log=None).predict(build(arch), arch.resolution, 1)
    data = json.loads(default_table_path(config).read_text())
    assert data["header"]["format"] == 2 and data["probe_ms"] > 0
    for entry in data["entries"].values():
        if "ms" in entry:
            assert entry["p10_ms"] <= entry["ms"] <= entry["p90_ms"]
            assert entry["spread"] == pytest.approx(entry["ms"] / entry["p10_ms"] - 1)
            assert entry["spread"] <= nas.hardware.latency_table.MAX_SPREAD and entry["probe_ms"] > 0


def test_an_old_format_table_is_not_trusted(config: LatencyConfig) -> None:
    path = default_table_path(config)
    path.parent.mkdir(parents=True)
    header = {**machine_header(config), "format": 1}
    path.write_text(json.dumps({"header": header, "overhead_ms": 0.001, "entries": {"k": {"ms": 1009.6, "p90_ms": 1010.0}}}))
    messages: list[str] = []
    table = LatencyTable(config, log=messages.append)
    assert len(table) == 0 and table.overhead_ms is None
    assert "format 1" in table.stale_reason and "re-measured" in messages[0]


def test_a_replaced_entry_wins_over_a_stale_copy_of_another_worker(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    steady_machine(monkeypatch, spread_check=False)
    space = create_space("mobilenet", 16, 1)
    a, b = space.make(16, 0.35, [(1, 3, 3, False)] * 4), space.make(16, 0.5, [(1, 3, 3, False)] * 4)
    LatencyTable(config, log=None).predict(build(a), 16, 1)
    first, second = LatencyTable(config, log=None), LatencyTable(config, log=None)  # both hold the same entries
    first.refresh(build(a), 16, 1)  # re-measures and replaces a's entries
    replaced = json.loads(default_table_path(config).read_text())["entries"]
    second.predict(build(b), 16, 1)  # measures b's pieces and saves, holding a's old entries in memory
    saved = json.loads(default_table_path(config).read_text())["entries"]
    assert all(saved[k] == replaced[k] for k in first.entries if k in replaced)


def test_a_disagreement_re_measures_each_piece_once_per_table(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    steady_machine(monkeypatch, spread_check=False)
    arch = small_arch()
    net = build(arch)
    table = LatencyTable(config, log=None)
    predicted = table.predict(net, arch.resolution, 1)
    calls = count_measurements(monkeypatch)
    assert not table.reconcile(net, arch.resolution, 1, predicted, predicted * 1.1)  # within the margin
    assert calls == []
    assert table.reconcile(net, arch.resolution, 1, predicted, predicted * 3)
    pieces = len(table)  # its distinct pieces: the table holds nothing else
    assert table.rechecked == pieces and len(calls) == pieces + 1  # its pieces and the overhead
    assert not table.reconcile(net, arch.resolution, 1, predicted, predicted * 3) and len(calls) == pieces + 1


def test_a_disagreement_names_the_candidate(config: LatencyConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    steady_machine(monkeypatch, spread_check=False)
    arch = small_arch()
    net = build(arch)
    messages: list[str] = []
    table = LatencyTable(config, log=messages.append)
    predicted = table.predict(net, arch.resolution, 1)
    assert table.reconcile(net, arch.resolution, 1, predicted, predicted * 3)
    line = next(m for m in messages if "re-measuring" in m)
    assert f"for candidate {arch.to_string()!r} measured at" in line  # the string nas profile --arch takes


def test_profile_refresh_re_measures_and_replaces_the_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arch = "space=resnet res=16 width=1 stem=16 stages=bb_r1_k3_s1_c8/bb_r1_k3_s2_c16 head=0 embed=8 in=1 act=relu"
    argv = ["profile", "--arch", arch, "--table-dir", str(tmp_path), "--threads", "1"]
    assert main(argv) == 0
    path = next(tmp_path.glob("torch-1t-b1-*.json"))
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["ms"], entry["at"] = 1009.6, 0.0  # poisoned, long ago
    path.write_text(json.dumps(data))
    capsys.readouterr()
    assert main([*argv, "--refresh"]) == 0
    out = capsys.readouterr().out
    saved = json.loads(path.read_text())["entries"]
    assert saved.keys() == data["entries"].keys()
    assert all(e["at"] > 0 and e.get("ms") != 1009.6 for e in saved.values())  # every entry re-measured
    assert "re-measured" in out
