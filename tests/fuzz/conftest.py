import pytest

from tests.fuzz.serving import TOKEN, Bystander, worker_state
from tests.integration.server import ServerProcess


@pytest.fixture(scope="package")
def server(demo_cache, tmp_path_factory):
    """One demo-model server for every fuzz module (gRPC and HTTP), with a bystander client."""
    cache = demo_cache
    # the limits come in through all three doors: serving.properties, the environment, flags
    props = tmp_path_factory.mktemp("fuzz") / "serving.properties"
    props.write_text("option.max_bad_words=32\noption.max_prompts=1000\n")
    with ServerProcess("--admin-token", TOKEN, "--properties", str(props), "--max-prompts", "64",
                       "--max-prompt-bytes", "65536", "--max-message-bytes", str(4 << 20), cache_dir=cache,
                       env={"SERVING_MAX_STOP_STRINGS": "16"}) as s:
        s.before = worker_state(s)
        s.bystander = Bystander(s)
        yield s
        s.bystander.stop()
