import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
