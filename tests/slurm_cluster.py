"""A real one-node Slurm cluster on 127.0.0.1 for tests (munged, slurmctld, slurmd).

The cluster lives in a folder of its own: ``slurm.conf`` (CPUs from ``os.cpu_count()``, RealMemory a
little below the machine's), state, spool, logs and pid files, on free TCP ports, so it never touches
``/etc/slurm`` or another cluster on the host. Clients find it through ``SLURM_CONF``, which the
``slurm`` fixture sets for the test session (jobs inherit it through Slurm's environment export).

Needs the Debian packages ``slurmctld slurmd slurm-client munge`` and root (slurmd runs jobs as their
owner). Without them the fixture skips with the reason; ``.ci/run`` installs them when apt is there.

For a cluster to try things by hand: ``python -m tests.slurm_cluster /tmp/slurm`` (Ctrl-C stops it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


class Unavailable(RuntimeError):
    """Slurm cannot run here; the message says why (the fixture skips with it)."""


@dataclass
class SlurmCluster:
    """A running cluster: its folder, config file and the daemons this helper started."""

    root: Path
    conf: Path
    processes: dict[str, int] = field(default_factory=dict)  # daemon → pid we started

    @property
    def env(self) -> dict[str, str]:
        """Environment additions that point Slurm clients at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def log(self, daemon: str) -> str:
        """The tail of a daemon's log, for failure messages."""
        path = self.root / "log" / f"{daemon}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"


def which(name: str) -> str | None:
    """A Slurm or munge binary, also from sbin folders that a non-login PATH may lack."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_reason() -> str | None:
    """Why a cluster cannot start here (None when it can be tried)."""
    absent = [b for b in BINARIES if which(b) is None]
    if absent:
        return ("Slurm is not installed (missing " + ", ".join(absent) + "); install it with "
                "`apt-get install -y slurmctld slurmd slurm-client munge` (.ci/run does)")
    if os.geteuid() != 0:
        return "the test Slurm cluster needs root (slurmd runs jobs as their owner)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_memory_mb() -> int:
    """The machine's memory in MB, less 10% (slurmd refuses a node that claims more than it has)."""
    with open("/proc/meminfo") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    return max(500, int(kb / 1024 * 0.9))


def write_conf(root: Path, ctld_port: int, slurmd_port: int) -> Path:
    """``slurm.conf`` for one node ``localhost`` on 127.0.0.1, every path inside ``root``."""
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=curatetest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory={real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
    return conf


def munge_works() -> bool:
    """True when a munged answers (a credential encodes and decodes)."""
    try:
        token = subprocess.run([which("munge"), "-n"], capture_output=True, timeout=10, check=True).stdout
        subprocess.run([which("unmunge")], input=token, capture_output=True, timeout=10, check=True)
    except (subprocess.SubprocessError, OSError, TypeError):
        return False
    return True


def start_munge() -> bool:
    """Start munged unless one already answers; True when this call started it."""
    if munge_works():
        return False
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run([which("mungekey"), "--create"], check=True, capture_output=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    proc = subprocess.run(["runuser", "-u", "munge", "--", which("munged")], check=False, capture_output=True,
                          text=True, timeout=30)
    if proc.returncode != 0 or not _until(munge_works, 10):
        raise Unavailable(f"munged did not start: {proc.stderr.strip() or 'no answer'}")
    return True


def _until(check, seconds: float, every: float = 0.2) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(every)
    return False


def _pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


def node_state(env: dict[str, str]) -> str:
    """The node's state as sinfo prints it (``idle``, ``down*``, …), empty when unknown."""
    proc = subprocess.run([which("sinfo"), "-h", "-N", "-o", "%T"], check=False, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=10)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def start(root: Path) -> SlurmCluster:
    """Write the config and start munged (if needed), slurmctld and slurmd; wait until the node is idle.

    Raises :class:`Unavailable` with the reason when the binaries are missing or a daemon fails.
    """
    reason = missing_reason()
    if reason:
        raise Unavailable(reason)
    root = Path(root)
    cluster = SlurmCluster(root, write_conf(root, free_port(), free_port()))
    try:
        if start_munge():
            cluster.processes["munged"] = _pid(Path("/run/munge/munged.pid")) or 0
        _start_daemon(cluster, "slurmctld", [which("slurmctld"), "-f", str(cluster.conf)])
        _start_daemon(cluster, "slurmd", [which("slurmd"), "-f", str(cluster.conf), "-N", "localhost"])
        if not _until(lambda: node_state(cluster.env) == "idle", 30, 0.5):
            raise Unavailable(f"the Slurm node never became idle (state {node_state(cluster.env)!r}):\n"
                              f"{cluster.log('slurmd')}")
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _start_daemon(cluster: SlurmCluster, name: str, argv: list[str]) -> None:
    """Start one daemon (it forks into the background) and record its pid from its pid file."""
    env = {**os.environ, **cluster.env}
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=30)
    pid_file = cluster.root / "run" / f"{name}.pid"
    if proc.returncode != 0 or not _until(lambda: _pid(pid_file) is not None, 10):
        raise Unavailable(f"{name} did not start ({proc.stderr.strip()}):\n{cluster.log(name)}")
    cluster.processes[name] = _pid(pid_file)


def stop(cluster: SlurmCluster) -> None:
    """Cancel what is left in the queue, then stop the daemons this helper started (by pid)."""
    if "slurmctld" in cluster.processes:
        subprocess.run([which("scancel"), "--user", "root"], check=False, capture_output=True,
                       env={**os.environ, **cluster.env}, timeout=30)
    for name in ("slurmd", "slurmctld", "munged"):
        pid = cluster.processes.pop(name, None)
        if not pid:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)
        if not _until(lambda pid=pid: not _alive(pid), 15):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0].lower()
    return ""


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running one-node cluster for the session, with ``SLURM_CONF`` set; skips when unavailable."""
    try:
        cluster = start(tmp_path_factory.mktemp("slurm"))
    except Unavailable as e:
        pytest.skip(str(e))
    except (OSError, subprocess.SubprocessError, LookupError) as e:  # no munge user, a daemon hung, …
        pytest.skip(f"could not start a test Slurm cluster: {type(e).__name__}: {e}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        stop(cluster)


def main() -> None:
    """Start a cluster in the folder given (default /tmp/curate-slurm); Ctrl-C or SIGTERM stops it."""
    import signal
    import sys

    cluster = start(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/curate-slurm"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop(cluster)


if __name__ == "__main__":
    main()
