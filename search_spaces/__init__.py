"""Declarative search spaces of query networks, built with timm's block builder."""

from __future__ import annotations

from search_spaces._base import Architecture, SearchSpace
from search_spaces._blocks import BlockSpec, decode_block, encode_block
from search_spaces._mobilenet import MobileNetSpace
from search_spaces._net import QueryNet, build
from search_spaces._registry import create_space, list_spaces, register_space, space_options

__all__ = [
    "Architecture",
    "BlockSpec",
    "MobileNetSpace",
    "QueryNet",
    "SearchSpace",
    "build",
    "create_space",
    "decode_block",
    "encode_block",
    "list_spaces",
    "register_space",
    "space_options",
]
