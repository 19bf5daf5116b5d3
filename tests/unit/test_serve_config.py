"""`shardserve serve` settings: flags > environment > serving.properties > defaults, strict keys, TLS and
admin-token checks, SageMaker's model folder. Pure functions; no server is started."""

import dataclasses
import logging
from pathlib import Path

import pytest

from controller import server
from controller.cli import build_parser, main
from controller.config import settings as cfg
from controller.config.properties import PropertiesError
from controller.fleet.placement import RankPlacement
from controller.fleet.replica import ReplicaSpec


@pytest.fixture
def env(tmp_path):
    """An environment with no LMI variables and a SageMaker model folder that does not exist."""
    return {"PATH": "/usr/bin", cfg.SAGEMAKER_MODEL_DIR_ENV: str(tmp_path / "no-such-opt-ml-model")}


def settings(argv, env):
    return cfg.settings_from_args(build_parser().parse_args(["serve", *argv]), env)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_serve_the_demo_model_with_our_batch_limits(env):
    s = settings([], env)
    assert s.source is None and s.name == "demo" and s.replicas == 1
    assert s.layout.tensor_parallel == 1 and s.layout.resolved_dtype == "fp32" and s.layout.device == "cpu"
    assert s.spec.max_batch_size == cfg.DEFAULT_MAX_BATCH_SIZE
    assert s.server.max_queued_requests == cfg.DEFAULT_MAX_QUEUED_REQUESTS
    assert s.server.admin_token is None and s.server.tls_cert is None


def test_properties_file_then_environment_then_flags(tmp_path, env, caplog):
    props = write(tmp_path / "serving.properties", "\n".join([
        "engine=FasterTransformer", "option.entryPoint=djl_python.fastertransformer",
        f"option.model_id={tmp_path}", "option.dtype=fp16", "option.max_rolling_batch_size=4",
        "job_queue_size=9", "option.tensor_parallel_degree=1"]))
    with caplog.at_level(logging.INFO):
        s = settings(["--properties", str(props)], env)
    assert "engine=FasterTransformer accepted" in caplog.text
    assert (s.source, s.layout.dtype, s.spec.max_batch_size, s.server.max_queued_requests) == (str(tmp_path), "fp16", 4, 9)
    assert s.name == tmp_path.name
    env = {**env, "OPTION_DTYPE": "bf16", "MAX_BATCH_SIZE": "6"}
    s = settings(["--properties", str(props)], env)
    assert (s.layout.dtype, s.spec.max_batch_size) == ("bf16", 6)  # environment over the file
    s = settings(["--properties", str(props), "--dtype", "fp32", "--max-batch-size", "2"], env)
    assert (s.layout.dtype, s.spec.max_batch_size) == ("fp32", 2)  # flags over both
    assert s.properties.sources["dtype"] == "flag dtype"


