"""The package as Python sees it: the checkout's folders never answer to a bare top-level name (a dependency's
package of that name always wins, whatever directory Python starts in), and the version is one."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import perpeft
from perpeft.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = sorted(path.parent.name for path in ROOT.glob("*/__init__.py"))

# Run with the checkout's root as working directory: `python -c` puts it first on sys.path, as `python -m`
# and `python -m pytest` do.
REPORT = """
import sys
try:
    import {name}
except ModuleNotFoundError as error:
    print("missing", error.name)
else:
    print("found", {name}.__file__, getattr({name}, "OWNER", ""))
print(*sorted(module for module in sys.modules if module == "{name}" or module.startswith("{name}.")))
"""


def _environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def _report(name: str, pythonpath: Path | None = None) -> list[str]:
    environment = {"PYTHONPATH": str(pythonpath)} if pythonpath else {}
    done = subprocess.run(
        [sys.executable, "-c", REPORT.format(name=name)],
        cwd=ROOT,
        env={**_environment(), **environment},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_folders_that_hold_code_are_the_three_subpackages() -> None:
    assert PACKAGE_FOLDERS == ["cli", "engine", "kernels"]
    assert (ROOT / "__init__.py").is_file()  # the root is `perpeft` itself


@pytest.mark.parametrize("name", PACKAGE_FOLDERS)
def test_a_dependency_of_the_same_name_wins_over_the_folder(name: str, tmp_path: Path) -> None:
    fake = tmp_path / name
    fake.mkdir()
    (fake / "__init__.py").write_text('OWNER = "dependency"\n')
    (fake / "part.py").write_text("")
    found, modules = _report(name, pythonpath=tmp_path)
    assert found == f"found {fake / '__init__.py'} dependency"
    assert modules == name  # none of the folder's modules loaded under the bare name


@pytest.mark.parametrize("name", PACKAGE_FOLDERS)
def test_the_folder_never_loads_under_its_bare_name(name: str) -> None:
    found, modules = _report(name)
    if found.startswith("missing"):
        assert found == f"missing {name}" and modules == ""
    else:  # a distribution of that name is installed (Hugging Face's `kernels`, with transformers >= 5.25)
        assert not Path(found.split()[1]).resolve().is_relative_to(ROOT)


def test_the_command_loads_clip_from_the_checkout_root() -> None:
    """`params` builds CLIP from the checkout's root, where the `kernels/` folder would shadow Hugging Face's
    `kernels` (which transformers >= 5.25 imports) if it loaded under its bare name."""
    done = subprocess.run(
        [sys.executable, "-m", "perpeft.cli", "params", "--items", "100"],
        cwd=ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "perpeft_total" in done.stdout


def test_one_version_everywhere() -> None:
    assert perpeft.__version__ == importlib.metadata.version("perpeft-engine")
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output == f"perpeft-engine, version {perpeft.__version__}\n"


# The command as a process (`perpeft.cli.main.main`) leaves without the interpreter's teardown: a thread it
# left running still finishes, an idle thread pool's workers are let go (as torch.compile's compile pool
# leaves them), what it registered to run at exit still runs, its output arrives whole, and the exit status
# is its own.
AS_PROCESS = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from perpeft.cli.main import main
marker = Path(sys.argv.pop(1))
late = marker.with_name("late")
threading.Thread(target=lambda: (time.sleep(0.5), late.write_text("thread finished"))).start()
pool = ThreadPoolExecutor(2)  # kept: an executor still referenced at exit
pool.submit(time.sleep, 0.1).result()
atexit.register(lambda: marker.write_text("exit handlers ran"))
main()
"""


@pytest.mark.parametrize(
    ("args", "status", "stream", "expected"),
    [
        (["--version"], 0, "stdout", f"perpeft-engine, version {perpeft.__version__}\n"),
        (["params", "--items", "0"], 2, "stderr", "Invalid value for '--items'"),
        (["no-such-command"], 2, "stderr", "No such command 'no-such-command'"),
    ],
)
def test_the_process_exits_with_the_commands_status_output_and_exit_handlers(
    tmp_path: Path, args: list[str], status: int, stream: str, expected: str
) -> None:
    marker = tmp_path / "marker"
    done = subprocess.run(
        [sys.executable, "-c", AS_PROCESS, str(marker), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == status, done.stderr[-3000:]
    assert expected in getattr(done, stream) and "Traceback" not in done.stderr
    assert marker.read_text() == "exit handlers ran"
    assert (tmp_path / "late").read_text() == "thread finished"
