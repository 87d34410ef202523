"""Real services for the production-shaped tests, each started by the test on loopback and stopped by the
process group it was started in (never `ray stop` / pkill):

- S3Server        moto's standalone S3-compatible HTTP server (`moto_server`)
- MlflowServer    `mlflow server`, SQLite backend, artifacts proxied into the S3 bucket
- LoopbackCluster a Ray head that runs nothing (num_cpus=0) plus a worker node, both on 127.0.0.1
- non_loopback_sockets: every TCP socket of this process tree that is not on loopback
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from tests.conftest import free_ports

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        try:
            value = predicate()
        except Exception:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status == 200


class _Service:
    proc: subprocess.Popen

    def _start(self, cmd: list[str], env: dict, log_path: str) -> None:
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this service was started in, nothing else
            self.proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


class S3Server(_Service):
    BUCKET = "raylong"

    def __init__(self, workdir: str):
        (self.port,) = free_ports(1)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # dummy keys (the server accepts any); region set so no client asks an instance metadata service
        self.env = {"AWS_ACCESS_KEY_ID": "raylong-test", "AWS_SECRET_ACCESS_KEY": "raylong-test",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                    "AWS_ENDPOINT_URL": self.endpoint, "MLFLOW_S3_ENDPOINT_URL": self.endpoint}
        self._start([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                    {**os.environ, **self.env}, os.path.join(workdir, "s3.log"))
        wait_for(lambda: http_ok(f"{self.endpoint}/moto-api/"), 60, "the S3 server", self.proc)
        self.client().create_bucket(Bucket=self.BUCKET)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="raylong-test",
                            aws_secret_access_key="raylong-test", region_name="us-east-1")

    def upload_dir(self, local: str, prefix: str) -> str:
        s3 = self.client()
        for root, _, names in os.walk(local):
            for name in names:
                path = os.path.join(root, name)
                s3.upload_file(path, self.BUCKET, f"{prefix}/{os.path.relpath(path, local)}")
        return f"s3://{self.BUCKET}/{prefix}"

    def download_dir(self, uri: str, local: str) -> str:
        bucket, prefix = uri.removeprefix("s3://").split("/", 1)
        s3 = self.client()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):
                    continue  # a directory marker (pyarrow writes them), not a file
                dest = os.path.join(local, os.path.relpath(obj["Key"], prefix))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                s3.download_file(bucket, obj["Key"], dest)
        return local

    def keys(self, prefix: str) -> list[str]:
        s3, out = self.client(), []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.BUCKET, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out


class MlflowServer(_Service):
    def __init__(self, workdir: str, s3: S3Server):
        (self.port,) = free_ports(1)
        self.uri = f"http://127.0.0.1:{self.port}"
        cmd = [os.path.join(BIN, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{workdir}/mlflow-server.db",
               "--artifacts-destination", f"s3://{S3Server.BUCKET}/mlartifacts"]
        self._start(cmd, {**os.environ, **s3.env}, os.path.join(workdir, "mlflow-server.log"))
        wait_for(lambda: http_ok(f"{self.uri}/health"), 240, "the MLflow server", self.proc)


class LoopbackCluster(_Service):
    """A head node that runs nothing (num_cpus=0: the job driver only) and one worker node with `cpus`
    logical CPUs, both bound to 127.0.0.1, started by ray.cluster_utils in a helper process of its own (Ray
    reads its auth mode at import, so the environment a real `ray start` node has must be there before
    Ray is imported). Jobs go in through `ray job submit`, as a user's do."""

    def __init__(self, workdir: str, cpus: int):
        # Every port either node would take (several at fixed defaults, like the dashboard agent's 52365),
        # drawn in one call so that no two are the same. Drawn separately, a port could be handed out again
        # before the process it was meant for had bound it, and two agents then shared it.
        dashboard_port, gcs_port, client_port, *ports = free_ports(3 + 2 * len(NODE_PORTS))
        self.dashboard = f"http://127.0.0.1:{dashboard_port}"
        self.gcs_address = f"127.0.0.1:{gcs_port}"
        # what `ray start` on a real node has: every Ray process (the job's driver included) inherits it
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                    "RAY_ADDRESS": self.dashboard}
        self.env.pop("MLFLOW_TRACKING_URI", None)
        # token auth needs a token, which a fresh HOME does not have until one is generated
        subprocess.run([os.path.join(BIN, "ray"), "get-auth-token", "--generate"], env=self.env, check=True,
                       capture_output=True)
        self.ready = os.path.join(workdir, "cluster.ready")
        # Ray's sockets live under its temp dir and a Unix socket path has at most 107 bytes: keep it short
        self.temp_dir = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
        self._start([sys.executable, "-m", "tests.services", self.temp_dir, str(cpus), self.ready,
                     *map(str, (dashboard_port, gcs_port, client_port, *ports))],
                    {**self.env, "PYTHONPATH": REPO}, os.path.join(workdir, "cluster.log"))
        wait_for(lambda: os.path.exists(self.ready), 240, "the Ray cluster", self.proc)
        wait_for(lambda: self.ray("job", "list").returncode == 0, 120, "the Ray Jobs API", self.proc)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """A `ray` CLI command against this cluster."""
        return subprocess.run([os.path.join(BIN, "ray"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """`ray job submit ARGS`, waiting while the head's job agent is still starting (Ray refuses with
        "No available agent" until it is up)."""
        deadline = time.time() + timeout
        while True:
            out = self.ray("job", "submit", *args, timeout=max(1, deadline - time.time()))
            if "No available agent" not in out.stdout + out.stderr or time.time() > deadline - 60:
                return out
            time.sleep(2)

    def train_worker_pids(self) -> list[int]:
        """PIDs of the live Ray Train worker actors."""
        import json

        out = self.ray("list", "actors", "--format", "json", "--filter", "state=ALIVE", "--limit", "1000", "--detail")
        try:
            actors = json.loads(out.stdout) if out.returncode == 0 else []
        except ValueError:
            return []
        return [a["pid"] for a in actors if "TrainWorker" in a.get("class_name", "")]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # the helper shuts the cluster down, then exits
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of the cluster: every Ray process is in the helper's process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        shutil.rmtree(f"{self.temp_dir}-worker", ignore_errors=True)


NODE_PORTS = ("dashboard_agent_listen_port", "metrics_agent_port", "metrics_export_port", "runtime_env_agent_port")


def _run_cluster(temp_dir: str, cpus: int, ready: str, ports: list[int]) -> None:
    from ray.cluster_utils import Cluster

    dashboard_port, gcs_port, client_port, *node_ports = ports
    head_ports = dict(zip(NODE_PORTS, node_ports[: len(NODE_PORTS)]))
    worker_ports = dict(zip(NODE_PORTS, node_ports[len(NODE_PORTS) :]))
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
        "num_cpus": 0, "node_ip_address": "127.0.0.1", "gcs_server_port": gcs_port, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port, "temp_dir": temp_dir,
        "ray_client_server_port": client_port, **head_ports})
    # its own temp dir and log monitor, as a real node has its own disk: sharing the head's, the two
    # runtime-env agents extracted the job's working_dir into one directory, replacing it under the running
    # job driver (cluster_utils turns the log monitor off on added nodes, which share the head's by default)
    cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1", object_store_memory=400 * 2**20,
                     temp_dir=f"{temp_dir}-worker", include_log_monitor=True, **worker_ports)
    cluster.wait_for_nodes()
    # What `ray start` writes on every node and cluster_utils does not: the GCS address in the node's temp
    # dir. The job supervisor resolves the driver's RAY_ADDRESS ("auto") from that file; without it Ray falls
    # back to any GCS process it finds on the machine, and a job could join another cluster on this host
    # (the test session's own), where its working_dir package does not exist.
    from ray._private.utils import write_ray_address

    for node_temp_dir in (temp_dir, f"{temp_dir}-worker"):
        write_ray_address(cluster.address, node_temp_dir)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    open(ready, "w").close()
    while not stop:
        time.sleep(0.5)
    cluster.shutdown()


def _loopback(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def non_loopback_sockets() -> list[str]:
    """TCP sockets of this process and its descendants that listen on, or connect to, a non-loopback address."""
    import psutil

    bad = []
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="tcp")
            name = " ".join(p.cmdline()[:3])[:120]
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for c in conns:
            addrs = [c.laddr] + ([c.raddr] if c.raddr else [])
            if not all(_loopback(a.ip) for a in addrs if a):
                bad.append(f"pid {p.pid} ({name}): {c.status} {c.laddr} -> {c.raddr or '-'}")
    return bad


if __name__ == "__main__":  # LoopbackCluster's helper process
    _run_cluster(sys.argv[1], int(sys.argv[2]), sys.argv[3], [int(p) for p in sys.argv[4:]])
