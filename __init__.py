"""PerPEFT: personalized parameter-efficient fine-tuning of CLIP for multimodal sequential recommendation.

The public API is ``perpeft.train``, ``perpeft.open_run``, ``perpeft.RunConfig`` and the rest of
``perpeft.engine.api`` (its docstring shows the whole path); everything else is private and may change.

The checkout's root is this package: its folders ``engine/``, ``kernels/`` and ``cli/`` are
``perpeft.engine``, ``perpeft.kernels`` and ``perpeft.cli``. Importing ``perpeft`` loads nothing else: the
API (and torch with it) is imported on first use of one of its names.
"""

import importlib
import importlib.util
import os
import sys

__version__ = "0.1.0"
_API = (
    "DEMO_DEFAULTS",
    "PAPER_DEFAULTS",
    "CaseItem",
    "CaseStudy",
    "Catalog",
    "DemoSpec",
    "Embeddings",
    "EpochRecord",
    "LoraSettings",
    "Prepared",
    "Progress",
    "Recommendations",
    "ResolvedConfig",
    "Run",
    "RunConfig",
    "TitleAttention",
    "attention_map",
    "case_study",
    "dataset_from_frames",
    "demo_dataset",
    "divergence",
    "experiment",
    "fetch_images",
    "learning_curves",
    "open_run",
    "parameter_counts",
    "prepare_amazon2023",
    "prepare_authors",
    "reseed",
    "resume",
    "reuse_freed_memory",
    "serve",
    "train",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    if name in _API:
        return getattr(importlib.import_module(f"{__name__}.engine.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


def _answer_only_as_subpackage(name: str, init_file: str) -> None:
    """Keep a folder of the checkout from answering to a bare top-level name.

    ``engine/``, ``kernels/`` and ``cli/`` call this before anything else, with their ``__name__`` and
    ``__file__``. Imported as ``perpeft.<folder>`` it does nothing. Imported as plain ``<folder>`` — the
    checkout's root is on ``sys.path``, as under ``python -m …`` or ``python -m pytest`` started there —
    the name belongs to whatever else provides it (Hugging Face's ``kernels``, which transformers imports,
    say): that module is loaded in the folder's place, or the import fails as if the folder were not there.
    """
    if name.startswith(f"{__name__}."):
        return
    folder = os.path.realpath(os.path.dirname(init_file))
    checkout = os.path.dirname(folder)
    search = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != checkout]
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec(name, search) if find_spec is not None else None
        if spec is not None and not (spec.origin and os.path.realpath(spec.origin).startswith(folder + os.sep)):
            break
    else:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if spec.loader is not None:
        spec.loader.exec_module(module)
