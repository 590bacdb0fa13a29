"""What width, depth and resolution cost in prunings of gallery models of every supported family.

For each model (timm, random weights: the costs depend on the structure only), a
``search_spaces.Root`` is built (dependency analysis and channel ranking; its seconds and
the number of coupled channel groups are printed), then the MFLOPs (fvcore multiply-
accumulates, batch 1) and parameters of members:

* the root itself at its resolution, and at 3/4 and 1/2 of it (for a ViT, position
  embeddings resampled);
* width 3/4 and 1/2 in every stage (for a ViT: the residual stream and every MLP);
* one block per stage (a ViT: half of its blocks);
* for a ViT, one head less in every block.

    .venv/bin/python experiments/benchmarks/rooted_costs.py [--models resnet50,...]

Cost: about half a minute.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from nas.hardware import count_mflops
from search_spaces import Pruning, Root

MODELS = "resnet18,resnet50,mobilenetv3_large_100,tf_efficientnet_lite2,convnext_atto,deit_tiny_patch16_224"
NATIVE = {"tf_efficientnet_lite2": 224, "deit_tiny_patch16_224": 224}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    args = parser.parse_args()
    print(f"{'model':<24}{'groups':>7}{'root s':>8}  {'member':<34}{'res':>5}{'MFLOPs':>10}{'params M':>10}{'of root':>9}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=0).eval()
        res = NATIVE.get(name, 224)
        start = time.perf_counter()
        root = Root(model, resolution=res if hasattr(model, "patch_embed") else 64)
        seconds = time.perf_counter() - start
        everywhere = lambda w: {s: w for s in ["stem", *root.units, "head"]}  # noqa: E731
        vit = root.family.name == "vit"
        rows = [
            ("root", Pruning(), res),
            ("root, 3/4 resolution", Pruning(resolution=res * 3 // 4), res * 3 // 4),
            ("root, 1/2 resolution", Pruning(resolution=res // 2), res // 2),
            ("width 3/4 everywhere", Pruning(widths=everywhere(0.75)), res),
            ("width 1/2 everywhere", Pruning(widths=everywhere(0.5)), res),
            ("half the blocks" if vit else "one block per stage",
             Pruning(depths={s: max(1, len(b) // 2) if vit else 1 for s, b in root.family.stages(model).items()}), res),
        ]
        if vit:
            heads = model.blocks[0].attn.num_heads
            rows.append((f"{heads - 1} of {heads} heads per block", Pruning(heads={u: heads - 1 for u in root.units}), res))
        base = None
        for label, pruning, r in rows:
            net = root.member(pruning)
            mflops = count_mflops(net, r, 3)
            base = base or mflops
            params = sum(p.numel() for p in net.parameters()) / 1e6
            print(f"{name:<24}{len(root.groups):>7}{seconds:>8.2f}  {label:<34}{r:>5}{mflops:>10.1f}{params:>10.2f}{mflops / base:>9.3f}")


if __name__ == "__main__":
    main()
