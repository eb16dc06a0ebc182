"""A throwaway one-node SLURM cluster (munged + slurmctld + slurmd) for the integration test.

The node advertises two fake GPUs (character devices made with mknod), so jobs that ask for
``--gpus`` are scheduled and see ``CUDA_VISIBLE_DEVICES``. Two partitions, ``cpu`` (default)
and ``gpu``, match profiles/slurm. Every daemon is started in the foreground by us and stopped
by its PID, never by name, so a real cluster on the same machine is never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = Path("/etc/slurm/gres.conf")
MUNGE_KEY = Path("/etc/munge/munge.key")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (None if it can)."""
    if os.geteuid() != 0:
        return "needs root: slurmd must run as root and the config must sit in /etc/slurm"
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return (
            f"SLURM/munge not installed (missing {', '.join(missing)}); "
            ".ci/run installs slurm-wlm and munge"
        )
    if not MUNGE_KEY.exists():
        return f"{MUNGE_KEY} is missing (the munge package creates it)"
    for path in (SLURM_CONF, GRES_CONF):
        if path.exists() and "layerscope-test-cluster" not in path.read_text(errors="replace"):
            return (
                f"{path} exists and is not ours: refusing to replace a real cluster's configuration"
            )
    return None


def _config(tmp: Path, cpus: int, mem_mb: int) -> str:
    # The marker on the first line says the file is the test's own (checked before replacing it).
    return f"""# layerscope-test-cluster: written by tests/slurm_cluster.py, removed at test end
ClusterName=layerscope
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={tmp}/munge.socket
CredType=cred/munge
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=86400
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} Gres=gpu:fake:2 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
PartitionName=gpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class Cluster:
    def __init__(self, tmp: Path, *, cpus: int = 8, mem_mb: int = 64000):
        self.tmp = Path(tmp)
        self.cpus = cpus
        self.mem_mb = mem_mb
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        tmp = self.tmp
        for sub in ("state", "spool"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        devices = []
        for i in range(2):
            dev = tmp / f"fakegpu{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # a char device, like /dev/null
            devices.append(dev)
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(_config(tmp, self.cpus, self.mem_mb))
        GRES_CONF.write_text(
            "# layerscope-test-cluster\n"
            f"NodeName=localhost Name=gpu Type=fake File={tmp}/fakegpu[0-1]\n"
        )
        self._spawn(
            [
                "munged",
                "-F",
                "--force",
                f"--socket={tmp}/munge.socket",
                f"--key-file={MUNGE_KEY}",
                f"--pid-file={tmp}/munged.pid",
                f"--log-file={tmp}/munged.log",
                f"--seed-file={tmp}/munge.seed",
            ],
            "munged",
        )
        self._wait(lambda: (tmp / "munge.socket").exists(), timeout, "munged socket")
        self._spawn(["slurmctld", "-D", "-i"], "slurmctld")
        self._wait(
            lambda: self._run(["scontrol", "ping"]).stdout.find("UP") >= 0, timeout, "slurmctld"
        )
        self._spawn(["slurmd", "-D"], "slurmd")
        self._wait(self._node_ready, timeout, "node localhost to become idle")

    def stop(self) -> None:
        """Stop our daemons by PID (SIGTERM, then SIGKILL), remove our config files."""
        with contextlib.suppress(Exception):
            self._run(["scancel", "--user=root"], timeout=10)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for path in (SLURM_CONF, GRES_CONF):
            if path.exists() and "layerscope-test-cluster" in path.read_text(errors="replace"):
                path.unlink()

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- helpers -----------------------------------------------------------------------------
    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.tmp / f"{name}.stdout", "wb")
        self.procs.append(
            subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        )

    def _run(self, cmd: list[str], timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)

    def _node_ready(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split()
        return bool(out) and all(s.rstrip("*") in ("idle", "mixed", "allocated") for s in out)

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{proc.args[0]} exited ({proc.returncode}) while waiting for {what}: "
                        + self.logs()
                    )
            with contextlib.suppress(Exception):
                if cond():
                    return
            time.sleep(0.3)
        raise TimeoutError(f"timed out after {timeout} s waiting for {what}: " + self.logs())

    def logs(self) -> str:
        parts = []
        for name in (
            "munged.stdout",
            "slurmctld.log",
            "slurmd.log",
            "slurmctld.stdout",
            "slurmd.stdout",
        ):
            path = self.tmp / name
            if path.exists():
                parts.append(f"--- {name} ---\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def jobs(self) -> str:
        """``scontrol show job`` for every job this cluster has run (kept by MinJobAge)."""
        return self._run(["scontrol", "show", "job", "-d"]).stdout
