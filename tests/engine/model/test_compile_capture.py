"""torch.compile captures the grouped CLIP encoder (LoRA and (IA)3) and SASRec with its BCE loss whole: one
graph, no graph break, the fused ops as single registered nodes forward (``perpeft::*``) and backward
(``perpeft::*_backward``), and outputs and gradients equal to eager.

The compiled runs use ``aot_eager`` (AOTAutograd traces the joint forward/backward graph and runs it
without a code generator): it covers everything capture needs (dynamo's trace, the ops' fake
implementations and registered autograd) in seconds, where inductor would spend most of the test's time
generating C++ for these small graphs. The ops take their PyTorch path here (CPU tensors); the CUDA
compiled-step timing is the GPU check's ``encoder-compile`` step (not yet measured on a GPU).
"""

from collections.abc import Callable, Iterator

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from perpeft.engine.clip.loading import ClipBundle, load_clip
from perpeft.engine.config.run_config import LoraSettings
from perpeft.engine.model.encoders import GroupedClipEncoder
from perpeft.engine.model.groups import RowGroups
from perpeft.engine.model.recommender import SASRec
from perpeft.kernels.ops import bce_with_negatives

CPU = torch.device("cpu")
GROUPS = 3
ITEM_GROUPS = [2, 0, 1, 2, 0]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def tiny() -> ClipBundle:
    return load_clip("tiny")


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test traces from scratch (no compiled code or recompile count carried over), on the ops' PyTorch path."""
    monkeypatch.setenv("PERPEFT_KERNELS", "torch")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class RecordingBackend:
    """``aot_eager`` that keeps the operator names of every forward and backward graph AOTAutograd makes."""

    def __init__(self) -> None:
        self.graphs: dict[str, list[set[str]]] = {"forward": [], "backward": []}
        self.backend = aot_autograd(fw_compiler=self._compiler("forward"), bw_compiler=self._compiler("backward"))

    def _compiler(self, kind: str) -> Callable:
        def compile_graph(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
            self.graphs[kind].append({str(node.target) for node in graph.graph.nodes if node.op == "call_function"})
            return make_boxed_func(graph.forward)

        return compile_graph

    def ops(self, kind: str) -> set[str]:
        """The ``perpeft`` operators of the one ``kind`` graph (raises unless there is exactly one)."""
        (graph,) = self.graphs[kind]
        return {name for name in graph if name.startswith("perpeft.")}


def _assert_whole_graph(module: Callable, *args: object) -> None:
    """dynamo's explain of ``module(*args)``: one graph, no break."""
    explained = torch._dynamo.explain(module)(*args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def _compare(run: Callable[[Callable], torch.Tensor], module: torch.nn.Module, backend: RecordingBackend) -> None:
    """``run(module)`` eager and compiled (fullgraph: a graph break raises): same output and the same
    gradients of every parameter."""
    params = [p for p in module.parameters() if p.requires_grad]

    def outcome(fn: Callable) -> tuple[torch.Tensor, list[torch.Tensor]]:
        module.zero_grad(set_to_none=True)
        out = run(fn)
        out.pow(2).sum().backward()
        return out.detach(), [p.grad.clone() for p in params]

    expected, expected_grads = outcome(module)
    actual, grads = outcome(torch.compile(module, backend=backend.backend, fullgraph=True))
    torch.testing.assert_close(actual, expected, **TOLERANCE)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, **TOLERANCE)


def _encoder_inputs(bundle: ClipBundle, groups: RowGroups) -> tuple[object, ...]:
    titles = [f"red golf bag {k}" for k in range(groups.rows)]
    input_ids, attention_mask = (torch.from_numpy(array) for array in bundle.tokenizer(titles))
    generator = torch.Generator().manual_seed(0)
    size = bundle.image_size
    pixels = torch.randint(0, 256, (groups.rows, 3, size, size), generator=generator, dtype=torch.uint8)
    return input_ids, attention_mask, pixels, groups


@pytest.mark.parametrize("peft", ["lora", "ia3"])
@pytest.mark.parametrize("batch", ["mixed", "single"])
def test_grouped_encoder_compiles_whole(tiny: ClipBundle, peft: str, batch: str) -> None:
    """Training mode, every batch with its own :class:`RowGroups`. LoRA dropout is off where outputs are
    compared (eager CPU draws its masks with NumPy, compiled code with ``torch.rand``); with the paper's
    dropout the trace is one graph too."""
    torch.manual_seed(0)
    encoder = GroupedClipEncoder(tiny, peft, GROUPS, lora=LoraSettings(dropout=0.0)).train()
    with torch.no_grad():  # LoRA B and (IA)3 scales start where the adapters change nothing
        for parameter in encoder.adapter_state().values():
            parameter.add_(torch.randn(parameter.shape) * 0.3)
    ids = torch.tensor(ITEM_GROUPS if batch == "mixed" else [1] * len(ITEM_GROUPS))

    def inputs() -> tuple[object, ...]:
        return _encoder_inputs(tiny, RowGroups.per_row(ids, GROUPS, CPU))

    backend = RecordingBackend()
    _compare(lambda fn: fn(*inputs()), encoder, backend)
    assert backend.ops("forward") == {f"perpeft.grouped_{peft}.default"}
    assert backend.ops("backward") == {f"perpeft.grouped_{peft}_backward.default"}
    if peft == "lora":
        _assert_whole_graph(GroupedClipEncoder(tiny, peft, GROUPS).train(), *inputs())


class SASRecWithLoss(torch.nn.Module):
    """SASRec's output for a window and the training loss against positives and negatives, as a stage runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.sasrec = SASRec(hidden=32, blocks=2, heads=4, dropout=0.3)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        output = self.sasrec(x)
        width = output.shape[-1]
        loss = bce_with_negatives(output.reshape(-1, width), pos.reshape(-1, width), neg.reshape(-1, width), real)
        return torch.cat([output.reshape(-1), loss.reshape(1)])


def test_sasrec_and_its_loss_compile_whole() -> None:
    """Evaluation mode for the comparison (dropout draws are the compiled RNG's); training mode traced too."""
    torch.manual_seed(0)
    model = SASRecWithLoss().eval()
    x, pos, neg = (torch.randn(4, 10, 32) for _ in range(3))
    real = torch.rand(40) < 0.8
    backend = RecordingBackend()

    _compare(lambda fn: fn(x, pos, neg, real), model, backend)
    assert backend.ops("forward") == {"perpeft.bce_with_negatives.default"}
    assert backend.ops("backward") == set()  # BCE's backward scales its saved gradients: one multiply
    _assert_whole_graph(model.train(), x, pos, neg, real)
