"""Commands that run under ``torchrun``: join its process group, print on rank 0 only, fail in one line."""

import contextlib
import functools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def _process_group_failure(error: RuntimeError, dist_error: type) -> bool:
    """Whether ``error`` comes from the communication backend (NCCL raises DistError; gloo a RuntimeError
    naming itself, e.g. "…/gloo/transport/tcp/pair.cc: Connection closed by peer") rather than a bug."""
    return isinstance(error, dist_error) or any(marker in str(error) for marker in ("gloo", "NCCL", "c10d"))


def runs_distributed(device_option: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Join the ``torchrun`` process group (if launched by it) on the device named by the command's
    ``device_option`` argument, keep stdout for rank 0, and turn a failed collective — a rank that died
    or timed out (``$PERPEFT_DIST_TIMEOUT``) — into one line on stderr and exit status 1."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from torch.distributed import DistError

            from perpeft.engine.errors import first_line
            from perpeft.engine.runtime.distributed import join_process_group, leave_process_group

            world = join_process_group(kwargs.get(device_option) or "auto")
            try:
                with contextlib.nullcontext() if world.is_main else _quiet_stdout():
                    result = command(*args, **kwargs)
                world.barrier()  # no rank tears the group down while another is still in a collective
                return result
            except RuntimeError as error:
                if not world.joined or not _process_group_failure(error, DistError):
                    raise
                reason = first_line(error)
                click.echo(
                    f"error: rank {world.rank}/{world.size}: the process group failed ({reason}); "
                    "another rank probably stopped: see its output",
                    err=True,
                )
                sys.exit(1)
            finally:
                if world.joined:
                    leave_process_group()

        return wrapper

    return decorate


def relaunch_with_torchrun(processes: int) -> None:
    """Run this very command again as ``torchrun --standalone --nproc-per-node N -m perpeft.cli -- …`` (one
    machine) and exit with its status. The ``--`` keeps torchrun's parser off our options (it would read
    ``--run`` as an abbreviation of its own ``--run-path``)."""
    arguments, skip = [], False
    for argument in sys.argv[1:]:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            arguments.append(argument)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    sys.exit(subprocess.run([*command, "-m", "perpeft.cli", "--", *arguments], check=False).returncode)
