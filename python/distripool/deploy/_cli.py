"""``distripool slurm``, ``distripool ssh`` and ``distripool kubernetes``:
the launchers from the shell, for an orchestrator that another process
(the user's program) runs."""

from __future__ import annotations

import argparse
import sys
import time

from .._config import split_addresses

SLURM_HELP = """\
Submit N Slurm jobs, each running one worker for the orchestrator at
--connect, and print their status until they have all ended; Ctrl-C cancels
them. The key reaches the jobs as a mode-600 file in --log-dir (on a
filesystem the nodes share), never on a command line.

examples:
  distripool slurm --jobs 4 --connect 10.0.0.5:1337 --authkey-file ~/cluster.key \\
      --processes 8 --walltime 02:00:00 --partition compute
  distripool slurm --jobs 1 --connect 10.0.0.5:1337 --authkey-file ~/cluster.key --script
  distripool slurm --jobs 1 --connect 10.0.0.5:1337 --authkey-file ~/cluster.key \\
      --skip-directive=--mem --directive=--qos=short --dry-run
"""

SSH_HELP = """\
Start a worker on each HOST with the system ssh (your ~/.ssh/config,
agents and ProxyJump apply), for the orchestrator at --connect, and print
their status until they have all ended; Ctrl-C stops them. The key travels
on the session's standard input.

examples:
  distripool ssh node1 node2 --connect 10.0.0.5:1337 --authkey-file ~/cluster.key
  distripool ssh gpu-box --connect 10.0.0.5:1337 --authkey-file ~/cluster.key \\
      --python /opt/venv/bin/python --ssh-option=-p --ssh-option=2222
"""

KUBERNETES_HELP = """\
Print a Kubernetes manifest: a Secret holding the key (or --existing-secret)
and a Deployment of workers for the orchestrator at --connect, with a
readiness check that passes while each is connected. Apply it with kubectl.

examples:
  distripool kubernetes --connect 10.0.0.5:1337 --authkey-file cluster.key \\
      --image registry.example.com/my-app:1.0 --replicas 8 --cpu 4 --memory 8Gi | kubectl apply -f -
  distripool kubernetes --connect driver.jobs.svc:1337 --existing-secret distripool-key \\
      --image my-app:1.0 > workers.yaml
"""


def _env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--env takes NAME=VALUE, not {item!r}")
        out[k] = v
    return out


def _elsewhere(args):
    from .._config import read_key_file, resolve_cluster, resolve_key
    from ._cluster import Elsewhere

    key = read_key_file(args.authkey_file) if args.authkey_file else resolve_key()
    if not key:
        raise ValueError("no key: give --authkey-file (or set DISTRIPOOL_AUTHKEY_FILE)")
    return Elsewhere(key, resolve_cluster(args.cluster), args.encrypt)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--connect", action="append", required=True, metavar="HOST:PORT", help="where workers dial"
    )
    p.add_argument(
        "--authkey-file", metavar="FILE", help="the orchestrator's key (default $DISTRIPOOL_AUTHKEY_FILE)"
    )
    p.add_argument("--cluster", metavar="NAME", help="the orchestrator's cluster name")
    p.add_argument(
        "--no-encrypt", dest="encrypt", action="store_false", help="the orchestrator has encrypt=False"
    )
    p.add_argument("--processes", "-p", type=int, metavar="N", help="executors per worker")
    p.add_argument("--python", metavar="PATH", help="the interpreter the workers run")
    p.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a variable for the workers"
    )


def _watch(cluster, what: str) -> int:
    """Print the status when it changes, until every unit has ended."""
    last = None
    try:
        while True:
            rows = cluster.status()
            table = _table(rows)
            if table != last:
                print(table, flush=True)
                last = table
            if rows and all(r["state"] == "gone" for r in rows):
                return 0 if all(not r["error"] for r in rows) else 1
            time.sleep(5)  # an operator's view: polled
    except KeyboardInterrupt:
        print(f"distripool: interrupted; stopping the {what}", file=sys.stderr)
        return 130
    finally:
        cluster.close()


def _table(rows) -> str:
    cols = [k for k in ("job", "name", "host", "node", "state", "age") if any(k in r for r in rows)]
    lines = ["  ".join(c.upper() for c in cols) + "  DETAIL"]
    for r in rows:
        detail = r.get("error") or r.get("reason") or ""
        lines.append("  ".join(str(r.get(c) if r.get(c) is not None else "-") for c in cols) + f"  {detail}")
    return "\n".join(lines)


