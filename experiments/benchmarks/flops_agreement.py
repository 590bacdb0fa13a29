"""Our MFLOPs against an independent count, for every space and three timm reference models.

Ours: fvcore's multiply-accumulates of conv / linear / matmul (``nas.hardware.count_mflops``).
Independent: PyTorch's ``torch.utils.flop_counter.FlopCounterMode``, which counts
floating-point operations (2 per multiply-accumulate), halved. For every registered space
the smallest, median (of 41 random members, by MFLOPs) and largest member are counted at
their resolution, and three timm models at 224 x 224 with 3 channels, beside the
multiply-adds their papers report (the papers count the 1000-class classifier, which
the query net replaces by its embedding layer, and MobileNetV3's paper counts its SE and
hard-swish layers slightly differently; the column is for orientation only).

    .venv/bin/python experiments/benchmarks/flops_agreement.py
"""

from __future__ import annotations

import optuna
import torch
from torch.utils.flop_counter import FlopCounterMode

from nas.hardware import count_mflops
from _members import median_member
from search_spaces import Architecture, build, create_space, list_spaces, timm_architecture

# Multiply-adds reported by the papers, in millions (224 x 224, 1000-class head).
PUBLISHED = {
    "mobilenetv3_large_100": (219, "Howard et al., ICCV 2019, Table 3"),
    "efficientnet_lite0": None,  # no paper figure for the Lite variant
    "resnet18": (1800, "He et al., CVPR 2016, Table 1 (1.8 x 10^9)"),
}


def independent_mflops(arch: Architecture) -> float:
    model = build(arch).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, arch.in_chans, arch.resolution, arch.resolution))
    return counter.get_total_flops() / 2 / 1e6


def members(space_name: str) -> list[tuple[str, Architecture]]:
    space = create_space(space_name, embed_dim=128, in_chans=1)
    return [("smallest", space.extreme(True)), ("median", median_member(space)), ("largest", space.extreme(False))]


def main() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)
    print("MFLOPs = millions of multiply-accumulates, batch 1, at the model's input resolution")
    print(f"{'model':<34} {'res':>4} {'ours (fvcore)':>13} {'FlopCounter/2':>13} {'ours/indep':>10}  published")
    rows = [(f"{name} {which}", arch) for name in list_spaces() for which, arch in members(name)]
    rows += [(f"timm {name}", timm_architecture(name, 224, 1000, 3)) for name in PUBLISHED]
    worst = 0.0
    for label, arch in rows:
        ours = count_mflops(build(arch), arch.resolution, arch.in_chans)
        theirs = independent_mflops(arch)
        worst = max(worst, abs(ours / theirs - 1))
        published = PUBLISHED.get(arch.timm_model)
        note = f"{published[0]} M ({published[1]})" if published else ""
        print(f"{label:<34} {arch.resolution:>4} {ours:>13.3f} {theirs:>13.3f} {ours / theirs:>10.4f}  {note}")
    print(f"largest disagreement: {worst:.2%}")


if __name__ == "__main__":
    main()
