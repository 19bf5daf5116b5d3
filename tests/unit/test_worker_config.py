"""The launch contract: one validated WorkerConfig, carried as JSON, copied per rank."""

import dataclasses
from pathlib import Path

import pytest

from controller.fleet.placement import RankPlacement
from controller.fleet.replica import ReplicaSpec
from worker.config import ConfigError, WorkerConfig, WorkerReport
from worker.engine.engine import EngineConfig
from worker.engine.scheduler import SchedulerConfig


def test_json_round_trip_and_per_rank_copies():
    base = WorkerConfig(model_dir=Path("/m"), tensor_parallel=2, pipeline_parallel=2, stage_layers=(3, 1),
                        quantize="int8", test_hooks=("tests.x",))
    rank = dataclasses.replace(base, rank=3, device="cuda:3", cpus=(6, 7), socket="/s")
    assert WorkerConfig.from_json(rank.to_json()) == rank
    assert (rank.world_size, base.rank) == (4, 0)


@pytest.mark.parametrize("text, needle", [
    ('{"model_dir": "/m", "max_batch_sise": 4}', "WorkerConfig.max_batch_sise: unknown field"),
    ('{"model_dir": "/m", "max_batch_size": "4"}', "WorkerConfig.max_batch_size='4': expected int"),
    ('{"model_dir": "/m", "max_batch_size": 0}', "WorkerConfig.max_batch_size=0: must be >= 1"),
    ('{"model_dir": "/m", "dtype": "fp8"}', "WorkerConfig.dtype='fp8'"),
    ('{"model_dir": "/m", "rank": 2}', "WorkerConfig.rank=2: must be < world size 1"),
    ('{"dtype": "fp32"}', "WorkerConfig.model_dir: missing"),
    ('{"model_dir": "/m", "speculative_method": "medusa", "num_speculative_tokens": 2}',
     "WorkerConfig.speculative_method='medusa'"),
    ('{"model_dir": "/m", "speculative_method": "ngram"}', "WorkerConfig.num_speculative_tokens=0: must be > 0"),
    ('{"model_dir": "/m", "num_speculative_tokens": 4}', "WorkerConfig.num_speculative_tokens=4: must be > 0 with"),
    ('{"model_dir": "/m", "speculative_method": "ngram", "num_speculative_tokens": 17}', "must be in 0..16"),
    ('{"model_dir": "/m", "speculative_method": "draft", "num_speculative_tokens": 2}',
     "WorkerConfig.speculative_model='': needed by speculative_method 'draft'"),
    ('{"model_dir": "/m", "speculative_method": "draft", "num_speculative_tokens": 2, "speculative_model": "/d", '
     '"tensor_parallel": 2}', "a draft model runs at tensor and pipeline parallel degree 1 only"),
])
def test_bad_fields_are_named(text, needle):
    with pytest.raises(ConfigError) as err:
        WorkerConfig.from_json(text)
    assert needle in str(err.value)


def test_every_default_has_one_home():
    wc = WorkerConfig(model_dir=Path("/m"))
    engine, spec, sched = EngineConfig(model_dir=Path("/m")), ReplicaSpec(model_dir=Path("/m")), SchedulerConfig()
    for f in dataclasses.fields(WorkerConfig):
        assert getattr(engine, f.name) == getattr(spec, f.name) == getattr(wc, f.name), f.name
    assert (sched.max_batch_size, sched.max_batch_tokens) == (wc.max_batch_size, wc.max_batch_tokens)


def test_a_rank_gets_its_placement_in_one_argument(tmp_path):
    spec = ReplicaSpec(model_dir=tmp_path, tensor_parallel=2, max_restarts=1)
    argv = spec.worker_args("/sock", RankPlacement(rank=1, tp_rank=1, pp_rank=0, device="cpu", threads=2, cpus=(2, 3)),
                            master_port=1234, report_path="/r.json", native_kernels=False)
    assert argv[2:5] == ["worker", "shardserve-rank1", "--config"] and len(argv) == 6
    cfg = WorkerConfig.from_json(argv[5])
    assert (cfg.rank, cfg.threads, cfg.cpus, cfg.master_port, cfg.native_kernels) == (1, 2, (2, 3), 1234, False)
    assert "max_restarts" not in argv[5]  # the supervisor's settings stay in the controller


def test_reports_round_trip(tmp_path):
    WorkerReport(rank=1, failure="native-warmup", message="boom").write(tmp_path / "r.json")
    assert WorkerReport.read(tmp_path / "r.json") == WorkerReport(1, "native-warmup", "boom")
    assert WorkerReport.read(tmp_path / "absent.json") is None


def test_a_remote_leader_gets_its_tcp_address_and_the_rendezvous_host(tmp_path):
    spec = ReplicaSpec(model_dir=tmp_path, tensor_parallel=2)
    cfg = dataclasses.replace(spec.rank_config(RankPlacement(0, 0, 0, "cpu", 1), "", 1234),
                              master_addr="10.1.2.3", address="10.1.2.3:5000")
    back = WorkerConfig.from_json(cfg.to_json())
    assert (back.master_addr, back.address, back.socket) == ("10.1.2.3", "10.1.2.3:5000", "")
    with pytest.raises(ConfigError, match="WorkerConfig.address='nowhere': expected host:port"):
        dataclasses.replace(cfg, address="nowhere")
    assert WorkerReport.parse('{"rank": 1, "failure": "collective", "message": "m"}') == WorkerReport(1, "collective", "m")
    assert WorkerReport.parse("") is None
