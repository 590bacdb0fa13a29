"""Declarative search spaces of query networks, built with timm's block builder."""

from __future__ import annotations

from search_spaces._base import Architecture, SearchSpace
from search_spaces._blocks import BlockSpec, decode_block, encode_block
from search_spaces._efficientnet import EfficientNetSpace
from search_spaces._gallery_space import GallerySpace, RootError, mbconv_architecture
from search_spaces._head import EmbeddingHead, L2Normalise
from search_spaces._macs import count_macs
from search_spaces._mobilenet import MobileNetSpace
from search_spaces._net import PrunedQueryNet, QueryNet, TimmQueryNet, build
from search_spaces._pruned_space import PrunedSpace
from search_spaces._resnet import ResNetSpace
from search_spaces._rooted import FAMILIES as ROOT_FAMILIES
from search_spaces._rooted import PrunedNet, Pruning, Root
from search_spaces._supernet import Supernet, SupernetError, recalibrate_bn, slice_tensor
from search_spaces._rooted_supernet import RootedSupernet, supernet_over
from search_spaces._timm_builder import timm_model_exists
from search_spaces._timm_models import FAMILIES as TIMM_FAMILIES
from search_spaces._timm_models import timm_architecture
from search_spaces._timm_zoo import TimmZooSpace
from search_spaces._registry import create_space, list_spaces, register_space, space_options

__all__ = [
    "Architecture",
    "BlockSpec",
    "EfficientNetSpace",
    "EmbeddingHead",
    "GallerySpace",
    "L2Normalise",
    "MobileNetSpace",
    "PrunedNet",
    "PrunedQueryNet",
    "PrunedSpace",
    "Pruning",
    "QueryNet",
    "ROOT_FAMILIES",
    "ResNetSpace",
    "Root",
    "RootedSupernet",
    "RootError",
    "Supernet",
    "SupernetError",
    "SearchSpace",
    "TIMM_FAMILIES",
    "TimmQueryNet",
    "TimmZooSpace",
    "build",
    "count_macs",
    "create_space",
    "decode_block",
    "encode_block",
    "list_spaces",
    "mbconv_architecture",
    "recalibrate_bn",
    "register_space",
    "slice_tensor",
    "supernet_over",
    "space_options",
    "timm_architecture",
    "timm_model_exists",
]
