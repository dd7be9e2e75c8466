"""Fused ops (:mod:`perpeft.kernels.ops`): Triton kernels for CUDA tensors, PyTorch references otherwise."""

from perpeft import _answer_only_as_subpackage

_answer_only_as_subpackage(__name__, __file__)
