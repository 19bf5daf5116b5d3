"""Multi-node worker groups on Ray (`serve --executor ray`), on a real multi-node Ray cluster on this
machine (`ray.cluster_utils.Cluster` plus one `ray start` node: every node its own raylet with its own
CPUs), over two "hosts": two network namespaces joined by a veth pair.

Every Ray process runs inside private network namespaces (`unshare -n`, then `ip link set lo up`), with
RAY_USAGE_STATS_ENABLED=0: Ray finds no address there but the test's own, and nothing can leave the
machine. One driver run (tests/integration/ray_cluster.py) does every step on one cluster and one
server and reports JSON; the tests below check its parts against transformers and our own TP=1 engine.
The controller talks to the leader over TLS (a certificate made here), so every step runs over it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.server import ROOT
from tests.integration.test_families_serve import build_tokenizer
from tests.integration.tls import make_cert
from tests.oracle import make_random_model, run_ours

pytest.importorskip("ray", reason="ray is not installed: pip install 'shardserve[ray]' (make install does)")

# one driver run holds a cluster, a server and three launches: ~95 CPU-seconds, minutes on a loaded 2-core machine
pytestmark = pytest.mark.timeout(900)
PROMPTS = ["the quick brown fox", "a tensor parallel worker holds"]
NEW_TOKENS = 8
LEADER_NAME = "shardserve-leader"  # the only name in the leader's certificate (no IP address)


def _netns_available() -> str:
    """'' when this process can make a private network namespace, else why not."""
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip not found (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    return "" if probe.returncode == 0 else f"cannot make a network namespace: {probe.stderr.strip()} (needs root)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig

    root = tmp_path_factory.mktemp("ray-model")
    model_dir = root / "llama"
    tok = build_tokenizer(model_dir, ["<unk>", "<s>", "</s>"], append_eos=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    make_random_model(cfg, model_dir, std=0.25)
    return model_dir, tok


def _drive(module: str, tiny, work: Path) -> dict:
    """Run tests/integration/<module>.py in a private network namespace; its JSON report."""
    why = _netns_available()
    if why:
        pytest.skip(f"Ray tests run only inside a private network namespace: {why}")
    model_dir, _ = tiny
    spec, out = work / "spec.json", work / "out.json"
    tls = work / "tls"
    tls.mkdir()
    cert, key = make_cert(tls, name=LEADER_NAME, ips=())
    spec.write_text(json.dumps({"cache": str(work), "model": str(model_dir), "prompts": PROMPTS,
                                "tokens": NEW_TOKENS, "tls_cert": str(cert), "tls_key": str(key),
                                "tls_name": LEADER_NAME}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    driver = f"exec {sys.executable} -m tests.integration.{module} {spec} {out}"
    proc = subprocess.run(["unshare", "-n", "sh", "-c", f"ip link set lo up && {driver}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=840)
    assert out.is_file(), f"driver exited {proc.returncode} without a report:\n{proc.stderr[-6000:]}"
    result = json.loads(out.read_text())
    print({k: v for k, v in result.items() if k.endswith("_s")})
    assert "error" not in result, f"{result['error']}\n--- server log ---\n{result.get('server_log', '')}"
    return result


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    return _drive("ray_cluster", tiny, tmp_path_factory.mktemp("ray-run"))


@pytest.fixture(scope="module")
def reference(tiny):
    """Greedy tokens of transformers and of our own engine at TP=1, eos ignored (as the requests ask)."""
    from transformers import AutoModelForCausalLM

    model_dir, tok = tiny
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    theirs = [hf.generate(torch.tensor([i]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, len(i):]
              .tolist() for i in ids]
    ours, _ = run_ours(model_dir, ids, NEW_TOKENS, num_kv_blocks=32, max_model_len=64)
    assert ours == theirs, "our TP=1 engine and transformers disagree"
    assert any(len(set(t)) > 2 for t in theirs), "degenerate reference output: widen the weights"
    return theirs


def _nodes(describe: dict) -> list[str]:
    return [k["node_id"] for k in describe["replicas"][0]["ranks"]]


def test_tp2_strict_spread_one_rank_per_node_gives_the_tokens_of_tp1(run, reference):
    assert run["tp2"]["tokens"] == reference
    nodes = _nodes(run["tp2"]["describe"])
    assert len(nodes) == 2 and len(set(nodes)) == 2 and all(nodes), nodes  # admin describe names each node
    if "veth" in run:
        pytest.skip(f"both nodes on one address: {run['veth']}")
    # two hosts: the ranks meet and all-reduce across the veth pair, the controller reaches the leader on it
    hosts = sorted(k["node"].split()[0] for k in run["tp2"]["describe"]["replicas"][0]["ranks"])
    assert hosts == ["10.77.0.1", "10.77.0.2"], hosts
    crossing = [line for line in run["supervision_log"] if "collectives over veth-" in line]
    assert len(crossing) >= 2, run["supervision_log"]


def test_the_leader_serves_the_controller_over_tls_only(run):
    hop = run["leader_hop"]
    assert hop["plaintext"] == "UNAVAILABLE", hop  # no TLS handshake: refused
    assert hop["tls_without_token"] == "UNAUTHENTICATED", hop  # TLS works, and the token is still checked
    assert any(" (TLS)" in line for line in run["supervision_log"]), run["supervision_log"]


def test_an_s3_partition_reaches_each_node_rank_file_by_rank_file(run, reference):
    part = run["s3_partition"]
    print(f"TP=2 from S3 ready in {part['ready_s']:.1f}s: {part['fetched']}")
    assert part["tokens"] == reference
    # each rank fetched (on its node) the shared files and its own rank file, no other
    assert sorted(line.split()[1] for line in part["fetched"]) == ["0", "1"], part["fetched"]
    assert {"manifest.json", "config.json", "rank-0.safetensors", "rank-1.safetensors"} <= set(part["files"])
    if "veth" not in run:  # rank 1 on host B fetched over the veth pair
        assert sorted(line.split()[3].rstrip(":") for line in part["fetched"]) == ["10.77.0.1", "10.77.0.2"], part["fetched"]


def test_killed_node_ends_the_stream_unavailable_then_the_replica_comes_back(run, reference):
    kill = run["kill"]
    print(f"stream ended {kill['code']} {kill['ended_after_s']:.2f}s after node {kill['node']} was killed "
          f"(rank 1's); replica back after {kill['back_after_s']:.1f}s")
    assert kill["code"] == "UNAVAILABLE", kill
    assert kill["tokens_before"] >= 3
    before, after = _nodes(run["tp2"]["describe"]), _nodes(kill["describe"])
    assert before[1] not in after and len(set(after)) == 2, (before, after)
    assert kill["describe"]["replicas"][0]["restarts"] >= 1
    assert kill["tokens"] == reference


def test_tp2_pp2_over_four_nodes_gives_the_tokens_of_tp1(run, reference):
    if "tp2pp2" not in run:
        pytest.skip("TP=2 x PP=2 not run")
    assert run["tp2pp2"]["tokens"] == reference
    nodes = _nodes(run["tp2pp2"]["describe"])
    assert len(nodes) == 4 and len(set(nodes)) == 4, nodes


def test_sigterm_leaves_no_actor_placement_group_or_process(run):
    assert run["sigterm_exit"] == 0
    assert run["left"] == {"placement_groups": [], "actors": [], "worker_processes": []}, run["left"]

