"""A real Spark standalone cluster for the engine tests: a master and workers on loopback,
started with the `spark-class` launcher pyspark ships (no separate Spark install), each worker
with one core, stopped afterwards. Needs Java (Spark's JVM)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SparkCluster:
    master_url: str
    ui_port: int
    folder: Path
    master: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)

    def alive_workers(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=2) as r:
                state = json.loads(r.read())
        except OSError:
            return 0
        return sum(w.get("state") == "ALIVE" for w in state.get("workers", []))

    def kill_worker(self, index: int) -> None:
        """SIGKILL a worker and the executor JVMs it started (its process group)."""
        os.killpg(self.workers[index].pid, signal.SIGKILL)
        self.workers[index].wait(timeout=30)

    def stop(self) -> None:
        for process in [*self.workers, self.master]:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=30)


def start_spark_cluster(n_workers: int = 2, timeout: float = 90) -> SparkCluster:
    import pyspark

    home = Path(pyspark.__file__).parent
    launcher = home / "bin" / "spark-class"
    folder = Path(tempfile.mkdtemp(prefix="vitlab-spark-"))
    env = {
        **os.environ,
        "SPARK_HOME": str(home),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_WORKER_DIR": str(folder / "work"),
        "SPARK_LOG_DIR": str(folder),
    }
    port, ui_port = _free_port(), _free_port()

    def launch(args: list[str], name: str) -> subprocess.Popen:
        log = open(folder / f"{name}.log", "wb")  # noqa: SIM115 - the process keeps it
        return subprocess.Popen(
            [str(launcher), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed with its executors
        )  # fmt: skip

    master = launch(
        ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
         "--webui-port", str(ui_port)],
        "master",
    )  # fmt: skip
    url = f"spark://127.0.0.1:{port}"
    cluster = SparkCluster(url, ui_port, folder, master)
    for i in range(n_workers):
        cluster.workers.append(
            launch(
                [
                    "org.apache.spark.deploy.worker.Worker",
                    url,
                    "--host",
                    "127.0.0.1",
                    "--cores",
                    "1",
                    "--memory",
                    "2g",
                    "--webui-port",
                    str(_free_port()),
                ],
                f"worker{i}",
            )  # fmt: skip
        )
    deadline = time.monotonic() + timeout
    while cluster.alive_workers() < n_workers:
        if time.monotonic() > deadline or master.poll() is not None:
            logs = "".join(p.read_text(errors="replace")[-1500:] for p in folder.glob("*.log"))
            cluster.stop()
            raise RuntimeError(f"the Spark standalone cluster did not start: {logs}")
        time.sleep(0.5)
    return cluster