def _cmd_slurm(args) -> int:
    from ._slurm import SlurmCluster

    cluster = SlurmCluster(
        0,
        processes=args.processes or 1,
        cores=args.cores,
        memory=args.memory,
        walltime=args.walltime,
        partition=args.partition,
        account=args.account,
        directives=args.directive,
        skip_directives=args.skip_directive,
        python=args.python,
        env=_env(args.env),
        connect=split_addresses(args.connect),
        orchestrator=_elsewhere(args),
        log_dir=args.log_dir,
    )
    if args.script:
        print(cluster.job_script(), end="")
        cluster.close()
        return 0
    if args.dry_run:
        try:
            print(cluster.dry_run())
        finally:
            cluster.close()
        return 0
    try:
        cluster.scale(args.jobs)
    except BaseException:
        cluster.close()
        raise
    return _watch(cluster, "jobs")


def _cmd_ssh(args) -> int:
    from ._ssh import SSHCluster

    cluster = SSHCluster(
        args.hosts,
        processes=args.processes,
        python=args.python,
        env=_env(args.env),
        connect=split_addresses(args.connect),
        orchestrator=_elsewhere(args),
        ssh_options=args.ssh_option,
    )
    return _watch(cluster, "workers")


def _cmd_kubernetes(args) -> int:
    from .._config import read_key_file
    from ._kubernetes import kubernetes_manifest

    key = read_key_file(args.authkey_file) if args.authkey_file else None
    sys.stdout.write(
        kubernetes_manifest(
            split_addresses(args.connect),
            image=args.image,
            key=key,
            existing_secret=args.existing_secret,
            replicas=args.replicas,
            processes=args.processes,
            cpu=args.cpu,
            memory=args.memory,
            name=args.name,
            namespace=args.namespace,
            cluster=args.cluster,
            python=args.python or "python",
            encrypt=args.encrypt,
            env=_env(args.env),
        )
    )
    return 0


def add_commands(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("slurm", help="run workers as Slurm jobs", description=SLURM_HELP, formatter_class=raw)
    s.add_argument(
        "--jobs", "-n", type=int, required=True, metavar="N", help="jobs to submit, one worker each"
    )
    _common(s)
    s.add_argument("--cores", type=int, metavar="N", help="CPUs per job (default: --processes)")
    s.add_argument("--memory", metavar="SIZE", help="memory per job, like 4GB")
    s.add_argument("--walltime", metavar="HH:MM:SS", help="time limit per job; workers leave before it")
    s.add_argument("--partition", metavar="NAME")
    s.add_argument("--account", metavar="NAME")
    s.add_argument("--directive", action="append", default=[], metavar="LINE", help="an extra #SBATCH line")
    s.add_argument(
        "--skip-directive",
        action="append",
        default=[],
        metavar="TEXT",
        help="drop generated lines containing TEXT",
    )
    s.add_argument(
        "--log-dir", metavar="DIR", help="the jobs' output and key file (default ~/.distripool/slurm)"
    )
    s.add_argument("--script", action="store_true", help="print the job script and exit")
    s.add_argument(
        "--dry-run", action="store_true", help="ask Slurm whether it would run the job (sbatch --test-only)"
    )
    s.set_defaults(func=_cmd_slurm)

    h = sub.add_parser("ssh", help="run workers on SSH hosts", description=SSH_HELP, formatter_class=raw)
    h.add_argument("hosts", nargs="+", metavar="HOST")
    _common(h)
    h.add_argument("--ssh-option", action="append", default=[], metavar="ARG", help="an argument for ssh")
    h.set_defaults(func=_cmd_ssh)

    k = sub.add_parser(
        "kubernetes",
        help="print a Kubernetes manifest of workers",
        description=KUBERNETES_HELP,
        formatter_class=raw,
    )
    _common(k)
    k.add_argument("--image", required=True, help="a container image with distripool and your code")
    k.add_argument("--existing-secret", metavar="NAME", help="a Secret that holds the key under 'authkey'")
    k.add_argument("--replicas", type=int, default=1, metavar="N")
    k.add_argument("--cpu", metavar="QUANTITY", help="CPU request and limit per worker, like 4 or 500m")
    k.add_argument("--memory", metavar="QUANTITY", help="memory request and limit per worker, like 8Gi")
    k.add_argument("--name", default="distripool-workers", help="the Deployment's name")
    k.add_argument("--namespace", metavar="NAME")
    k.set_defaults(func=_cmd_kubernetes)
