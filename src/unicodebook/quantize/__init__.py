"""Quantization: nearest-code search, the unified codebook and its update rules, RQ/HQ stacking."""

from .codebook import CodebookRule, UnifiedCodebook
from .search import nearest_code
from .stacked import (
    HierarchicalQuantizer,
    QuantOutput,
    ResidualQuantizer,
    build_quantizer,
    position_embeddings,
)

__all__ = [
    "CodebookRule",
    "UnifiedCodebook",
    "nearest_code",
    "HierarchicalQuantizer",
    "ResidualQuantizer",
    "QuantOutput",
    "build_quantizer",
    "position_embeddings",
]
