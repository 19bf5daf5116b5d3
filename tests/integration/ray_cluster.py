"""Driver for tests/integration/test_ray.py: a real multi-node Ray cluster on this machine, over two
"hosts", the real server on it with `--executor ray`, and what happened, as JSON.

Run only inside a private network namespace, "host A" (test_ray.py starts it as
`unshare -n sh -c 'ip link set lo up && exec python -m tests.integration.ray_cluster IN OUT'`): Ray finds
no address there but its own, so nothing it does can leave the machine; RAY_USAGE_STATS_ENABLED=0.
Host B is the network namespace of a `sleep` started here with `unshare -n`, joined to A by one veth
pair (10.77.0.1 on A, 10.77.0.2 on B, nothing else routed), so the ranks' gloo traffic and the
controller's calls to a leader on B really cross between two addresses. (Where a veth pair cannot be
made, every node lives on A's 127.0.0.1 and the report says so.)

The controller-to-leader hop runs over TLS (--worker-tls-cert/--worker-tls-key: a self-signed
certificate for the name "shardserve-leader" only, no IP, so the controller's check of that name, not
the node address it dials, is what passes), so every step below exercises it.

Nodes, each its own raylet with its own CPUs and a custom resource naming it: the head (no CPUs; the GCS,
where the controller's driver connects) and "a" on host A (`ray.cluster_utils.Cluster`), "b" on host B
(`ray start --block --address HEAD --node-ip-address 10.77.0.2`, entered with nsenter). Steps:
  1. TP=2 strict-spread (one rank per node, so one per host): greedy tokens, each rank's node; a
     plaintext call to the leader's port, and a TLS call without the launch token (how each ended);
  1b. that TP=2 partition uploaded to a local S3 (moto, on host A's address, so host B reaches it over
     the veth pair), loaded from there through the admin API: the controller fetches only the shared
     files, each rank its own rank file on its node; tokens and which node fetched what; unloaded;
  2. a long stream, then the node of rank 1 killed (every process of it, SIGKILL): how the stream ended
     and how long after; a replacement node "c" joins; the replica comes back (restarts >= 1) on other
     nodes with the same tokens;
  3. TP=2 x PP=2 strict-spread on four nodes ("d" and "e" join), loaded through the admin API: tokens;
  4. SIGTERM of the server: its exit status, then the placement groups and actors Ray still holds
     alive, and the worker processes left on the machine (none expected).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from shardserve.v1 import admin_pb2 as apb
from shardserve.v1 import admin_pb2_grpc as apb_grpc
from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from tests.integration.processes import Stream, wait_for
from tests.integration.s3_fixtures import BUCKET, TEST_ENV, MotoServer, upload_folder
from tests.integration.server import ServerProcess

A_IP, B_IP = "10.77.0.1", "10.77.0.2"
TOKEN = "ray-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
# node death seen by the GCS in ~3 s instead of ~30 s (the default), so a relaunch does not keep
# picking the dead node for a bundle
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                 "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


def greedy(server, model: str, prompts: list[str], n: int) -> list[list[int]]:
    stub = gpb_grpc.GenerationStub(server.channel)
    params = gpb.GenerationParameters(max_new_tokens=n, ignore_eos=True)
    out = stub.Generate(gpb.GenerateRequest(prompts=prompts, parameters=params, model=model), timeout=120)
    return [list(o.token_ids) for o in out.outputs]


def describe(server, model: str) -> dict:
    stub = apb_grpc.AdminStub(server.channel)
    d = stub.DescribeModel(apb.DescribeModelRequest(name=model), metadata=AUTH, timeout=30)
    return {"state": d.state, "replicas": [
        {"name": r.name, "state": r.state, "restarts": r.restarts,
         "ranks": [{"rank": k.rank, "node": k.node, "node_id": k.node_id} for k in r.ranks]} for r in d.replicas]}


def leader_hop(server, ca: bytes, name: str) -> dict:
    """The leader's address (from the server's log) and how a plaintext call and a TLS call without the
    launch token to it end (status code names)."""
    from shardserve.v1 import worker_pb2 as wpb
    from shardserve.v1 import worker_pb2_grpc as wpb_grpc

    target = re.findall(r"leader at (\S+?),", server.log_path.read_text())[-1]
    out = {"target": target}
    for kind in ("plaintext", "tls_without_token"):
        opts = [("grpc.ssl_target_name_override", name)] if kind != "plaintext" else []
        channel = grpc.insecure_channel(target) if kind == "plaintext" else \
            grpc.secure_channel(target, grpc.ssl_channel_credentials(ca), options=opts)
        try:
            wpb_grpc.WorkerStub(channel).Status(wpb.WorkerStatusRequest(), timeout=10)
            out[kind] = "OK"
        except grpc.RpcError as e:
            out[kind] = e.code().name
        finally:
            channel.close()
    return out


def s3_partition(server, moto, cache: Path, prompts: list[str], n: int) -> dict:
    """Step 1b: the TP=2 partition the server made, served from S3 with each rank fetching its own file."""
    client = moto.client()
    client.create_bucket(Bucket=BUCKET)
    upload_folder(client, next(cache.glob("partitions/*-tp2-pp1-fp32")), BUCKET, "tiny-tp2/")
    stub = apb_grpc.AdminStub(server.channel)
    t0 = time.monotonic()
    stub.LoadModel(apb.LoadModelRequest(name="tinys3", source=f"s3://{BUCKET}/tiny-tp2/", wait=True,
                                        layout=apb.Layout(tensor_parallel=2)), metadata=AUTH, timeout=300)
    out = {"ready_s": time.monotonic() - t0, "tokens": greedy(server, "tinys3", prompts, n),
           "fetched": [line[line.index("rank "):][:300] for line in server.log_path.read_text().splitlines()
                       if "its files of the partition fetched" in line],
           "files": sorted(p.name for p in (cache / "s3" / BUCKET / "tiny-tp2").iterdir())}
    stub.UnloadModel(apb.UnloadModelRequest(name="tinys3"), metadata=AUTH, timeout=120)
    return out


def stream(server, model: str, prompt: str) -> Stream:
    return Stream(server, gpb.GenerateStreamRequest(
        prompt=prompt, model=model, parameters=gpb.GenerationParameters(max_new_tokens=400, ignore_eos=True)), 90)


def replica_ready(server, model: str, restarts: int = 0) -> dict | None:
    try:
        d = describe(server, model)
    except grpc.RpcError:
        return None
    reps = d["replicas"]
    return d if reps and reps[0]["state"] == "ready" and reps[0]["restarts"] >= restarts and reps[0]["ranks"] else None


def worker_processes(marker: str) -> list[str]:
    """Command lines of processes on this machine that run a rank of this test's model."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if " -m worker " in cmd and marker in cmd:
            out.append(f"{pid}: {cmd[:200]}")
    return out


