"""controller.config.properties: serving.properties + environment + flags -> one validated spec."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import pytest

from controller.config.properties import (
    PropertiesError,
    ServingProperties,
    cli_overrides,
    load_properties,
    read_properties_file,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "serving.properties"
    p.write_text(text)
    return p


def test_defaults_with_nothing_set():
    p = load_properties(None, {})
    assert p == ServingProperties()
    assert p.tensor_parallel_degree == 1 and p.pipeline_parallel_degree == 1
    assert p.job_queue_size == 1000 and p.max_rolling_batch_size == 256
    assert p.trust_remote_code is False and p.model_source is None
    assert p.sources["dtype"] == "default"


def test_reference_fastertransformer_file_is_accepted(tmp_path, caplog):
    path = write(
        tmp_path,
        "engine=FasterTransformer\n"
        "option.entryPoint=djl_python.fastertransformer\n"
        "option.s3url=s3://my-bucket/flan-t5-xxl/\n"
        "option.tensor_parallel_degree=4\n",
    )
    with caplog.at_level(logging.INFO, logger="controller.config.properties"):
        p = load_properties(path, {})
    assert p.engine == "FasterTransformer"
    assert p.s3url == "s3://my-bucket/flan-t5-xxl/" and p.model_source == p.s3url
    assert p.tensor_parallel_degree == 4
    assert p.entry_point == "djl_python.fastertransformer"
    assert "shardserve runs its own engine" in caplog.text
    assert "entryPoint" in caplog.text and "ignored" in caplog.text
    assert p.sources["tensor_parallel_degree"] == f"{path}:4 option.tensor_parallel_degree"


def test_every_key_typed_and_normalised(tmp_path):
    path = write(
        tmp_path,
        "# comment\n! also a comment\n\n"
        "engine = mpi\n"
        "option.model_id: /opt/ml/model\n"
        "option.tensor_parallel_degree=max\n"
        "option.pipeline_parallel_degree=2\n"
        "option.dtype=bfloat16\n"
        "option.quantize=INT8\n"
        "option.rolling_batch=lmi-dist\n"
        "option.max_rolling_batch_size=32\n"
        "option.max_input_len=1024\n"
        "option.max_output_len=\\\n  512\n"
        "option.trust_remote_code=false\n"
        "job_queue_size=50\n"
        "batch_size=4\n"
        "max_batch_delay=0\n",
    )
    p = load_properties(path, {})
    assert p.engine == "MPI"
    assert p.model_id == "/opt/ml/model"
    assert p.tensor_parallel_degree == "max" and p.resolved_tensor_parallel_degree(8) == 8
    assert p.pipeline_parallel_degree == 2
    assert p.dtype == "bf16" and p.quantize == "int8" and p.rolling_batch is True
    assert (p.max_rolling_batch_size, p.max_input_len, p.max_output_len) == (32, 1024, 512)
    assert (p.job_queue_size, p.batch_size, p.max_batch_delay) == (50, 4, 0)
    assert dataclasses.is_dataclass(p)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.dtype = "fp32"  # type: ignore[misc]


@pytest.mark.parametrize(("alias", "canonical"), [("float32", "fp32"), ("fp16", "fp16"), ("float16", "fp16"),
                                                  ("BF16", "bf16"), ("auto", None)])  # fmt: skip
def test_dtype_aliases(alias, canonical):
    assert load_properties(None, {"OPTION_DTYPE": alias}).dtype == canonical


def test_directory_path_reads_its_serving_properties(tmp_path):
    write(tmp_path, "option.dtype=fp16\n")
    assert load_properties(tmp_path, {}).dtype == "fp16"


def test_precedence_cli_over_env_over_file_over_default(tmp_path):
    path = write(tmp_path, "option.tensor_parallel_degree=2\noption.dtype=fp32\njob_queue_size=10\n")
    env = {"OPTION_TENSOR_PARALLEL_DEGREE": "4", "OPTION_DTYPE": "fp16"}
    p = load_properties(path, env, {"tensor_parallel_degree": 8, "dtype": None})
    assert (
        p.tensor_parallel_degree == 8 and p.sources["tensor_parallel_degree"] == "flag tensor_parallel_degree"
    )
    assert p.dtype == "fp16" and p.sources["dtype"] == "env OPTION_DTYPE"
    assert p.job_queue_size == 10 and p.sources["job_queue_size"].endswith("job_queue_size")
    assert p.batch_size == 1 and p.sources["batch_size"] == "default"
    assert any(line.startswith("tensor_parallel_degree=8 (flag") for line in p.describe())


def test_lmi_environment_names(tmp_path):
    env = {
        "HF_MODEL_ID": "s3://bucket/llama/",
        "TENSOR_PARALLEL_DEGREE": "2",
        "PIPELINE_PARALLEL_DEGREE": "2",
        "HF_MODEL_QUANTIZE": "int4",
        "MAX_BATCH_SIZE": "16",
        "MAX_CONCURRENT_REQUESTS": "64",
        "SERVING_BATCH_SIZE": "2",
        "SERVING_MAX_BATCH_DELAY": "5",
        "OPTION_ROLLING_BATCH": "auto",
        "OPTION_ENGINE": "Python",
        "HF_MODEL_TRUST_REMOTE_CODE": "false",
        # unrelated variables are ignored, including Kubernetes service links
        "PATH": "/usr/bin",
        "SERVING_SERVICE_HOST": "10.0.0.1",
        "SERVING_PORT_8080_TCP_ADDR": "10.0.0.1",
        "OPTION_PORT": "tcp://10.0.0.2:80",
    }
    p = load_properties(None, env)
    assert p.model_id == "s3://bucket/llama/"
    assert (p.tensor_parallel_degree, p.pipeline_parallel_degree) == (2, 2)
    assert p.quantize == "int4" and p.max_rolling_batch_size == 16 and p.job_queue_size == 64
    assert (p.batch_size, p.max_batch_delay, p.engine) == (2, 5, "Python")
    assert load_properties(None, {"SM_NUM_GPUS": "4"}).tensor_parallel_degree == 4


def test_two_env_names_for_one_key_must_agree():
    same = load_properties(None, {"HF_MODEL_ID": "a/b", "OPTION_MODEL_ID": "a/b"})
    assert same.model_id == "a/b"
    with pytest.raises(PropertiesError, match="HF_MODEL_ID.*OPTION_MODEL_ID.*set only one"):
        load_properties(None, {"HF_MODEL_ID": "a/b", "OPTION_MODEL_ID": "c/d"})


def test_model_location_higher_level_wins_same_level_conflict_is_an_error(tmp_path):
    path = write(tmp_path, "option.s3url=s3://bucket/old/\n")
    p = load_properties(path, {"HF_MODEL_ID": "s3://bucket/new/"})
    assert p.model_source == "s3://bucket/new/" and p.s3url is None
    both = write(tmp_path, "option.s3url=s3://bucket/a/\noption.model_id=s3://bucket/b/\n")
    with pytest.raises(PropertiesError, match="different models"):
        load_properties(both, {})


def test_unknown_file_key_names_key_file_line_and_close_matches(tmp_path):
    path = write(tmp_path, "option.dtype=fp16\noption.tensor_paralel_degree=2\n")
    with pytest.raises(PropertiesError) as e:
        load_properties(path, {})
    msg = str(e.value)
    assert f"{path}:2" in msg and "'option.tensor_paralel_degree'" in msg
    assert "did you mean option.tensor_parallel_degree" in msg


def test_unknown_env_key_names_variable_and_close_matches():
    with pytest.raises(PropertiesError) as e:
        load_properties(None, {"OPTION_MAX_ROLLING_BATCH": "8"})
    msg = str(e.value)
    assert "environment variable OPTION_MAX_ROLLING_BATCH" in msg
    assert "OPTION_MAX_ROLLING_BATCH_SIZE" in msg
    with pytest.raises(PropertiesError, match="SERVING_JOB_QUEUE"):
        load_properties(None, {"SERVING_JOB_QUEUE": "8"})


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        ("option.dtype", "int8", "fp32, float32, fp16, float16, bf16, bfloat16"),
        ("option.quantize", "awq", "int8, int4, none"),
        ("option.tensor_parallel_degree", "0", "positive integer or 'max'"),
        ("option.pipeline_parallel_degree", "two", "positive integer"),
        ("job_queue_size", "-1", "positive integer"),
        ("max_batch_delay", "-5", "integer >= 0"),
        ("option.rolling_batch", "maybe", "auto"),
        ("option.trust_remote_code", "perhaps", "true or false"),
        ("option.s3url", "/local/path", "s3://"),
        ("engine", "MXNet", "FasterTransformer"),
        ("option.model_id", "", "non-empty"),
    ],
)
def test_bad_values_name_key_and_accepted_values(tmp_path, key, value, accepted):
    path = write(tmp_path, f"{key}={value}\n")
    with pytest.raises(PropertiesError) as e:
        load_properties(path, {})
    msg = str(e.value)
    assert key in msg and accepted in msg and f"{path}:1" in msg


def test_trust_remote_code_true_is_refused_with_the_reason(tmp_path):
    for p, env in ((write(tmp_path, "option.trust_remote_code=true\n"), {}),
                   (None, {"HF_MODEL_TRUST_REMOTE_CODE": "True"})):  # fmt: skip
        with pytest.raises(PropertiesError, match="never runs code shipped with a model"):
            load_properties(p, env)


def test_duplicate_key_missing_file_and_garbage_line(tmp_path):
    with pytest.raises(PropertiesError, match="already set on line 1"):
        load_properties(write(tmp_path, "option.dtype=fp16\noption.dtype=fp32\n"), {})
    with pytest.raises(PropertiesError, match="no such properties file"):
        load_properties(tmp_path / "absent.properties", {})
    assert read_properties_file(write(tmp_path, "a=b=c\nflag\n")) == [("a", "b=c", 1), ("flag", "", 2)]


def test_cli_overrides_from_serve_args():
    args = argparse.Namespace(model="/models/x", tp=2, pp=None, dtype="float16", quantize=None,
                              max_batch_size=8, max_queued_requests=None, port=50051)  # fmt: skip
    over = cli_overrides(args)
    assert over == {"model_id": "/models/x", "tensor_parallel_degree": 2, "dtype": "float16",
                    "max_rolling_batch_size": 8}  # fmt: skip
    p = load_properties(None, {"OPTION_DTYPE": "fp32"}, over)
    assert p.dtype == "fp16" and p.max_rolling_batch_size == 8
    with pytest.raises(PropertiesError, match="command-line flag: dtype='int3'"):
        load_properties(None, {}, {"dtype": "int3"})
    with pytest.raises(PropertiesError, match="unknown key 'tp_degree'"):
        load_properties(None, {}, {"tp_degree": 2})


def test_shipped_example_file_loads():
    from controller.api.limits import RequestLimits

    p = load_properties(REPO / "deploy" / "serving.properties.example", {})
    assert p.model_source is not None
    assert p.limits == RequestLimits()  # the example shows every limit at its default


def test_every_request_limit_is_a_key_in_the_file_the_environment_and_the_flags(tmp_path):
    from controller.api.limits import RequestLimits
    from controller.config.properties import KEYS, LIMIT_FIELDS

    keys = {k.field: k for k in KEYS}
    for f in dataclasses.fields(RequestLimits):  # a new limit without a key fails here
        assert f.name in LIMIT_FIELDS and keys[f.name].file_key == f"option.{f.name}"
        assert keys[f.name].env == f"OPTION_{f.name.upper()}" and f"SERVING_{f.name.upper()}" in keys[f.name].aliases
    assert load_properties(None, {}).limits == RequestLimits()
    path = write(tmp_path, "option.max_prompts=8\noption.max_stop_strings=4\noption.max_prompt_bytes=100\n")
    env = {"OPTION_MAX_STOP_STRINGS": "5", "SERVING_MAX_BAD_WORDS": "6", "SERVING_MAX_PROMPT_BYTES": "200"}
    p = load_properties(path, env, {"max_prompt_bytes": 300})
    assert p.limits == RequestLimits(max_prompts=8, max_stop_strings=5, max_bad_words=6, max_prompt_bytes=300)
    assert p.sources["max_prompts"] == f"{path}:1 option.max_prompts"
    assert p.sources["max_stop_strings"] == "env OPTION_MAX_STOP_STRINGS"
    assert p.sources["max_bad_words"] == "env SERVING_MAX_BAD_WORDS"
    assert p.sources["max_prompt_bytes"] == "flag max_prompt_bytes"


@pytest.mark.parametrize(("where", "value", "accepted"), [
    ("option.max_prompts", "0", "positive integer"), ("OPTION_MAX_STOP_BYTES", "-3", "positive integer"),
    ("SERVING_MAX_BAD_WORDS", "many", "positive integer"),
    ("option.max_message_bytes", str(1 << 31), "2147483647"),
])  # fmt: skip
def test_a_bad_limit_names_the_key_and_what_is_accepted(tmp_path, where, value, accepted):
    args = (write(tmp_path, f"{where}={value}\n"), {}) if where.startswith("option.") else (None, {where: value})
    with pytest.raises(PropertiesError) as e:
        load_properties(*args)
    assert where in str(e.value) and accepted in str(e.value)
    with pytest.raises(PropertiesError, match="OPTION_MAX_PROMPTS and env SERVING_MAX_PROMPTS"):
        load_properties(None, {"OPTION_MAX_PROMPTS": "2", "SERVING_MAX_PROMPTS": "3"})
