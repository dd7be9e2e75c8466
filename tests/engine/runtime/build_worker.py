"""One rank of a 2-process gloo run whose rank 0 builds a cache for longer than ``$PERPEFT_DIST_TIMEOUT``
(started by ``torchrun`` from test_distributed.py).

``build_worker.py OUT SECONDS``: rank 0's `World.main_first` work sleeps SECONDS and succeeds, then a
collective on the main group; then rank 0's work sleeps SECONDS and fails; then another rank's ``others()``
fails. Each rank writes what it saw to ``OUT/rank-R.json``.
"""

import json
import sys
import time
from pathlib import Path

import torch

from perpeft.engine.runtime.distributed import join_process_group, leave_process_group

out, seconds = Path(sys.argv[1]), float(sys.argv[2])
world = join_process_group("cpu")
seen: dict[str, object] = {}


def build() -> str:
    time.sleep(seconds)
    return "built"


def fail_to_build() -> str:
    time.sleep(seconds)
    raise OSError("the image cache could not be written")


def fail_to_read() -> str:
    raise OSError("the image cache could not be read")


seen["result"] = world.main_first(build, lambda: "read")
seen["sum"] = world.sum(torch.tensor([world.rank + 1.0])).item()  # the main group still answers
for name, main, others in (("build", fail_to_build, None), ("read", lambda: "built", fail_to_read)):
    try:
        world.main_first(main, others)
    except Exception as error:
        seen[f"{name} error"] = f"{type(error).__name__}: {error}"
(out / f"rank-{world.rank}.json").write_text(json.dumps(seen))
leave_process_group()
