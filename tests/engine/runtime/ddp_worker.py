"""One rank of a 2-process gloo training run (started by ``torchrun`` from test_distributed.py).

``ddp_worker.py DATA OUT [train|cut|resume]``: ``train`` trains ``OUT/run``; ``cut`` does the same but
every rank stops at the second evaluation (mid-run, as a crash would); ``resume`` resumes ``OUT/run``.
Every optimizer step is followed by a check that all ranks hold identical trainable parameters; each
rank writes what it saw to ``OUT/rank-R.json``.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from perpeft.engine.config.run_config import RunConfig
from perpeft.engine.runtime.distributed import join_process_group, leave_process_group
from perpeft.engine.train import stages
from perpeft.engine.train.pipeline import resume_run, train_new_run

data, out = Path(sys.argv[1]), Path(sys.argv[2])
mode = sys.argv[3] if len(sys.argv) > 3 else "train"
world = join_process_group("cpu")
checks = {"steps": 0, "max_difference": 0.0}
original_step = torch.optim.AdamW.step


def checked_step(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
    result = original_step(self, *args, **kwargs)
    flat = torch.cat([p.detach().double().flatten() for group in self.param_groups for p in group["params"]])
    gathered = [torch.empty_like(flat) for _ in range(world.size)]
    dist.all_gather(gathered, flat)
    difference = max(float((other - gathered[0]).abs().max()) for other in gathered)
    checks["steps"] += 1
    checks["max_difference"] = max(checks["max_difference"], difference)
    return result


torch.optim.AdamW.step = checked_step
if mode == "cut":
    evaluate, evaluations = stages.evaluate_model, []

    def stop_at_second_evaluation(*args: object) -> object:
        evaluations.append(1)
        if len(evaluations) == 2:
            os._exit(0)  # every rank stops here at once, as after a crash: nothing is torn down
        return evaluate(*args)

    stages.evaluate_model = stop_at_second_evaluation
config = RunConfig(data=str(data), clip="tiny", groups=2, epochs_global=1, epochs_perpeft=1, lr=1e-3, weight_decay=1e-4)
if mode == "resume":
    _, metrics = resume_run(out / "run", lambda line: None, progress=False)
else:
    _, metrics = train_new_run(config, out / "run", False, lambda line: None, progress=False)
(out / f"rank-{world.rank}.json").write_text(json.dumps({**checks, "metrics": metrics, "size": world.size}))
leave_process_group()
