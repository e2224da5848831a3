"""Start workers through the engines clusters already run: Slurm jobs and
SSH hosts, and manifests for Kubernetes.

A launcher starts workers for an orchestrator: by default the default one
(the first made with ``make_orchestrator()``), else a new one on all
interfaces with a random key, which becomes the default, so that a plain
``Pool()`` uses the launched workers::

    from distripool import Pool
    from distripool.deploy import SlurmCluster

    with SlurmCluster(jobs=4, processes=8, walltime="02:00:00") as cluster:
        with Pool() as pool:
            print(pool.map(abs, range(-1000, 0)))

Workers dial ``connect`` (``"host:port"`` or several); by default this
host's address on the interface that routes to them, never loopback for
another host. The choice and its reason are logged (logger
``distripool.deploy``). The key reaches them as a mode-600 file (Slurm) or
on SSH's standard input, never on a command line.
"""

from ._cluster import LaunchError
from ._kubernetes import kubernetes_manifest
from ._slurm import SlurmCluster
from ._ssh import SSHCluster

__all__ = ["LaunchError", "SSHCluster", "SlurmCluster", "kubernetes_manifest"]
