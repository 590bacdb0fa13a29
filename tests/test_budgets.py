"""nas.hardware: MAC and parameter counts, peak memory, latency, and the cheapest-first budget check."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from torch import nn

from nas.config import BudgetConfig, LatencyConfig, config_from_dict
from nas.errors import BudgetError, ConfigError, GalleryError
from nas.hardware import (
    BUDGETS,
    Budget,
    check_budgets,
    count_mflops,
    count_params_m,
    make_budgets,
    measure_latency,
    measure_latency_of_input,
    measure_peak_memory_mb,
)
from nas.hardware.budgets import LatencyBudget, MemoryBudget, MflopsBudget, ParamsBudget
from nas.search.driver import run_search
from search_spaces import build, create_space


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency lookup tables of these tests go to a temporary folder, never the user's cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


FAST_LATENCY = LatencyConfig(runtime="torch", threads=1, batch_size=1, warmup=1, repeats=5)


def tiny_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


# --------------------------------------------------------------------------- counting


def test_count_mflops_tiny_sequential_by_hand() -> None:
    # conv 3->8, k3, stride 2 on 16x16 -> 8x8 output: 8*8 positions * 8 out * (3*3*3) MACs each;
    # linear 8->5: 40 MACs. Biases, batch norm, ReLU and pooling are not counted.
    expected = (8 * 8 * 8 * 27 + 8 * 5) / 1e6
    assert count_mflops(tiny_net(), resolution=16, in_chans=3) == pytest.approx(expected, rel=0, abs=1e-12)


def test_count_mflops_scales_with_resolution() -> None:
    # at 32x32 the conv output is 16x16: four times the conv MACs, same linear MACs
    expected = (16 * 16 * 8 * 27 + 8 * 5) / 1e6
    assert count_mflops(tiny_net(), resolution=32, in_chans=3) == pytest.approx(expected, rel=0, abs=1e-12)


def test_count_mflops_depthwise_and_pointwise_by_hand() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),  # 10*10*4*9 = 3600
        nn.Conv2d(4, 4, 5, padding=2, groups=4, bias=False),  # 10*10*4*25 = 10000
        nn.BatchNorm2d(4),
        nn.Hardswish(),
        nn.Conv2d(4, 6, 1),  # 10*10*6*4 = 2400
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 3),  # 450
    )
    assert count_mflops(net, resolution=10, in_chans=1) == pytest.approx((3600 + 10000 + 2400 + 450) / 1e6, rel=0, abs=1e-12)


def test_count_mflops_counts_matmul() -> None:
    class MatMul(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 7))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.flatten(x, 1) @ self.weight  # (1, 16) @ (16, 7): 112 MACs

    assert count_mflops(MatMul(), resolution=4, in_chans=1) == pytest.approx(112 / 1e6, rel=0, abs=1e-12)


def test_count_mflops_is_batch_one_and_restores_training_mode() -> None:
    net = tiny_net().train()
    before = [b.clone() for b in net[1].buffers()]
    count_mflops(net, 16, 3)
    assert net.training
    assert all(torch.equal(a, b) for a, b in zip(before, net[1].buffers()))  # eval: running stats untouched
    net.eval()
    count_mflops(net, 16, 3)
    assert not net.training


def test_count_params_m_by_hand() -> None:
    # conv 3*8*9 + 8, batch norm 8 + 8 (running stats are buffers), linear 8*5 + 5
    assert count_params_m(tiny_net()) == pytest.approx((216 + 8 + 16 + 45) / 1e6, rel=0, abs=1e-15)


def test_counts_of_a_query_net_grow_with_width() -> None:
    space = create_space("mobilenet", 16, 1)
    narrow = space.make(20, 0.35, [(1, 3, 3, False)] * 4)
    wide = space.make(20, 1.0, [(1, 3, 3, False)] * 4)
    assert count_mflops(build(narrow), 20, 1) < count_mflops(build(wide), 20, 1)
    assert count_params_m(build(narrow)) < count_params_m(build(wide))
    # MACs grow with resolution, parameters do not
    net = build(narrow)
    assert count_mflops(net, 20, 1) < count_mflops(net, 32, 1)


# --------------------------------------------------------------------------- latency


def test_measure_latency_median_and_p90() -> None:
    net = tiny_net().train()
    median, p90 = measure_latency(net, 16, 3, FAST_LATENCY)
    assert 0 < median <= p90
    assert net.training  # mode restored
    assert next(net.parameters()).device.type == "cpu"


def test_measure_latency_restores_thread_count() -> None:
    before = torch.get_num_threads()
    measure_latency(tiny_net(), 16, 3, LatencyConfig(threads=2, warmup=0, repeats=3))
    assert torch.get_num_threads() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_measure_latency_cuda_without_cuda_is_budget_error() -> None:
    with pytest.raises(BudgetError, match="cuda"):
        measure_latency(tiny_net(), 16, 3, LatencyConfig(runtime="cuda", repeats=3))


# --------------------------------------------------------------------------- budgets


def test_make_budgets_cheapest_first() -> None:
    budgets = make_budgets(BudgetConfig(max_mflops=3.0, max_params_m=1.0, max_latency_ms=5.0, latency=FAST_LATENCY, max_memory_mb=2.0))
    assert [b.name for b in budgets] == ["params_m", "mflops", "memory_mb", "latency_ms"]
    assert [b.cost for b in budgets] == sorted(b.cost for b in budgets)
    assert len({b.cost for b in budgets}) == 4
    assert [b.limit for b in budgets] == [1.0, 3.0, 2.0, 5.0]
    assert isinstance(budgets[3], LatencyBudget) and budgets[3].config == FAST_LATENCY


def test_budgets_registry_is_keyed_by_the_recorded_name() -> None:
    assert set(BUDGETS.names()) == {"params_m", "mflops", "memory_mb", "latency_ms"}
    assert all(BUDGETS.get(name).name == name for name in BUDGETS.names())
    with pytest.raises(ConfigError, match="Did you mean 'mflops'"):
        BUDGETS.get("mflop")


def test_make_budgets_without_limits_measures_everything() -> None:
    budgets = make_budgets(BudgetConfig(latency=FAST_LATENCY))
    assert len(budgets) == 4 and all(b.limit is None for b in budgets)
    report = check_budgets(tiny_net(), 16, 3, budgets)
    assert report.feasible and report.reason == ""
    assert report.constraints == [0.0, 0.0, 0.0, 0.0]
    assert set(report.values) == {"params_m", "mflops", "memory_mb", "latency_ms", "latency_p90_ms", "latency_predicted_ms"}
    # without a limit the prediction is recorded, and the latency is measured as well
    without = check_budgets(tiny_net(), 16, 3, make_budgets(BudgetConfig(latency=replace(FAST_LATENCY, predict=False))))
    assert set(without.values) == {"params_m", "mflops", "memory_mb", "latency_ms", "latency_p90_ms"}


def test_budget_describe_names_the_unit() -> None:
    assert ParamsBudget(1.5).describe() == "params_m <= 1.5 (M parameters)"
    assert MflopsBudget(None).describe().startswith("mflops no limit (")
    latency = LatencyBudget(2.0, LatencyConfig(threads=3, batch_size=4))
    assert "torch runtime" in latency.describe() and "3 thread" in latency.describe() and "batch 4" in latency.describe()
    memory = MemoryBudget(8.0, batch_size=4)
    assert memory.describe() == "memory_mb <= 8 (MiB peak of one forward pass (weights + activations), batch 4)"


@pytest.mark.parametrize("limit", [0, -1.0])
def test_budget_limit_must_be_positive(limit: float) -> None:
    with pytest.raises(ValueError, match="limit"):
        ParamsBudget(limit)


def _budgets(params: float | None, mflops: float | None, latency: float | None, memory: float | None = None, predict: bool = True) -> list[Budget]:
    config = BudgetConfig(max_mflops=mflops, max_params_m=params, max_latency_ms=latency, latency=replace(FAST_LATENCY, predict=predict), max_memory_mb=memory)
    return make_budgets(config)


def test_params_violation_skips_mflops_and_latency() -> None:
    net = tiny_net()
    params = count_params_m(net)
    report = check_budgets(net, 16, 3, _budgets(params / 2, 1e-9, 1e-9, 1e-9))
    assert not report.feasible
    assert set(report.values) == {"params_m"}
    assert report.values["params_m"] == pytest.approx(params)
    assert len(report.violations) == 1 and report.violations[0].startswith("params_m")
    assert "params_m" in report.reason
    assert report.constraints[0] == pytest.approx((params - params / 2) / (params / 2))
    assert report.constraints[1:] == [0.0, 0.0, 0.0]
    assert report.seconds >= 0


def test_mflops_violation_skips_latency() -> None:
    net = tiny_net()
    mflops = count_mflops(net, 16, 3)
    report = check_budgets(net, 16, 3, _budgets(10.0, mflops / 4, 1e-9, 1e-9))
    assert not report.feasible
    assert set(report.values) == {"params_m", "mflops"}
    assert report.constraints[0] == pytest.approx((report.values["params_m"] - 10.0) / 10.0)
    assert report.constraints[0] < 0
    assert report.constraints[1] == pytest.approx(3.0)  # (m - m/4) / (m/4)
    assert report.constraints[2:] == [0.0, 0.0]
    assert "mflops" in report.reason and "params_m" not in report.reason


def test_feasible_when_all_limits_met() -> None:
    net = tiny_net()
    report = check_budgets(net, 16, 3, _budgets(1.0, 1.0, 1e6, 100.0))
    assert report.feasible
    assert report.violations == [] and report.reason == ""
    assert set(report.values) == {"params_m", "mflops", "memory_mb", "latency_ms", "latency_p90_ms", "latency_predicted_ms"}
    assert report.values["latency_ms"] <= report.values["latency_p90_ms"]
    expected = [
        (report.values["params_m"] - 1.0) / 1.0,
        (report.values["mflops"] - 1.0) / 1.0,
        (report.values["memory_mb"] - 100.0) / 100.0,
        (report.values["latency_ms"] - 1e6) / 1e6,
    ]
    assert report.constraints == pytest.approx(expected)
    assert all(c <= 0 for c in report.constraints)


def test_limit_exactly_met_is_feasible() -> None:
    net = tiny_net()
    params = count_params_m(net)
    report = check_budgets(net, 16, 3, [ParamsBudget(params)])
    assert report.feasible
    assert report.constraints == [0.0]


def test_measure_all_measures_every_budget() -> None:
    net = tiny_net()
    report = check_budgets(net, 16, 3, _budgets(1e-9, 1e-9, 1e-9, 1e-9, predict=False), measure_all=True)
    assert not report.feasible
    assert set(report.values) == {"params_m", "mflops", "memory_mb", "latency_ms", "latency_p90_ms"}
    assert [v.split()[0] for v in report.violations] == ["params_m", "mflops", "memory_mb", "latency_ms"]
    assert report.reason == "; ".join(report.violations)
    assert all(c > 0 for c in report.constraints)
    assert report.constraints[1] == pytest.approx((report.values["mflops"] - 1e-9) / 1e-9)


def test_rejected_large_candidate_completes_without_measuring_latency() -> None:
    space = create_space("mobilenet", 16, 1)
    arch = space.extreme(smallest=False)
    net = build(arch)
    # latency would take very long with these settings; the params violation must stop first
    slow = LatencyConfig(threads=1, warmup=100_000, repeats=100_000)
    budgets = make_budgets(BudgetConfig(max_params_m=0.01, max_mflops=0.01, max_latency_ms=0.01, latency=slow))
    report = check_budgets(net, arch.resolution, 1, budgets)
    assert not report.feasible
    assert "latency_ms" not in report.values and "mflops" not in report.values
    assert report.values["params_m"] > 0.01


# --------------------------------------------------------------------------- runtimes


def test_latency_config_runtimes_and_options() -> None:
    for runtime in ("torch", "onnxruntime", "cuda"):
        assert LatencyConfig(runtime=runtime).runtime == runtime
    with pytest.raises(ConfigError, match="budgets.latency.runtime must be one of 'torch', 'onnxruntime', 'cuda', .* but got 'tflite'"):
        LatencyConfig(runtime="tflite")
    with pytest.raises(ConfigError, match="Did you mean 'onnxruntime'"):
        LatencyConfig(runtime="onnxruntim")
    with pytest.raises(ConfigError, match="margin"):
        LatencyConfig(margin=-0.1)
    with pytest.raises(ConfigError, match="margin"):
        LatencyConfig(margin=float("nan"))
    default = LatencyConfig()
    assert default.predict is True and default.margin == 0.15 and default.table_dir is None
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="budgets.max_memory_mb"):
            BudgetConfig(max_memory_mb=bad)
    assert BudgetConfig().max_memory_mb is None


def test_onnxruntime_latency_of_a_query_net() -> None:
    space = create_space("mobilenet", 16, 1)
    arch = space.extreme(smallest=True)
    net = build(arch).train()
    config = LatencyConfig(runtime="onnxruntime", threads=1, warmup=1, repeats=5)
    median, p90 = measure_latency(net, arch.resolution, 1, config)
    assert 0 < median <= p90 < 1000
    assert net.training  # mode restored
    assert next(net.parameters()).device.type == "cpu"
    budget = LatencyBudget(None, replace(config, predict=False))
    assert "onnxruntime runtime" in budget.unit
    measured = budget.measure(net, arch.resolution, 1)
    assert measured.value > 0 and measured.extra["latency_p90_ms"] >= measured.value


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_latency_of_input_takes_any_shape(runtime: str) -> None:
    config = LatencyConfig(runtime=runtime, warmup=1, repeats=3)
    block = nn.Sequential(nn.Conv2d(5, 7, 3, padding=1), nn.ReLU())
    median, p90 = measure_latency_of_input(block, (2, 5, 6, 9), config)
    assert 0 < median <= p90
    head = nn.Sequential(nn.Flatten(1), nn.Linear(12, 3))
    assert measure_latency_of_input(head, (1, 3, 2, 2), config)[0] > 0


def test_onnxruntime_latency_is_quiet(capfd: pytest.CaptureFixture[str], recwarn: pytest.WarningsRecorder) -> None:
    measure_latency(tiny_net(), 16, 3, LatencyConfig(runtime="onnxruntime", warmup=0, repeats=3))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert len(recwarn) == 0


# --------------------------------------------------------------------------- peak memory


def test_peak_memory_of_a_single_conv_by_hand() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    weights = (8 * 3 * 3 * 3 + 8) * 4  # float32 weight and bias
    x = 3 * 16 * 16 * 4
    out = 8 * 16 * 16 * 4
    assert measure_peak_memory_mb(conv, 16, 3) * 2**20 == weights + x + out == 12160


def test_peak_memory_of_a_chain_frees_dead_activations() -> None:
    # two convs: when the second returns, input, first and second output are all alive
    two = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(2, 16, 1))
    weights = (2 * 27 + 2) * 4 + (16 * 2 + 16) * 4
    x, a, c = 3 * 256 * 4, 2 * 256 * 4, 16 * 256 * 4
    assert measure_peak_memory_mb(two, 16, 3) * 2**20 == weights + x + a + c
    # three convs: the first output has died before the large third one is allocated;
    # the in-place ReLU and the Flatten view allocate nothing
    three = nn.Sequential(
        nn.Conv2d(3, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(2, 16, 1), nn.Flatten(1)
    )
    weights = (2 * 27 + 2) * 4 + (2 * 18 + 2) * 4 + (16 * 2 + 16) * 4
    b = 2 * 256 * 4
    assert measure_peak_memory_mb(three, 16, 3) * 2**20 == weights + x + b + c  # not + a
    # batch 2 doubles the activations, not the weights
    assert measure_peak_memory_mb(three, 16, 3, batch_size=2) * 2**20 == weights + 2 * (x + b + c)


def test_peak_memory_counts_shared_weights_once_and_restores_mode() -> None:
    conv = nn.Conv2d(4, 4, 1, bias=False)
    net = nn.Sequential(conv, conv).train()  # one weight, used twice
    x = out = 4 * 8 * 8 * 4
    assert measure_peak_memory_mb(net, 8, 4) * 2**20 == 4 * 4 * 4 + x + 2 * out
    assert net.training


def test_peak_memory_of_query_nets() -> None:
    space = create_space("mobilenet", 16, 1)
    small, large = space.extreme(smallest=True), space.extreme(smallest=False)
    small_mb = measure_peak_memory_mb(build(small), small.resolution, 1)
    large_net = build(large)
    large_mb = measure_peak_memory_mb(large_net, large.resolution, 1)
    weights_mb = sum(t.numel() * 4 for t in [*large_net.parameters(), *large_net.buffers()] if t.is_floating_point()) / 2**20
    assert 0 < small_mb < large_mb
    assert large_mb > weights_mb  # activations on top of the weights
    assert large_mb < 4 * weights_mb + 4


def test_memory_budget_rejects_when_the_limit_is_tiny() -> None:
    net = tiny_net()
    mb = measure_peak_memory_mb(net, 16, 3)
    report = check_budgets(net, 16, 3, _budgets(1.0, 1.0, 1e6, mb / 2))
    assert not report.feasible
    assert set(report.values) == {"params_m", "mflops", "memory_mb"}  # latency not reached
    assert report.values["memory_mb"] == pytest.approx(mb)
    assert report.reason.startswith("memory_mb") and "MiB peak of one forward pass" in report.reason
    assert report.constraints[2] == pytest.approx(1.0) and report.constraints[3] == 0.0
    assert check_budgets(net, 16, 3, [MemoryBudget(mb)]).feasible


# --------------------------------------------------------------------------- the verdict over the latency limit


class SlowAtFirst(nn.Module):
    """A tiny convolution whose first ``slow_calls`` forward passes also sleep ``sleep_s``: a reading taken while
    another job held the machine, then the same network on an idle one."""

    def __init__(self, slow_calls: int, sleep_s: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.calls, self.slow_calls, self.sleep_s = 0, slow_calls, sleep_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.slow_calls:
            time.sleep(self.sleep_s)
        return self.conv(x)


def test_a_latency_reading_over_the_limit_is_read_again_before_it_rejects(tmp_path) -> None:
    config = replace(FAST_LATENCY, predict=False, table_dir=str(tmp_path))
    net = SlowAtFirst(slow_calls=FAST_LATENCY.warmup + FAST_LATENCY.repeats, sleep_s=0.02)  # the whole first reading: >= 20 ms
    report = check_budgets(net, 16, 3, [LatencyBudget(5.0, config)], measure_all=True)
    assert report.feasible, report.reason
    assert report.values["latency_ms"] < 5.0  # the second reading's, on the machine as it is now
    assert net.calls > FAST_LATENCY.warmup + FAST_LATENCY.repeats  # it was measured again
    # a network that is truly over the limit is still rejected, saying what it read
    slow = SlowAtFirst(slow_calls=10**6, sleep_s=0.01)
    report = check_budgets(slow, 16, 3, [LatencyBudget(5.0, config)], measure_all=True)
    assert not report.feasible and report.values["latency_ms"] >= 10.0
    assert "the lowest of 2 readings" in report.reason


def test_a_machine_that_stays_busy_gets_more_readings_and_says_so(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nas.hardware.budgets.BUSY_BACKOFF_S", 0.2)  # wait 0.2 s for the machine, not 5
    budget = LatencyBudget(5.0, replace(FAST_LATENCY, predict=False, table_dir=str(tmp_path)))
    budget.table.probe_ms = 1e-6  # the load probe once ran this fast here: every probe now says "busy"
    slow = SlowAtFirst(slow_calls=10**6, sleep_s=0.01)
    report = check_budgets(slow, 16, 3, [budget], measure_all=True)
    assert not report.feasible
    assert "the lowest of 4 readings" in report.reason and "the machine was busy" in report.reason and "measure again" in report.reason


def test_a_missing_gallery_checkpoint_is_reported_before_any_budget_verdict(tmp_path, tiny_config) -> None:
    raw = tiny_config(tmp_path, gallery__checkpoint=str(tmp_path / "missing.safetensors"), budgets__max_mflops=0.0001)
    with pytest.raises(GalleryError, match="missing.safetensors does not exist"):
        run_search(config_from_dict(raw), log=lambda _: None)
