"""Fused ops behind one dispatch function each (the PyTorch reference until the Triton kernels land)."""

from .reference import bce_with_negatives_reference as bce_with_negatives
from .reference import grouped_ia3_reference as grouped_ia3
from .reference import grouped_lora_reference as grouped_lora

__all__ = ["bce_with_negatives", "grouped_ia3", "grouped_lora"]
