"""What a search space, or one candidate, costs: ``nas space show`` and ``nas profile``.

Every figure states its unit: MFLOPs are millions of multiply-accumulates (fvcore,
batch 1, at the candidate's resolution); params in millions; memory in MiB.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nas.hardware.latency_table import LatencyTable
from nas.hardware.measure import count_mflops, count_params_m, measure_peak_memory_mb
from nas.hardware.runtimes import measure_latency
from search_spaces import Architecture, SearchSpace, build

if TYPE_CHECKING:
    from nas.config import LatencyConfig

__all__ = ["space_report", "Profile", "profile_architecture", "profile_table"]


def _resolutions(space: SearchSpace) -> list[int]:
    info = space.describe()
    return list(info.get("resolutions") or [space.extreme(True).resolution])


def _choices_lines(info: dict[str, Any]) -> list[str]:
    skip = {"space", "num_architectures"}
    return [f"  {key:<18} {value}" for key, value in info.items() if key not in skip]


def space_report(space: SearchSpace) -> str:
    """The space's choices, its size, and its smallest / largest member's cost at each resolution."""
    info = space.describe()
    lines = [f"Search space {space.name!r}: {info['num_architectures']:,} architectures", "", "Choices:"]
    lines += _choices_lines(info)
    lines += [
        "",
        "Smallest and largest member at each resolution (MFLOPs: millions of multiply-accumulates, fvcore, batch 1):",
        f"{'res':>4} {'smallest MFLOPs':>15} {'params M':>8} {'largest MFLOPs':>14} {'params M':>8}",
    ]
    for res in _resolutions(space):
        row = []
        for smallest in (True, False):
            arch = space.extreme(smallest=smallest, resolution=res)
            net = build(arch)
            row += [count_mflops(net, arch.resolution, arch.in_chans), count_params_m(net)]
        lines.append(f"{res:>4} {row[0]:>15.3f} {row[1]:>8.3f} {row[2]:>14.3f} {row[3]:>8.3f}")
    lines += ["", f"Smallest: {space.extreme(True).to_string()}", f"Largest:  {space.extreme(False).to_string()}"]
    return "\n".join(lines)


@dataclass
class Profile:
    """What one candidate costs, measured and predicted (``predicted_ms`` None: the table made no prediction)."""

    arch: Architecture
    mflops: float
    params_m: float
    memory_mb: float
    latency_ms: float
    latency_p90_ms: float
    predicted_ms: float | None


def profile_architecture(
    arch: Architecture,
    config: LatencyConfig,
    log: Callable[[str], None] | None = None,
    table: LatencyTable | None = None,
    refresh: bool = False,
) -> Profile:
    """MFLOPs, params, peak memory, measured latency and the lookup table's prediction of ``arch``.

    ``table`` (default: the table of ``config``, opened here) predicts; with ``refresh`` the
    candidate's entries are re-measured and replaced first. As in a search, a measurement
    that disagrees with the prediction by more than ``config.margin`` replaces the entries
    (the prediction shown is the one made before).
    """
    net = build(arch).eval()
    res, chans = arch.resolution, arch.in_chans
    table = table if table is not None else LatencyTable(config, log=log)
    if refresh:
        table.refresh(net, res, chans)
    predicted = table.predict(net, res, chans)
    median, p90 = measure_latency(net, res, chans, config)
    table.reconcile(net, res, chans, predicted, median)
    return Profile(
        arch, count_mflops(net, res, chans), count_params_m(net), measure_peak_memory_mb(net, res, chans, config.batch_size),
        median, p90, predicted,
    )


def profile_table(profiles: Sequence[Profile], config: LatencyConfig, table: LatencyTable | None = None) -> str:
    """Side by side: MFLOPs, params, memory, measured and predicted latency (``-``: no prediction).

    With ``table``, a last line says what it measured, refused and re-measured.
    """
    lines = [
        f"Latency: {config.runtime} runtime, {config.threads} thread(s), batch {config.batch_size}; median of {config.repeats} runs "
        f"after {config.warmup} warm-up. MFLOPs: millions of multiply-accumulates (fvcore, batch 1). Memory: MiB peak of one "
        f"forward pass (weights + activations), batch {config.batch_size}.",
        f"{'#':>3} {'res':>4} {'MFLOPs':>9} {'params M':>8} {'mem MiB':>8} {'measured ms':>11} {'p90 ms':>7} {'predicted ms':>12} {'pred/meas':>9}  architecture",
    ]
    for i, p in enumerate(profiles):
        predicted = "-" if p.predicted_ms is None else f"{p.predicted_ms:.3f}"
        ratio = "-" if p.predicted_ms is None else f"{p.predicted_ms / p.latency_ms:.2f}"
        lines.append(
            f"{i:>3} {p.arch.resolution:>4} {p.mflops:>9.3f} {p.params_m:>8.3f} {p.memory_mb:>8.3f} {p.latency_ms:>11.3f} "
            f"{p.latency_p90_ms:>7.3f} {predicted:>12} {ratio:>9}  {p.arch.to_string()}"
        )
    if table is not None:
        lines.append(
            f"Lookup table {table.path}: {len(table)} entries. Pieces measured now: {table.measured}, of which {table.rechecked} "
            f"re-measured (--refresh, or a measurement more than {config.margin:.0%} from the prediction) and {table.refused} "
            "refused as noisy or under load."
        )
    return "\n".join(lines)