def forget(address: str) -> None:
    """Ray writes the cluster's address to /tmp/ray/ray_current_cluster, where a later `ray.init()` (and
    `serve --executor ray` without --ray-address) would look for a cluster: remove it when it is ours."""
    path = Path("/tmp/ray/ray_current_cluster")
    try:
        if path.read_text().strip() == address:
            path.unlink()
    except OSError:
        pass


class HostB:
    """A second network namespace joined to this one by a veth pair, and one Ray node living in it."""

    def __init__(self):
        self.holder = subprocess.Popen(["unshare", "-n", "sleep", "900"])
        mine, deadline = os.readlink("/proc/self/ns/net"), time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/net") == mine and time.monotonic() < deadline:
            time.sleep(0.02)
        self.enter = ["nsenter", "-t", str(self.holder.pid), "-n"]
        self.node: subprocess.Popen | None = None
        try:
            for cmd in (["ip", "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b", "netns",
                         str(self.holder.pid)], ["ip", "addr", "add", f"{A_IP}/24", "dev", "veth-a"],
                        ["ip", "link", "set", "veth-a", "up"], [*self.enter, "ip", "link", "set", "lo", "up"],
                        [*self.enter, "ip", "addr", "add", f"{B_IP}/24", "dev", "veth-b"],
                        [*self.enter, "ip", "link", "set", "veth-b", "up"]):
                subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            self.close()
            raise RuntimeError(getattr(e, "stderr", "") or str(e)) from None

    def start_node(self, address: str, cpus: int) -> None:
        ray_cli = str(Path(sys.executable).parent / "ray")
        self.node = subprocess.Popen(
            [*self.enter, ray_cli, "start", "--block", "--address", address, "--node-ip-address", B_IP,
             "--num-cpus", str(cpus), "--resources", json.dumps({"node_b": 1}), "--disable-usage-stats"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)

    def kill_node(self) -> None:
        """The host dies: every process of its node at once (they share one process group)."""
        if self.node is not None and self.node.poll() is None:
            os.killpg(self.node.pid, signal.SIGKILL)
            self.node.wait()

    def close(self) -> None:
        if self.node is not None and self.node.poll() is None:
            os.killpg(self.node.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes
            try:
                self.node.wait(20)
            except subprocess.TimeoutExpired:
                self.kill_node()
        self.holder.kill()
        self.holder.wait()


def main(spec_path: str, out_path: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    spec = json.loads(Path(spec_path).read_text())
    result: dict = {"steps": []}

    def save():
        Path(out_path).write_text(json.dumps(result, indent=1))

    t0 = time.monotonic()
    try:
        host_b = HostB()
        ip = A_IP
    except RuntimeError as e:
        host_b, ip = None, "127.0.0.1"
        result["veth"] = f"no veth pair: {e}"
    cluster, server, nodes = None, None, {}
    cache, model_dir, prompts, n = spec["cache"], spec["model"], spec["prompts"], spec["tokens"]
    # S3 credentials for the local server only, in every node's environment (the nodes inherit this one's)
    aws = Path(cache) / "aws"
    os.environ.update({**TEST_ENV, "AWS_CONFIG_FILE": str(aws / "config"), "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials")})
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    moto = MotoServer(Path(cache) / "moto.log", host=ip)

    def add(name: str, cpus: int):
        nodes[name] = cluster.add_node(num_cpus=cpus, node_ip_address=ip, resources={f"node_{name}": 1})

    try:
        moto.start()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "node_ip_address": ip, "_system_config": SYSTEM_CONFIG})
        add("a", 2)  # two CPUs: after the kill, two nodes keep one free each for the TP=2 x PP=2 replica
        if host_b is not None:
            host_b.start_node(cluster.address, 2)
            wait_for(lambda: len(cluster.global_state._live_node_ids()) == len(cluster.list_all_nodes()) + 1,
                     60, "host B's node to join", every=0.2)
        else:
            add("b", 2)
        result["cluster_start_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        server = ServerProcess("--executor", "ray", "--ray-address", cluster.address, "--placement-strategy",
                               "strict-spread", "--tp", "2", "--model", model_dir, "--name", "tiny", "--threads", "1",
                               "--max-model-len", "512", "--num-kv-blocks", "96", "--admin-token", TOKEN,
                               "--max-batch-size", "4", "--worker-tls-cert", spec["tls_cert"],
                               "--worker-tls-key", spec["tls_key"], cache_dir=Path(cache), timeout=400,
                               env={"AWS_ENDPOINT_URL_S3": moto.url})
        result["server_ready_s"] = time.monotonic() - t1
        tp2 = greedy(server, "tiny", prompts, n)
        result["tp2"] = {"tokens": tp2, "describe": describe(server, "tiny")}
        result["leader_hop"] = leader_hop(server, Path(spec["tls_cert"]).read_bytes(), spec["tls_name"])
        result["s3_partition"] = s3_partition(server, moto, Path(cache), prompts, n)
        result["steps"].append("tp2")
        save()

        # 2. a node dies mid-stream: rank 1's, on whichever host it is
        st = stream(server, "tiny", prompts[0])
        wait_for(lambda: st.tokens >= 3, 60, "tokens on the stream")
        rank1 = result["tp2"]["describe"]["replicas"][0]["ranks"][1]
        victim = next((name for name, node in nodes.items() if node.node_id == rank1["node_id"]), "b")
        killed_at = time.monotonic()
        if victim in nodes:
            cluster.remove_node(nodes.pop(victim), allow_graceful=False)
        else:
            host_b.kill_node()
        st.wait()
        result["kill"] = {"node": victim, "code": st.code and st.code.name, "details": st.details,
                          "tokens_before": st.tokens, "ended_after_s": (st.ended_at - killed_at) if st.ended_at else None}
        add("c", 2)  # the replacement host
        back = wait_for(lambda: replica_ready(server, "tiny", restarts=1), 180, "the replica to come back",
                        every=0.2)
        result["kill"]["back_after_s"] = time.monotonic() - killed_at
        result["kill"]["describe"] = back
        result["kill"]["tokens"] = greedy(server, "tiny", prompts, n)
        result["steps"].append("kill")
        save()

        # 3. TP=2 x PP=2, one rank per node: two more nodes
        if spec.get("tp2pp2", True):
            add("d", 1)
            add("e", 1)
            stub = apb_grpc.AdminStub(server.channel)
            t2 = time.monotonic()
            stub.LoadModel(apb.LoadModelRequest(name="tiny4", source=model_dir, wait=True,
                                                layout=apb.Layout(tensor_parallel=2, pipeline_parallel=2)),
                           metadata=AUTH, timeout=400)
            result["tp2pp2"] = {"ready_s": time.monotonic() - t2, "describe": describe(server, "tiny4"),
                                "tokens": greedy(server, "tiny4", prompts, n)}
            result["steps"].append("tp2pp2")
            save()

        # 4. SIGTERM: nothing left behind
        result["sigterm_exit"] = server.stop("term")
        result["supervision_log"] = [line[:400] for line in server.log_path.read_text().splitlines()
                                     if any(k in line for k in (" down: ", "ranks placed", "restart failed",
                                                                "is gone", " ready (tp=", "collectives over",
                                                                "serving on "))]
        server = None
        ray.init(address=cluster.address, log_to_driver=False, _node_ip_address=ip)
        from ray._private.state import actors

        def left():
            pgs = ray.util.placement_group_table()
            return {"placement_groups": [p["name"] for p in pgs.values() if p["state"] != "REMOVED"],
                    "actors": [f"{a['ActorClassName']} {a['State']}" for a in actors().values()
                               if a["State"] != "DEAD"],
                    "worker_processes": worker_processes(cache)}

        deadline = time.monotonic() + 15  # Ray's tables catch up with a kill a moment later
        while any((found := left()).values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        result["left"] = found
        ray.shutdown()
        result["steps"].append("sigterm")
    except BaseException as e:  # noqa: BLE001 - reported to the test with the server's log
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if server is not None:
            result["server_log"] = server.output()[-20000:]
            server.stop("kill")
        elif "error" in result:
            logs = sorted(Path(cache).glob("server-*.log"))
            result["server_log"] = logs[-1].read_text()[-20000:] if logs else ""
        save()
        if host_b is not None:
            host_b.close()
        if cluster is not None:
            forget(cluster.address)
            cluster.shutdown()
        moto.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
