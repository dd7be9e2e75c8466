"""The whole path from Python, notebook style (each ``# %%`` is a cell): a dataset, a configuration, training,
the run's metrics and groups, per-group item tables, recommendations for known and new users, evaluation,
an adapter export and a small experiment grid.

    python examples/quickstart.py [WORK_DIR]      # the demo shop at test size: well under a minute on 2 cores
"""

# %%
import sys
import tempfile
from pathlib import Path

import perpeft

work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="perpeft-quickstart-"))

# %% A dataset: the synthetic demo shop (a RecBole directory; your own data is a directory of the same shape).
data = perpeft.demo_dataset(
    work / "shop", seed=3, spec=perpeft.DemoSpec(num_domains=2, num_users=96, items_per_domain=24, max_seq_len=8)
)

# %% A configuration (unset values take the demo's or the paper's preset); baseline=False stops Global PEFT at
# E1 instead of also training it on to E1 + E2 as the Global PEFT row of the tables.
config = perpeft.RunConfig(
    data=str(data), clip="tiny", groups=2, epochs_global=1, epochs_perpeft=1, lr=1e-3, baseline=False
)

# %% Training: Global PEFT, grouping users, then one adapter per group (PerPEFT). Lines also go to logging.
run = perpeft.train(config, work / "runs" / "shop", progress=False, on_line=print)
test = run.metrics["perpeft"]["test"]
print("PerPEFT test:", {name: round(value, 4) for name, value in test.items()})

# %% Groups: each user's group and the K-Means centroids in the Global-PEFT user space.
assignment, centroids = run.grouping()
print("group sizes:", assignment[1:].bincount(minlength=config.groups).tolist(), "centroids:", tuple(centroids.shape))

# %% Per-group item tables [C, I+1, d] and user vectors, cached in the run directory.
embeddings = run.embed()
print("item tables:", tuple(embeddings.items.shape), "user vectors:", tuple(embeddings.users.shape))

# %% Recommendations: a known user (read through its group's table), and a new user's history.
known = run.recommend(user="u00001", k=5)
print(f"user u00001 (group {known.group}):", known.items)
new = run.recommend(history=known.items[:2], k=5)
print(f"new user -> group {new.group} ({new.assigned_by}):", new.items)

# %% Evaluation recomputed from the cached tables equals the metrics training recorded.
recomputed = run.evaluate()["test"]
print("largest difference from training's metrics:", max(abs(recomputed[name] - test[name]) for name in test))

# %% One group's adapter as a Hugging Face peft directory (PeftModel.from_pretrained loads it).
print("exported:", run.export_adapter(group=0, out=work / "adapter-0")["peft_type"])

# %% A grid: Global PEFT and PerPEFT on the same data, one seed; results.csv's rows come back as a table.
rows = perpeft.experiment(config, work / "grid", methods=["global-peft", "perpeft"], seeds=[0])
for row in rows:
    print(row["method"], row["seed"], row["test_NDCG@10"])
