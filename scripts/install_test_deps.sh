#!/usr/bin/env bash
# System packages the test suite uses beyond Python: Debian's slurm-wlm, for the tests that run
# lathe on a real (two-node, one-host) Slurm cluster (tests/cluster/). Needs root and apt-get;
# elsewhere it says so and succeeds, and those tests are skipped with that reason (under CI,
# LATHE_REQUIRE_SLURM=1 makes a missing Slurm a failure instead).
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "install_test_deps: Slurm is not installed and this is not a root Debian/Ubuntu shell:" \
       "the Slurm tests will be skipped (install slurm-wlm to run them)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null
# The package may start daemons of its own where systemd runs; the tests start their own cluster.
