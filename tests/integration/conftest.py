import pytest

from tests.integration.server import CHAT_TEMPLATE, ServerProcess


@pytest.fixture(scope="package")
def chat_server(demo_cache, tmp_path_factory):
    """One demo-model server (batch 16, CHAT_TEMPLATE) for the modules that only send it requests
    (test_serve.py, test_openai.py, test_structured.py): one start instead of three. A test that kills,
    drains, stops or loads a model on a server starts its own."""
    tpl = tmp_path_factory.mktemp("chat") / "chat.jinja"
    tpl.write_text(CHAT_TEMPLATE)
    with ServerProcess(
        "--max-batch-size", "16", "--chat-template", str(tpl), cache_dir=demo_cache, timeout=300
    ) as s:
        s.cache = demo_cache
        yield s
