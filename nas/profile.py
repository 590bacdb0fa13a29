"""What a search space, or one candidate, costs: ``nas space show`` and ``nas profile``.

Every figure states its unit: MFLOPs are millions of multiply-accumulates (fvcore,
batch 1, at the candidate's resolution); params in millions; memory in MiB.
"""

from __future__ import annotations

from typing import Any

from nas.budgets import count_mflops, count_params_m
from search_spaces import SearchSpace, build

__all__ = ["space_report"]


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
