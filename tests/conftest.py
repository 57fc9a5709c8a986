import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# pytest-xdist runs the suite in PYTEST_XDIST_WORKER_COUNT processes (pyproject: -n 2): the
# cores are shared between them
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
torch.set_num_threads(THREADS)
if WORKERS > 1:  # and the processes the tests start (Snakemake sets its jobs' own)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

# Work that has to stay in one worker process, started first: the paper-size smoke DAG (the
# longest), the real-Slurm DAGs (mostly waiting for Slurm: they share its node, so one at a time,
# and they overlap well with computing tests), and the modules that inspect the one session
# pipeline run (it runs once per worker that needs it). Every other module is its own group, so
# its module fixtures are made once.
FIRST_GROUPS = ("smoke", "slurm")


def _group(module: pytest.Module, items: list[pytest.Item]) -> str:
    if module.path.name == "test_smoke.py":
        return "smoke"
    if any("pipeline_run" in getattr(i, "fixturenames", ()) for i in items):
        return "pipeline"
    if any(i.get_closest_marker("slurm") for i in items):
        return "slurm"
    return module.path.stem


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the tests for pytest-xdist's `--dist loadgroup` (a group runs in one worker) and
    put the long groups first (with `--no-loadscope-reorder`, in this order). Runs before
    xdist's own hook, which reads the groups."""
    by_module: dict[pytest.Module, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.getparent(pytest.Module), []).append(item)
    groups = {m: _group(m, its) for m, its in by_module.items()}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.getparent(pytest.Module)]))
    rank = {g: i for i, g in enumerate(FIRST_GROUPS)}
    items.sort(key=lambda i: rank.get(groups[i.getparent(pytest.Module)], len(rank)))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory) -> Path:
    """The whole tiny pipeline, run once per session by Snakemake (the reference for the
    fault-injection tests, and what the pipeline tests inspect)."""
    from helpers import run_snakemake, tiny_config, workflow_copy

    work = workflow_copy(tmp_path_factory.mktemp("pipeline"), tiny_config())
    run_snakemake(work)
    return work


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared 2-core machine, two threads per process are
    much slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
