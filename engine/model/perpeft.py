"""The model every method trains: an item encoder (grouped PEFT CLIP, frozen features or IISAN), the
per-group projector, ID embeddings and SASRec, for C groups."""

import contextlib
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from perpeft.engine.config.choices import MODALITIES
from perpeft.engine.config.methods import METHODS
from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.sampler import Batch
from perpeft.engine.features.inputs import ItemInputs
from perpeft.engine.model.groups import RowGroups
from perpeft.engine.model.prefix import CatalogPrefix
from perpeft.engine.model.recommender import Recommender
from perpeft.engine.runtime.device import to_device, uses_bf16_autocast
from perpeft.engine.runtime.distributed import current_world
from perpeft.kernels.ops import bce_with_negatives

ID_NORM_WEIGHT = 1e-6


class ItemInputSource(Protocol):
    """Where an item encoder's inputs come from: cached tokens/pixels, or cached CLIP hidden states."""

    def batch(self, items: torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, ...]: ...


@runtime_checkable
class MarksMissing(Protocol):
    """An input source that knows which items lack an image or a title."""

    @property
    def has_missing(self) -> bool: ...

    def modalities(self, items: torch.Tensor, device: torch.device) -> torch.Tensor: ...


class ItemEncoder(Protocol):
    """An item encoder module: ``encoder(*inputs, groups)`` → ``[N, out_features]``."""

    @property
    def out_features(self) -> int: ...

    def __call__(self, *inputs: Any) -> torch.Tensor: ...


@runtime_checkable
class ModalityEncoder(ItemEncoder, Protocol):
    """An item encoder whose output is one block of columns per modality (CLIP's towers, frozen or adapted)."""

    modalities: tuple[str, ...]

    @property
    def modality_columns(self) -> dict[str, slice]: ...


@runtime_checkable
class PrefixEncoder(ItemEncoder, Protocol):
    """An item encoder that can start from every item's frozen first-layer prefix (`GroupedClipEncoder`)."""

    def catalog_prefix(self, inputs: ItemInputs, chunk: int) -> CatalogPrefix | None: ...


EncoderFactory = Callable[[int], ItemEncoder]


