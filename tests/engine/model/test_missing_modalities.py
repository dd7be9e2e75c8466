"""Items without an image or a title are kept; a learned per-modality placeholder stands in for them."""

import numpy as np
import torch

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.data.demo import DemoSpec, generate_demo
from perpeft.engine.data.formats import load_recbole
from perpeft.engine.model.groups import RowGroups
from perpeft.engine.model.recommender import GroupedProjector
from perpeft.engine.runtime.tensors import load_tensors
from perpeft.engine.train.pipeline import train_new_run


def test_placeholder_replaces_only_the_missing_columns_of_each_group():
    projector = GroupedProjector(2, 8, 4, 3, placeholders={"image": slice(0, 4), "title": slice(4, 8)})
    with torch.no_grad():
        projector.placeholders["image"].copy_(torch.tensor([[1.0] * 4, [2.0] * 4]))
        projector.placeholders["title"].copy_(torch.tensor([[3.0] * 4, [4.0] * 4]))
    x = torch.zeros(3, 8)
    present = torch.tensor([[False, True], [True, False], [True, True]])
    filled = projector.fill_missing(x, RowGroups.per_row(torch.tensor([1, 0, 1]), 2, torch.device("cpu")), present)
    expected = torch.tensor([[2.0] * 4 + [0.0] * 4, [0.0] * 4 + [3.0] * 4, [0.0] * 8])
    torch.testing.assert_close(filled, expected)
    one_group = projector.fill_missing(x, RowGroups.one(1, 3, 2, torch.device("cpu")), present)
    expected = torch.tensor([[2.0] * 4 + [0.0] * 4, [0.0] * 4 + [4.0] * 4, [0.0] * 8])
    torch.testing.assert_close(one_group, expected)
    assert sum(p.numel() for p in projector.placeholders.parameters()) == 2 * 8


def test_training_on_a_catalog_with_missing_images_and_titles(tmp_path, assert_learned):
    spec = DemoSpec(num_domains=2, num_users=96, items_per_domain=30, min_seq_len=5, max_seq_len=8)
    directory = generate_demo(tmp_path / "gaps", seed=4, spec=spec)
    item_file = directory / "gaps.item"
    lines = item_file.read_text().splitlines()
    ids = [line.split("\t")[0] for line in lines[1:]]
    rng = np.random.default_rng(0)
    no_image = set(rng.choice(ids, size=round(0.3 * len(ids)), replace=False))
    no_title = set(rng.choice(ids, size=round(0.1 * len(ids)), replace=False))
    for item in no_image:
        (directory / "images" / f"{item}.png").unlink()
    (directory / "missing_images.txt").write_text("".join(f"{item}\n" for item in sorted(no_image)))
    item_file.write_text(
        "\n".join([lines[0], *(f"{i}\t" if i in no_title else line for i, line in zip(ids, lines[1:], strict=True))])
        + "\n"
    )
    dataset = load_recbole(directory)
    assert sum(path is None for path in dataset.image_paths[1:]) == len(no_image)
    assert sum(not title for title in dataset.titles[1:]) == len(no_title)

    config = RunConfig(
        data=str(directory), clip="tiny", groups=2, epochs_global=1, epochs_perpeft=1, lr=1e-3, weight_decay=1e-4
    )
    run, _ = train_new_run(config, tmp_path / "run", False, lambda line: None, progress=False)
    assert_learned(run.path)
    weights, _ = load_tensors(run.path / "perpeft" / "best.safetensors")
    image_placeholder = weights["recommender.projector.placeholders.image"]
    title_placeholder = weights["recommender.projector.placeholders.title"]
    assert image_placeholder.shape == title_placeholder.shape == (2, 32)
    assert image_placeholder.abs().sum() > 0 and title_placeholder.abs().sum() > 0, "placeholders never trained"
