"""The PerPEFT domain: data, input caches, CLIP encoder with grouped adapters, SASRec, training, evaluation."""

from perpeft import _answer_only_as_subpackage

_answer_only_as_subpackage(__name__, __file__)
