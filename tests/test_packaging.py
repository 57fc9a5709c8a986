"""What a plain `pip install .` (no extras) brings along."""

import importlib.metadata

import pytest
from helpers import ROOT
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")


def test_plain_install_can_write_a_snakemake_report():
    # `snakemake --report` needs pygments, which snakemake itself only lists under an extra
    deps = [Requirement(d) for d in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    snakemake = next(r for r in deps if r.name == "snakemake")
    via_extra = {Requirement(r).name for r in importlib.metadata.requires("snakemake")
                 if any(Requirement(r).marker is not None
                        and Requirement(r).marker.evaluate({"extra": e})
                        for e in snakemake.extras)}
    assert "pygments" in via_extra | {r.name for r in deps}
    importlib.metadata.version("pygments")  # and it is installed here
