#!/usr/bin/env python
"""Start a Dask cluster whose workers are Slurm jobs, and keep it up for several curate runs.

    python jobs/dask-slurm-cluster.py --queue cpu --cores 8 --memory 32GB --walltime 08:00:00 --workers 16

prints the scheduler's address; point manifests at it with

    executor: {kind: dask, address: tcp://10.0.0.5:8786}

Ctrl-C (or SIGTERM) closes the cluster and cancels its worker jobs. To let curate start and stop the
workers with each run instead, use ``executor: {kind: dask, cluster: {class: dask_jobqueue.SLURMCluster,
...}}`` (see dask-slurm.sbatch).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", help="partition of the worker jobs")
    p.add_argument("--account", help="account charged for the worker jobs")
    p.add_argument("--cores", type=int, default=1, help="cores per worker job")
    p.add_argument("--processes", type=int, help="worker processes per job (default: one per core)")
    p.add_argument("--memory", default="4GB", help="memory per worker job")
    p.add_argument("--walltime", default="01:00:00", help="time limit of each worker job")
    p.add_argument("--interface", help="network interface the workers reach the scheduler on (e.g. ib0, lo)")
    p.add_argument("--setup", action="append", default=[], help="shell line run before a worker (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="worker processes in all")
    p.add_argument("--port", type=int, default=8786, help="scheduler port")
    p.add_argument("--log-directory", help="folder for the worker jobs' logs (default: slurm-<id>.out here)")
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    from dask_jobqueue import SLURMCluster

    a = parse(argv)
    cluster = SLURMCluster(queue=a.queue, account=a.account, cores=a.cores, processes=a.processes or a.cores,
                           memory=a.memory, walltime=a.walltime, interface=a.interface,
                           job_script_prologue=a.setup, scheduler_options={"port": a.port},
                           log_directory=a.log_directory)
    cluster.scale(a.workers)
    print(f"executor: {{kind: dask, address: {cluster.scheduler_address}}}", flush=True)
    print("worker job script:\n" + cluster.job_script(), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with contextlib.suppress(KeyboardInterrupt, SystemExit):  # Ctrl-C or scancel: shut down cleanly
            signal.pause()
    finally:
        cluster.close()


if __name__ == "__main__":
    main(sys.argv[1:])
