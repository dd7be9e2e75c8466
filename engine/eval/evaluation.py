"""Per-epoch evaluation of a model: validation and test metrics with full ranking, each user through its group's table."""

from dataclasses import dataclass

import numpy as np
import torch

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.split import Split, Stage, last_window
from perpeft.engine.eval.metrics import HistoryIndex, full_ranking_metrics
from perpeft.engine.model.perpeft import PerpeftModel
from perpeft.engine.runtime.distributed import current_world


@dataclass
class EvaluationData:
    """Everything evaluation needs that does not change between epochs."""

    users: np.ndarray
    windows: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    histories: dict[str, HistoryIndex]

    @classmethod
    def build(cls, split: Split, maxlen: int, device: torch.device) -> "EvaluationData":
        users = split.eval_users
        windows: dict[str, torch.Tensor] = {}
        targets: dict[str, torch.Tensor] = {}
        histories: dict[str, HistoryIndex] = {}
        stages: tuple[tuple[Stage, np.ndarray], ...] = (("valid", split.valid_target), ("test", split.test_target))
        for stage, target in stages:
            stage_history = split.history(stage)
            history = [stage_history[user] for user in users]
            windows[stage] = torch.from_numpy(last_window(history, maxlen)).to(device)
            targets[stage] = torch.from_numpy(target[users]).to(device)
            histories[stage] = HistoryIndex.from_sequences(history).to(device)
        return cls(users, windows, targets, histories)


def evaluate_model(
    model: PerpeftModel, data: EvaluationData, user_groups: np.ndarray, num_items: int, config: RunConfig
) -> dict[str, dict[str, float]]:
    """Validation and test metrics with full ranking, each user scored with its group's table, and the
    item vectors' term norms (`item_vector_norms`, under ``"norms"``)."""
    model.eval()
    device = model.recommender.item_embeddings.weight.device
    tables = model.item_tables(num_items, config.encode_batch_size)
    # Under a process group each rank scores a block of the users; metric sums are added over ranks.
    index = current_world().block_slice(len(data.users))
    groups = torch.from_numpy(user_groups[data.users[index]]).to(device)
    users = torch.from_numpy(data.users[index])
    results: dict[str, dict[str, float]] = {}
    for stage in ("valid", "test"):
        vectors = model.user_vectors(data.windows[stage][index], groups, tables, config.eval_batch_size, users)
        targets, histories = data.targets[stage][index], data.histories[stage].select(index)
        results[stage] = full_ranking_metrics(vectors, tables, groups, targets, histories)
    results["norms"] = item_vector_norms(model, tables)
    return results


def item_vector_norms(model: PerpeftModel, tables: torch.Tensor) -> dict[str, float]:
    """Mean L2 norms, over items and groups, of the two terms of the item vectors z = 0.5·MLP_g(m) + h in
    ``tables``: the multimodal term (0 for item-ID methods) and the ID embedding h. Their balance per
    epoch shows whether training moves the CLIP side at all (`analyze curves` draws them)."""
    ids = model.recommender.item_embeddings.weight.detach()[1:].float()
    multimodal = tables[:, 1:].float() - ids
    return {"multimodal": float(multimodal.norm(dim=-1).mean()), "id": float(ids.norm(dim=-1).mean())}
