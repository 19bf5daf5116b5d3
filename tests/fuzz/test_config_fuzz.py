"""serving.properties files, OPTION_*/SERVING_* variables and parameter dicts through their parsers
(no server): every input is accepted or refused with PropertiesError / RequestError, nothing else."""

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.api.limits import RequestLimits, check_parameters
from controller.api.params import RequestError, parameters_from_dict
from controller.config.properties import KEYS, PropertiesError, load_properties

EXAMPLES = int(os.environ.get("SHARDSERVE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("SHARDSERVE_FUZZ_RANDOM"))

file_keys = st.one_of(st.sampled_from([k.file_key for k in KEYS]), st.text(max_size=20))
env_keys = st.one_of(st.sampled_from([k.env for k in KEYS] + [a for k in KEYS for a in k.aliases]),
                     st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=20).map(
                         lambda s: "OPTION_" + s))
values = st.one_of(st.text(max_size=30), st.sampled_from(
    ["", "0", "-1", "max", "true", "false", "1e9", "nan", "inf", "18446744073709551616", "s3://", "fp16", " "]))
lines = st.one_of(st.tuples(file_keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"), st.text(max_size=40),
                  st.sampled_from(["#", "=", "==", "a=b=c", "\x00", "\ufeff" + "engine=Python"]))


@FUZZ
@given(body=st.lists(lines, max_size=8))
def test_fuzz_properties_file(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("props") / "serving.properties"
    path.write_text("\n".join(body), encoding="utf-8", errors="surrogatepass")
    try:
        load_properties(path, {})
    except PropertiesError:
        pass


@FUZZ
@given(env=st.dictionaries(env_keys, values.filter(lambda v: "\x00" not in v), max_size=5))
def test_fuzz_environment(env):
    try:
        load_properties(None, env)
    except PropertiesError:
        pass


param_values = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(),
                         st.text(max_size=10), st.lists(st.one_of(st.integers(-5, 1 << 40), st.text(max_size=5),
                                                                  st.lists(st.integers(-5, 1 << 40), max_size=3)),
                                                        max_size=5), st.dictionaries(st.text(max_size=3), st.none()))
param_names = st.one_of(st.sampled_from(["max_new_tokens", "max_seq_len", "temperature", "top_k", "top_p",
                                         "do_sample", "seed", "stop", "bad_words", "num_beams", "ignore_eos",
                                         "stop_words_list", "bad_words_list", "min_length", "json_schema", "regex",
                                         "choice", "grammar", "json_object", "guided_json", "guided_choice"]),
                        st.text(max_size=8))


@FUZZ
@given(params=st.dictionaries(param_names, param_values, max_size=6))
def test_fuzz_parameter_dicts(params):
    try:
        check_parameters(parameters_from_dict(params), RequestLimits())
    except RequestError:
        pass
