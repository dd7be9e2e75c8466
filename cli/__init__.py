"""Thin Click layer over `perpeft.engine`."""

from perpeft import _answer_only_as_subpackage

_answer_only_as_subpackage(__name__, __file__)
