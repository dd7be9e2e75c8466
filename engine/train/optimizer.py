"""The stages' optimizer: fused AdamW over the trainable parameters packed into one flat tensor per group."""

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn


class FlatAdamW(torch.optim.AdamW):
    """Fused AdamW whose parameters live in one flat tensor per parameter group, their gradients in another.

    Each parameter's ``.data`` becomes a view into its group's flat tensor and its ``.grad`` a view into the
    group's flat gradient, which autograd accumulates into and `zero_grad` zeroes. A step is then one fused
    kernel over one tensor per group, with no per-parameter Python in `step` or `zero_grad`: ~0.5 ms of the
    benchmark job's ~25 ms CPU step, whose 52 trainable tensors torch's AdamW visits one by one.

    The update is torch's AdamW element by element, to float rounding (the fused kernel's vector loop and its
    scalar tail round differently, and an element's place in the loop moves with the packing), provided
    every parameter gets a gradient in every step: torch's AdamW skips a parameter without one, here it
    would take a zero gradient. The engine's models are built so (``tests/engine/model/test_encoders.py``,
    and what DistributedDataParallel without its unused-parameter search needs). A gradient replaced behind
    the optimizer's back (``module.zero_grad()``, an assignment) would be lost: `step` refuses it.

    `state_dict` and `load_state_dict` speak torch's per-parameter form, so checkpoints are those of
    ``torch.optim.AdamW(..., fused=True)`` over the same parameters, in either direction.
    """

    def __init__(self, groups: Sequence[dict[str, Any]], *, lr: float, weight_decay: float) -> None:
        self._members: list[list[nn.Parameter]] = []
        self._views: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._grads: list[torch.Tensor] = []
        packed_groups = []
        for group in groups:
            members = list(group["params"])
            packed_groups.append({**group, "params": [self._pack(members)]})
            self._members.append(members)
        super().__init__(packed_groups, lr=lr, weight_decay=weight_decay, fused=True)

    def _pack(self, members: list[nn.Parameter]) -> nn.Parameter:
        """One flat parameter holding ``members`` (made views into it), its gradient holding their gradients."""
        if not members:
            raise ValueError("FlatAdamW: an empty parameter group")
        first = members[0]
        if any(p.device != first.device or p.dtype != first.dtype or not p.requires_grad for p in members):
            raise ValueError("FlatAdamW: a group's parameters must share device and dtype and require gradients")
        total = sum(p.numel() for p in members)
        flat = torch.empty(total, dtype=first.dtype, device=first.device)
        grad = torch.zeros_like(flat)
        for parameter, (values, grads) in zip(members, _slices(members, flat, grad), strict=True):
            values.copy_(parameter.detach())
            parameter.data = values
            parameter.grad = grads
            self._views.append((parameter, grads))
        packed = nn.Parameter(flat)
        packed.grad = grad
        self._grads.append(grad)
        return packed

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradients; they are never set to None (``set_to_none`` is ignored): autograd adds into
        them."""
        for grad in self._grads:
            grad.zero_()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW step of every group (see the class); RuntimeError if a parameter's gradient is no longer
        its view into the flat gradient."""
        for parameter, grad in self._views:
            if parameter.grad is not grad:
                raise RuntimeError(
                    "FlatAdamW: a parameter's gradient was replaced (module.zero_grad()?); "
                    "zero the gradients through the optimizer"
                )
        return super().step(closure)

    def state_dict(self) -> dict[str, Any]:
        """torch's per-parameter AdamW state: each parameter's slice of the flat moments, and the step."""
        packed = super().state_dict()
        state: dict[int, dict[str, Any]] = {}
        groups = []
        index = 0
        for number, (group, members) in enumerate(zip(packed["param_groups"], self._members, strict=True)):
            entry = packed["state"].get(number)
            indices = list(range(index, index + len(members)))
            if entry is not None:
                moments = {key: value for key, value in entry.items() if torch.is_tensor(value) and value.dim()}
                for position, slices in zip(indices, _slices(members, *moments.values()), strict=True):
                    state[position] = {key: value.clone() for key, value in entry.items() if key not in moments}
                    state[position].update({key: part.clone() for key, part in zip(moments, slices, strict=True)})
            groups.append({**group, "params": indices})
            index += len(members)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch's per-parameter AdamW state (`state_dict`'s form) of the same parameters, in order.
        ValueError when its groups do not match, or its parameters are not all at one step in a group."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self._members) or any(
            len(group["params"]) != len(members) for group, members in zip(groups, self._members, strict=True)
        ):
            raise ValueError("optimizer state of other parameter groups than this optimizer's")
        packed_state: dict[int, dict[str, Any]] = {}
        for number, (group, members) in enumerate(zip(groups, self._members, strict=True)):
            entries = [state_dict["state"].get(index) for index in group["params"]]
            if all(entry is None for entry in entries):
                continue
            if any(entry is None or entry.keys() != entries[0].keys() for entry in entries):
                raise ValueError("optimizer state for only some parameters of a group")
            packed_state[number] = {key: _joined(key, [entry[key] for entry in entries], members) for key in entries[0]}
        super().load_state_dict(
            {"state": packed_state, "param_groups": [{**group, "params": [n]} for n, group in enumerate(groups)]}
        )


def _slices(members: Sequence[torch.Tensor], *flats: torch.Tensor) -> Iterable[tuple[torch.Tensor, ...]]:
    """Per member, its consecutive slice of each flat tensor, shaped like it."""
    offset = 0
    for member in members:
        size = member.numel()
        yield tuple(flat[offset : offset + size].view_as(member) for flat in flats)
        offset += size


def _joined(key: str, values: list[Any], members: list[nn.Parameter]) -> Any:
    """One group's per-parameter values of state ``key`` as the flat parameter's: the moments concatenated,
    the step (a scalar, the same for all) once."""
    first = values[0]
    if not torch.is_tensor(first) or first.dim() == 0:
        if any(not torch.equal(torch.as_tensor(value), torch.as_tensor(first)) for value in values):
            raise ValueError(f"optimizer state {key!r} differs between the parameters of a group")
        return first.clone() if torch.is_tensor(first) else first
    if any(tuple(value.shape) != tuple(member.shape) for value, member in zip(values, members, strict=True)):
        raise ValueError(f"optimizer state {key!r} shaped unlike its parameters")
    return torch.cat([value.reshape(-1) for value in values])
