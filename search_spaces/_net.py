"""The query network module built from an :class:`Architecture`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces._base import Architecture
from search_spaces._timm_builder import activation, build_stages, init_weights, scale_channels

__all__ = ["QueryNet", "build"]


class QueryNet(nn.Module):
    """Stem, timm-built stages, a 1x1 head conv, global pooling and an embedding layer.

    Follows timm's head contract: :meth:`forward_features` returns the last feature map,
    :meth:`forward_head` pools it and (unless ``pre_logits``) projects to the gallery
    embedding dimension and L2-normalises. The input is expected at ``arch.resolution``.
    """

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        act = activation(arch.act)
        stem_chs = scale_channels(arch.stem_chs, arch.width)
        self.conv_stem = nn.Conv2d(arch.in_chans, stem_chs, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = act(inplace=True)
        self.blocks, chs = build_stages(arch.stages, stem_chs, arch.width, arch.act)
        self.num_features = scale_channels(arch.head_chs, arch.width)
        self.conv_head = nn.Conv2d(chs, self.num_features, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(self.num_features)
        self.act2 = act(inplace=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(self.num_features, arch.embed_dim)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        return self.act2(self.bn2(self.conv_head(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        if pre_logits:
            return x
        return F.normalize(self.embed(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def pieces(self) -> list[nn.Module]:
        """The network as a chain of modules whose composition is :meth:`forward`.

        Stem, then every block of every stage, then the head (conv head, pooling, embedding
        and normalisation). Per-piece latencies are what the latency lookup table stores.
        """
        stem = nn.Sequential(self.conv_stem, self.bn1, self.act1)
        blocks = [block for stage in self.blocks for block in stage]
        return [stem, *blocks, _Head(self)]


class _Head(nn.Module):
    """Everything after the last block, as one module (a view on the net's own layers)."""

    def __init__(self, net: QueryNet) -> None:
        super().__init__()
        self.conv_head, self.bn2, self.act2, self.global_pool, self.embed = net.conv_head, net.bn2, net.act2, net.global_pool, net.embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.bn2(self.conv_head(x)))
        return F.normalize(self.embed(torch.flatten(self.global_pool(x), 1)), dim=1)


def build(arch: Architecture) -> QueryNet:
    """Build the query network of ``arch`` (randomly initialised)."""
    return QueryNet(arch)