class PerpeftModel(nn.Module):
    """Item encoder with grouped PEFT (optional) + projector + ID embeddings + SASRec, for C groups.

    ``C = 1`` is Global PEFT. The encoder is called as ``encoder(*inputs.batch(items), groups)`` (`RowGroups`) and
    exposes ``out_features``; only adapter, projector, embedding and SASRec parameters train.
    ``personal_index`` (int64 ``[U+1]``, user → row) gives SASRec the method's user or group embedding
    (User-level / Group-level); rows are users for User-level and the run's C groups for Group-level.
    """

    present_columns: torch.Tensor

    def __init__(
        self,
        config: RunConfig,
        make_encoder: EncoderFactory | None,
        inputs: ItemInputSource | None,
        num_items: int,
        groups: int,
        personal_index: torch.Tensor | None = None,
    ):
        super().__init__()
        self.groups = groups
        self.inputs = inputs
        encoder = make_encoder(groups) if make_encoder is not None else None
        self.encoder = encoder
        # Learned placeholders stand in for missing images/titles, only when the catalog has such items.
        placeholders = None
        if isinstance(encoder, ModalityEncoder) and isinstance(inputs, MarksMissing) and inputs.has_missing:
            placeholders = encoder.modality_columns
            columns = [MODALITIES.index(name) for name in encoder.modalities]
            # A buffer on the model's device: indexing a device tensor with a Python list copies the list there.
            self.register_buffer("present_columns", torch.tensor(columns), persistent=False)
        self.fills_missing = placeholders is not None
        method = METHODS[config.method]
        personal_rows = 0
        if personal_index is not None:
            personal_rows = config.groups if method.personal == "group" else personal_index.shape[0]
            self.register_buffer("personal_index", personal_index.long(), persistent=False)
        else:
            self.personal_index = None
        self.recommender = Recommender(
            num_items,
            groups,
            encoder.out_features if encoder is not None else None,
            hidden=config.hidden,
            maxlen=config.maxlen,
            dropout=config.dropout,
            placeholders=placeholders,
            personal_rows=personal_rows,
            personal_mode=method.personal_mode,
        )
        self.precision = config.precision
        self.encode_batch_size = config.encode_batch_size
        self._prefixes: dict[torch.device, CatalogPrefix | None] = {}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: parameter for name, parameter in self.named_parameters() if parameter.requires_grad}

    def trainable_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name → shape of every trainable parameter: what a checkpoint of this model holds (`load_tensors`)."""
        return {name: tuple(parameter.shape) for name, parameter in self.trainable_state().items()}

    def single_group_keys(self) -> dict[str, None]:
        """The parameters `init_from_single_group` copies from a one-group model's weights (any shape)."""
        return {name: None for name in self.trainable_state() if not name.startswith("recommender.personal.")}

    def load_trainable_state(self, tensors: dict[str, torch.Tensor]) -> None:
        state = self.trainable_state()
        missing = sorted(set(state) - set(tensors))
        if missing:
            raise KeyError(f"checkpoint lacks {missing[:3]}…")
        with torch.no_grad():
            for name, parameter in state.items():
                parameter.copy_(tensors[name])

    def init_from_single_group(self, tensors: dict[str, torch.Tensor]) -> None:
        """Every group's adapter and projector start as copies of the Global PEFT ones (paper §3.3.3);
        personal (group) embeddings, which Global PEFT lacks, keep their initialisation."""
        with torch.no_grad():
            for name, parameter in self.trainable_state().items():
                if name not in tensors and name.startswith("recommender.personal."):
                    continue
                source = tensors[name]
                if source.shape == parameter.shape:
                    parameter.copy_(source)
                else:
                    parameter.copy_(source.expand_as(parameter))

    @property
    def autocast(self) -> bool:
        """Whether the encoder runs under bf16 autocast on the device the model is on now (not the one it was
        trained on: a CPU-trained run embedded on CUDA takes CUDA's policy)."""
        return uses_bf16_autocast(self.precision, self.recommender.item_embeddings.weight.device)

    def _precision(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def item_vectors(self, items: torch.Tensor, group: int | torch.Tensor, with_ids: bool = True) -> torch.Tensor:
        """z for ``items`` (``[N]`` on the host, 0 allowed: padding gives zeros), each seen by ``group`` (one
        group for all, or per-row host ids ``[N]``: the grouped encoder serves any mix of groups in one
        pass); ``with_ids=False`` leaves the ID embedding out (`Recommender.item_vectors`)."""
        device = self.recommender.item_embeddings.weight.device
        return self._vectors(items, [RowGroups.of(group, items.shape[0], self.groups, device)], with_ids)[0]

    def group_vectors(self, items: torch.Tensor, with_ids: bool = True) -> torch.Tensor:
        """``[N, C, d]``: z for ``items`` (on the host) under every group, from one copy of their inputs on
        the device; each group's pass takes the single-group path."""
        device = self.recommender.item_embeddings.weight.device
        every = [RowGroups.one(group, items.shape[0], self.groups, device) for group in range(self.groups)]
        return torch.stack(self._vectors(items, every, with_ids), dim=1)

    def _vectors(self, items: torch.Tensor, groupings: list[RowGroups], with_ids: bool) -> list[torch.Tensor]:
        """z for ``items`` under each of ``groupings``. Which rows are padding is decided on the host, and
        the items' inputs are copied to the device once for all groupings."""
        device = self.recommender.item_embeddings.weight.device
        if items.device.type != "cpu":
            raise ValueError(f"item ids must be on the host, not {items.device}: reading them back would wait for it")
        on_device = to_device(items, device)
        encoder, source = self.encoder, self.inputs
        if encoder is None:
            return [self.recommender.item_vectors(on_device, None, groups, with_ids=with_ids) for groups in groupings]
        if source is None:
            raise ValueError("this model's item encoder has no input source: build it with the run's inputs")
        real = (items != 0).nonzero().squeeze(1)
        rows = to_device(real, device)
        inputs = source.batch(items[real], device) if real.numel() else ()
        present = None
        if self.fills_missing and isinstance(source, MarksMissing):
            present = source.modalities(items, device).index_select(1, self.present_columns)
        prefix = self._prefix(device)
        extra = {} if prefix is None or not real.numel() else {"prefix": prefix.take(to_device(items[real], device))}
        vectors = []
        for groups in groupings:
            multimodal = torch.zeros(items.shape[0], encoder.out_features, device=device)
            if real.numel():
                with self._precision():
                    encoded = encoder(*inputs, groups.take(real), **extra)
                multimodal = multimodal.index_put((rows,), encoded.float())
            vectors.append(self.recommender.item_vectors(on_device, multimodal, groups, present, with_ids))
        return vectors

    def _prefix(self, device: torch.device) -> CatalogPrefix | None:
        """The catalog's first-layer prefix on ``device``, built on first use: on the CPU, for an encoder
        that has one (`PrefixEncoder`) over cached tokens and pixels, outside torch.compile. Not on CUDA,
        where the towers' first layers have not been measured against a lookup."""
        if device.type != "cpu" or torch.compiler.is_compiling():
            return None
        encoder, source = self.encoder, self.inputs
        if not isinstance(encoder, PrefixEncoder) or not isinstance(source, ItemInputs):
            return None
        if device not in self._prefixes:
            self._prefixes[device] = encoder.catalog_prefix(source, self.encode_batch_size)
        return self._prefixes[device]

    def personal_rows(self, users: torch.Tensor | None) -> torch.Tensor | None:
        """Rows of the personal embedding for ``users`` (None when the method has none)."""
        if self.personal_index is None:
            return None
        if users is None:
            raise ValueError("this model has personal embeddings: pass the users")
        return self.personal_index[to_device(users, self.personal_index.device)]

    def forward(self, batch: Batch, device: torch.device) -> torch.Tensor:
        """The training loss of ``batch``: DistributedDataParallel calls the module, so this is ``training_loss``."""
        return self.training_loss(batch, device)

    def training_loss(self, batch: Batch, device: torch.device) -> torch.Tensor:
        # Distinct items on the host (np.unique: sorted, like torch.unique), so no step waits for the device.
        positions = np.stack([batch.seq, batch.pos, batch.neg])
        unique, where = np.unique(positions, return_inverse=True)
        inverse = to_device(torch.from_numpy(where.reshape(positions.shape)), device)
        vectors = self.item_vectors(torch.from_numpy(unique), max(batch.group, 0))[inverse]
        seq, pos = (to_device(torch.from_numpy(array), device) for array in (batch.seq, batch.pos))
        output = self.recommender.sequence_output(seq, vectors[0], self.personal_rows(torch.from_numpy(batch.users)))
        width = output.shape[-1]
        loss = bce_with_negatives(
            output.reshape(-1, width),
            vectors[1].reshape(-1, width),
            vectors[2].reshape(-1, width),
            (pos != 0).reshape(-1),
        )
        return loss + ID_NORM_WEIGHT * self.recommender.id_norm()

    @torch.no_grad()
    def item_tables(self, num_items: int, chunk: int) -> torch.Tensor:
        """Every group's item table ``[C, I+1, d]`` (row 0 is padding). Items are encoded in chunks of
        similar title length when the inputs are tokens (fewer padded columns). Under a process group
        each rank encodes a block of the chunks and the rows are gathered: the same batches as one process."""
        device = self.recommender.item_embeddings.weight.device
        world = current_world()
        if isinstance(self.inputs, ItemInputs):
            order = torch.from_numpy(self.inputs.by_text_width())
        else:
            order = torch.arange(num_items + 1)
        parts = order.split(chunk)
        mine = [parts[index] for index in world.block(len(parts))]
        rows = [self.group_vectors(part) for part in mine]
        local = torch.cat(rows) if rows else torch.zeros(0, self.groups, self.recommender.hidden, device=device)
        ordered = world.gather_rows(local)
        tables = torch.empty_like(ordered)
        tables[order.to(ordered.device)] = ordered
        return tables.transpose(0, 1).contiguous()

    @torch.no_grad()
    def user_vectors(
        self,
        windows: torch.Tensor,
        user_groups: torch.Tensor,
        tables: torch.Tensor,
        chunk: int,
        users: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SASRec's last-position output for each ``[L]`` window, read through the user's group table;
        ``users`` (engine ids) are needed only by methods with user or group embeddings."""
        rows = self.personal_rows(users)
        outputs = [windows.new_zeros((0, self.recommender.hidden), dtype=tables.dtype)]
        for start in range(0, windows.shape[0], chunk):
            window, groups = windows[start : start + chunk], user_groups[start : start + chunk]
            vectors = tables[groups.unsqueeze(1), window]
            personal = None if rows is None else rows[start : start + chunk]
            outputs.append(self.recommender.sequence_output(window, vectors, personal)[:, -1])
        return torch.cat(outputs)

    @torch.no_grad()
    def gathered_user_vectors(
        self,
        windows: torch.Tensor,
        user_groups: torch.Tensor,
        tables: torch.Tensor,
        chunk: int,
        users: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`user_vectors` of every window; under a process group each rank encodes a block of them and
        the vectors are gathered on every rank."""
        world = current_world()
        block = world.block_slice(windows.shape[0])
        personal = None if users is None else users[block]
        return world.gather_rows(self.user_vectors(windows[block], user_groups[block], tables, chunk, personal))
