"""Skips that could hide a failure are loud in CI: with CI=true a test that needs ../shared or a
running Slurm fails instead of skipping (.ci/run sets CI=true and fails itself when Slurm does
not start)."""

from __future__ import annotations

import pytest
from helpers import ROOT, require_shared, skip_or_fail


def test_missing_shared_skips_locally_and_fails_in_ci(tmp_path, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="missing"):
        require_shared(tmp_path / "absent")
    for value in ("true", "1", "yes"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match="must run, not skip"):
            require_shared(tmp_path / "absent")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        skip_or_fail("no Slurm")
    assert require_shared(tmp_path) == tmp_path  # present: no skip


def test_ci_script_sets_ci_and_fails_without_slurm():
    run = (ROOT / ".ci" / "run").read_text()
    assert "export CI=true" in run
    start = run.index("slurm-local.sh start")
    assert "will skip" not in run  # the old behaviour: a missing Slurm skipped its tests
    assert "exit 1" in run[start:] or "slurm_rc=1" in run[start:]