def test_hf_model_id_from_the_environment_and_model_flag_over_it(tmp_path, env):
    s = settings([], {**env, "HF_MODEL_ID": str(tmp_path)})
    assert s.source == str(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    assert settings(["--model", str(other), "--name", "x"], {**env, "HF_MODEL_ID": str(tmp_path)}).source == str(other)


def test_unknown_key_refuses_to_start_and_names_the_key(tmp_path, env, capsys, monkeypatch):
    props = write(tmp_path / "serving.properties", "engine=MPI\noption.tensor_paralel_degree=2\n")
    with pytest.raises(PropertiesError, match="option.tensor_paralel_degree"):
        settings(["--properties", str(props)], env)
    with pytest.raises(PropertiesError, match="OPTION_NOPE"):
        settings([], {**env, "OPTION_NOPE": "1"})
    monkeypatch.setenv(cfg.SAGEMAKER_MODEL_DIR_ENV, env[cfg.SAGEMAKER_MODEL_DIR_ENV])
    assert main(["serve", "--properties", str(props), "--port", "1", "--http-port", "1"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "option.tensor_paralel_degree" in err and "did you mean" in err


def test_layouts_the_workers_cannot_run_are_refused_at_startup(env):
    fields = {f.name for f in dataclasses.fields(ReplicaSpec)}
    if "tensor_parallel" in fields:
        assert settings([], {**env, "TENSOR_PARALLEL_DEGREE": "2"}).layout.tensor_parallel == 2
    else:
        with pytest.raises(cfg.ConfigError, match="tensor_parallel=2"):
            settings([], {**env, "TENSOR_PARALLEL_DEGREE": "2"})


def test_admin_token_flag_over_environment_and_never_in_repr(env):
    assert settings([], {**env, "SHARDSERVE_ADMIN_TOKEN": "from-env"}).server.admin_token == "from-env"
    s = settings(["--admin-token", "from-flag"], {**env, "SHARDSERVE_ADMIN_TOKEN": "from-env"})
    assert s.server.admin_token == "from-flag" and "from-flag" not in repr(s)
    assert settings([], {**env, "SHARDSERVE_ADMIN_TOKEN": ""}).server.admin_token is None


def test_tls_needs_both_files_and_they_must_exist(tmp_path, env):
    cert = write(tmp_path / "c.pem", "x")
    with pytest.raises(cfg.ConfigError, match="go together"):
        settings(["--tls-cert", str(cert)], env)
    with pytest.raises(cfg.ConfigError, match="--tls-key"):
        settings(["--tls-cert", str(cert), "--tls-key", str(tmp_path / "missing.pem")], env)
    s = settings(["--tls-cert", str(cert), "--tls-key", str(cert)], env)
    assert s.server.tls_cert == cert


def test_sagemaker_model_folder_is_the_default_model_and_its_properties_are_read(tmp_path, env):
    sm = tmp_path / "opt-ml-model"
    sm.mkdir()
    write(sm / "config.json", "{}")
    write(sm / "serving.properties", "engine=Python\noption.max_rolling_batch_size=3\n")
    env = {**env, cfg.SAGEMAKER_MODEL_DIR_ENV: str(sm)}
    s = settings([], env)
    assert s.source is None and s.name == "model" and s.spec.max_batch_size == 3
    res = server.resolve_model(None, tmp_path / "cache", env)
    assert res.path == sm.absolute() and res.kind == "sagemaker"


def test_resolve_model_refuses_what_is_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        server.resolve_model(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(ValueError, match="config.json is missing"):
        server.resolve_model(str(tmp_path), tmp_path)


def test_prefix_caching_is_on_by_default_and_off_by_flag_or_property(tmp_path, env):
    assert settings([], env).spec.prefix_caching is True
    assert settings(["--no-prefix-caching"], env).spec.prefix_caching is False
    props = write(tmp_path / "serving.properties", "option.enable_prefix_caching=false\n")
    s = settings(["--properties", str(props)], env)
    assert s.spec.prefix_caching is False and s.properties.sources["enable_prefix_caching"].endswith(
        "option.enable_prefix_caching")
    assert ReplicaSpec.from_json(s.spec.to_json()).prefix_caching is False  # carried to the worker as is


def test_executor_is_local_by_default_and_ray_by_flag_property_or_environment(tmp_path, env):
    s = settings([], env)
    assert (s.spec.executor, s.spec.placement_strategy, s.spec.ray_address) == ("local", "pack", "")
    s = settings(["--executor", "ray", "--ray-address", "10.0.0.1:6379", "--placement-strategy", "strict-spread"], env)
    assert (s.spec.executor, s.spec.placement_strategy, s.spec.ray_address) == ("ray", "strict-spread", "10.0.0.1:6379")
    props = write(tmp_path / "serving.properties", "option.executor=ray\noption.placement_strategy=spread\n")
    s = settings(["--properties", str(props)], env)
    assert (s.spec.executor, s.spec.placement_strategy) == ("ray", "spread")
    assert settings(["--properties", str(props), "--executor", "local"], env).spec.executor == "local"
    assert settings([], {**env, "OPTION_EXECUTOR": "ray"}).spec.executor == "ray"
    with pytest.raises(PropertiesError, match="option.executor='mpi' is not valid; expected one of local, ray"):
        settings(["--properties", str(write(tmp_path / "bad.properties", "option.executor=mpi\n"))], env)
    # the supervisor's settings stay in the controller: a rank's JSON has neither
    assert "executor" not in s.spec.rank_config(RankPlacement(0, 0, 0, "cpu", 1), "/s").to_json()


def test_request_limits_from_flags_environment_and_serving_properties(tmp_path, env):
    from controller.api.limits import RequestLimits

    assert settings([], env).server.limits == RequestLimits()
    props = write(tmp_path / "serving.properties", "option.max_prompts=12\noption.max_stop_strings=3\n")
    s = settings(["--properties", str(props)], {**env, "SERVING_MAX_STOP_STRINGS": "4"})
    assert (s.server.limits.max_prompts, s.server.limits.max_stop_strings) == (12, 4)
    s = settings(["--properties", str(props), "--max-prompts", "5", "--max-message-bytes", "65536"], env)
    assert (s.server.limits.max_prompts, s.server.limits.max_message_bytes) == (5, 65536)
    with pytest.raises(PropertiesError, match="max_prompts='0'"):
        settings(["--max-prompts", "0"], env)


def test_speculative_decoding_from_flags_or_properties(tmp_path, env):
    assert settings([], env).spec.speculative_method == "" and settings([], env).spec.num_speculative_tokens == 0
    s = settings(["--speculative-method", "ngram"], env)
    assert (s.spec.speculative_method, s.spec.num_speculative_tokens) == ("ngram", cfg.DEFAULT_SPECULATIVE_TOKENS)
    draft = tmp_path / "draft"
    draft.mkdir()
    with pytest.raises(cfg.ConfigError, match="not a model folder"):
        settings(["--speculative-model", str(draft)], env)
    (draft / "config.json").write_text("{}")
    s = settings(["--speculative-model", str(draft), "--num-speculative-tokens", "3"], env)  # implies draft
    assert (s.spec.speculative_method, s.spec.speculative_model, s.spec.num_speculative_tokens) == (
        "draft", str(draft.resolve()), 3)
    assert ReplicaSpec.from_json(s.spec.to_json()).speculative_model == str(draft.resolve())
    props = write(tmp_path / "serving.properties", "option.speculative_method=ngram\noption.num_speculative_tokens=6\n")
    s = settings(["--properties", str(props)], env)
    assert (s.spec.speculative_method, s.spec.num_speculative_tokens) == ("ngram", 6)
    with pytest.raises(cfg.ConfigError, match="needs --speculative-model"):
        settings(["--speculative-method", "draft"], env)
    with pytest.raises(cfg.ConfigError, match="tensor and pipeline parallel degree 1"):
        settings(["--speculative-model", str(draft), "--tp", "2"], env)


def test_the_ray_leader_hop_takes_the_public_tls_files_by_default_and_checks_its_own(tmp_path, env):
    from tests.integration.tls import make_cert

    cert, key = make_cert(tmp_path, name="leader.internal")
    ray = ["--executor", "ray"]
    s = settings([*ray, "--tls-cert", str(cert), "--tls-key", str(key)], env)
    assert (s.spec.tls_cert, s.spec.tls_key, s.spec.worker_tls_ca) == (str(cert), str(key), str(cert))
    assert s.spec.worker_tls_name == "leader.internal"  # the certificate's DNS name: the controller dials IPs
    assert "tls_cert" in s.spec.rank_config(RankPlacement(0, 0, 0, "cpu", 1), "").to_json()
    assert settings(["--tls-cert", str(cert), "--tls-key", str(key)], env).spec.tls_cert == ""  # local: a socket
    assert settings(ray, env).spec.tls_cert == ""

    own = [*ray, "--worker-tls-cert", "/on/every/node/c.pem", "--worker-tls-key", "/on/every/node/k.pem"]
    s = settings([*own, "--worker-tls-ca", str(cert), "--worker-tls-name", "n1"], env)
    assert (s.spec.tls_cert, s.spec.worker_tls_ca, s.spec.worker_tls_name) == ("/on/every/node/c.pem", str(cert), "n1")
    for argv, needle in (([*ray, "--worker-tls-cert", str(cert)], "go together"),
                         (own, "not on this host.*--worker-tls-ca"),
                         ([*own, "--worker-tls-ca", str(tmp_path / "no.pem")], r"--worker-tls-ca .*no such file"),
                         ([*own, "--worker-tls-ca", str(cert)], "--worker-tls-name"),
                         ([*ray, "--worker-tls-ca", str(cert)], "need --worker-tls-cert")):
        with pytest.raises(cfg.ConfigError, match=needle):
            settings(argv, env)


def test_a_worker_names_a_tls_file_it_cannot_read_on_its_node(tmp_path):
    from tests.integration.tls import make_cert
    from worker.auth import server_credentials
    from worker.config import ConfigError, WorkerConfig

    cert, key = make_cert(tmp_path)
    assert server_credentials("", "") is None
    assert server_credentials(str(cert), str(key)) is not None
    with pytest.raises(ValueError, match=r"tls_key /nowhere/k.pem: cannot read it on this node .*No such file"):
        server_credentials(str(cert), "/nowhere/k.pem")
    with pytest.raises(ValueError, match="tls_cert .*: not a PEM file"):
        server_credentials(str(write(tmp_path / "x.pem", "x")), str(key))
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        WorkerConfig(model_dir=tmp_path, tls_cert=str(cert))


def test_only_the_ray_executor_takes_rank_files_one_per_rank(tmp_path):
    from worker.config import ConfigError

    ok = ReplicaSpec(model_dir=tmp_path, executor="ray", tensor_parallel=2, rank_files=("{}", "{}"))
    assert ok.rank_files and "rank_files" not in ok.rank_config(RankPlacement(0, 0, 0, "cpu", 1), "").to_json()
    for kw in ({"executor": "local", "tensor_parallel": 2, "rank_files": ("{}", "{}")},
               {"executor": "ray", "tensor_parallel": 2, "rank_files": ("{}",)}):
        with pytest.raises(ConfigError, match="rank_files"):
            ReplicaSpec(model_dir=tmp_path, **kw)
