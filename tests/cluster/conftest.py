"""Fixtures of the cluster tests: a real two-node Slurm (see cluster_helpers.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cluster_helpers import env  # noqa: E402
from slurm_cluster import SlurmCluster, slurm_available  # noqa: E402


@pytest.fixture(scope="session")
def slurm_ready():
    """Skip (or fail, under CI) where the real Slurm cannot run."""
    problem = None
    if not slurm_available():
        problem = "Slurm is not installed (scripts/install_test_deps.sh installs Debian's slurm-wlm)"
    elif os.geteuid() != 0:
        problem = "the test cluster's Slurm daemons run as root"
    if problem:
        if os.environ.get("LATHE_REQUIRE_SLURM") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


@pytest.fixture(scope="module")
def cluster(slurm_ready, tmp_path_factory):
    """A two-node Slurm on this host for the module's tests; stopped (by PID) afterwards."""
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        c.env.update(env())  # jobs inherit the submitting environment (sbatch --export=ALL)
        yield c
