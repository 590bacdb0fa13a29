"""The query network modules built from an :class:`Architecture`."""

from __future__ import annotations

import torch
from torch import nn

from search_spaces._base import Architecture
from search_spaces._head import EmbeddingHead, L2Normalise
from search_spaces._rooted import Pruning, Root
from search_spaces._timm_builder import activation, build_stages, create_timm_model, init_weights, scale_channels, stem_conv
from search_spaces._timm_models import timm_kwargs

__all__ = ["QueryNet", "TimmQueryNet", "PrunedQueryNet", "build"]


def embedding_layer(features: int, arch: Architecture) -> EmbeddingHead | L2Normalise:
    """The layer from pooled features to the embedding: a linear projection, or with ``arch.projection`` False none
    (the features L2-normalised; they must already have ``arch.embed_dim`` channels)."""
    if arch.projection:
        return EmbeddingHead(features, arch.embed_dim)
    if features != arch.embed_dim:
        raise ValueError(f"{arch.to_string()} has no embedding layer (proj=none), so its {features} pooled features must be the "
                         f"{arch.embed_dim}-d embedding; give it a projection.")
    return L2Normalise()


class QueryNet(nn.Module):
    """Stem, timm-built stages, an optional 1x1 head conv, global pooling and an embedding layer.

    Follows timm's head contract: :meth:`forward_features` returns the last feature map,
    :meth:`forward_head` pools it and (unless ``pre_logits``) projects to the gallery
    embedding dimension and L2-normalises. The input is expected at ``arch.resolution``.
    """

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        act = activation(arch.act)
        stem_chs = scale_channels(arch.stem_chs, arch.width)
        self.conv_stem = stem_conv(arch.in_chans, stem_chs, arch.padding)
        self.bn1 = nn.BatchNorm2d(stem_chs, eps=arch.bn_eps)
        self.act1 = act(inplace=True)
        self.blocks, chs = build_stages(arch.stages, stem_chs, arch.width, arch.act, arch.padding, arch.bn_eps)
        if arch.head_chs:
            self.num_features = scale_channels(arch.head_chs, arch.width)
            self.conv_head: nn.Module = nn.Conv2d(chs, self.num_features, 1, bias=False)
            self.bn2: nn.Module = nn.BatchNorm2d(self.num_features, eps=arch.bn_eps)
            self.act2: nn.Module = act(inplace=True)
        else:  # ResNet layout: pool the last stage directly
            self.num_features = chs
            self.conv_head, self.bn2, self.act2 = nn.Identity(), nn.Identity(), nn.Identity()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.embed = embedding_layer(self.num_features, arch)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_stem(x)))
        x = self.blocks(x)
        return self.act2(self.bn2(self.conv_head(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        if pre_logits:
            return x
        return self.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def pieces(self) -> list[nn.Module]:
        """The network as a chain of modules whose composition is :meth:`forward`.

        Stem, then every block of every stage, then the head (conv head, pooling, embedding
        and normalisation). Per-piece latencies are what the latency lookup table stores.
        """
        stem = nn.Sequential(self.conv_stem, self.bn1, self.act1)
        blocks = [block for stage in self.blocks for block in stage]
        pool = nn.Sequential(self.conv_head, self.bn2, self.act2, self.global_pool, nn.Flatten(1))
        return [stem, *blocks, _Head(pool, self.embed)]


class TimmQueryNet(nn.Module):
    """A timm model (``arch.timm_model``) with the embedding head of :class:`QueryNet`.

    timm's own pooling and pre-logits layers are kept (for MobileNetV3 that includes its
    1x1 head conv after pooling); the classifier is replaced by the embedding layer.
    """

    def __init__(self, arch: Architecture, model: nn.Module | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.model = model if model is not None else create_timm_model(arch.timm_model, arch.in_chans, **timm_kwargs(arch))
        with torch.no_grad():
            was_training = self.model.training
            self.model.eval()
            probe = self.model.forward_head(self.model.forward_features(torch.zeros(1, arch.in_chans, arch.resolution, arch.resolution)), pre_logits=True)
            self.model.train(was_training)
        self.num_features = int(probe.shape[1])
        self.embed = embedding_layer(self.num_features, arch)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.model.forward_head(x, pre_logits=True)
        if pre_logits:
            return x
        return self.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def pieces(self) -> list[nn.Module]:
        """Stem, every block, head: see :meth:`QueryNet.pieces`. Knows timm's EfficientNet,
        MobileNetV3 and ResNet layouts; any other model is one piece before the head."""
        m = self.model
        if hasattr(m, "conv_stem") and hasattr(m, "blocks"):
            stem = nn.Sequential(m.conv_stem, m.bn1)
            blocks = [block for stage in m.blocks for block in stage]
            if hasattr(m, "norm_head"):  # MobileNetV3 / LCNet: pool first, then the 1x1 head conv
                pool = nn.Sequential(m.global_pool, m.conv_head, m.norm_head, m.act2, m.flatten)
            else:  # EfficientNet: head conv, then pool
                pool = nn.Sequential(m.conv_head, m.bn2, m.global_pool)
            return [stem, *blocks, _Head(pool, self.embed)]
        if hasattr(m, "layer1"):  # ResNet
            stem = nn.Sequential(m.conv1, m.bn1, m.act1, m.maxpool)
            blocks = [block for name in ("layer1", "layer2", "layer3", "layer4") for block in getattr(m, name)]
            return [stem, *blocks, _Head(m.global_pool, self.embed)]
        return [_Features(m), _Head(_PreLogits(m), self.embed)]


class _Head(nn.Module):
    """Everything after the last block as one module: pooling to a vector, embedding, L2 norm.

    Built from the net's own layers, so its ``repr`` spells out what it computes.
    """

    def __init__(self, pool: nn.Module, embed: EmbeddingHead | L2Normalise) -> None:
        super().__init__()
        self.pool, self.embed = pool, embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.pool(x))


class _Features(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class _PreLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=True)


class PrunedQueryNet(TimmQueryNet):
    """A structured pruning of a timm model (``arch.pruning``, see :class:`search_spaces.Root`) with the embedding
    head of :class:`QueryNet`. Built here with random weights (the structure depends only on how many channels,
    blocks and heads are kept); the ``pruned`` space's evaluator fills it with the gallery's own."""

    def __init__(self, arch: Architecture, model: nn.Module | None = None) -> None:
        if model is None:
            with torch.random.fork_rng(devices=[]):
                root = Root(create_timm_model(arch.timm_model, arch.in_chans), arch.in_chans)
                model, _ = root.pruned(Pruning.from_text(arch.pruning, arch.resolution))
        super().__init__(arch, model)


def build(arch: Architecture) -> QueryNet | TimmQueryNet:
    """Build the query network of ``arch`` (randomly initialised)."""
    if arch.pruning:
        return PrunedQueryNet(arch)
    if arch.timm_model:
        return TimmQueryNet(arch)
    return QueryNet(arch)

