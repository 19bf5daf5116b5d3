"""A controller whose process cannot import torch serves through a real worker: the control plane
resolves the (demo) model, checks the layout, launches, tokenizes and detokenizes without torch."""

import pytest

from shardserve.v1 import generate_pb2 as gpb
from shardserve.v1 import generate_pb2_grpc as gpb_grpc
from tests.integration.server import ServerProcess

# torch made unimportable in the controller process only; its workers are other processes
NO_TORCH = ("-c", "import sys; sys.modules['torch'] = None; sys.argv[0] = 'shardserve'; "
                  "from controller.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(cache_dir=tmp_path_factory.mktemp("cache"), launcher=NO_TORCH) as s:
        yield s


def test_a_controller_without_torch_serves_generate_through_a_worker(server):
    stub = gpb_grpc.GenerationStub(server.channel)
    out = stub.Generate(gpb.GenerateRequest(prompts=["Licensed under the"],
                                            parameters=gpb.GenerationParameters(max_new_tokens=8)), timeout=120)
    assert len(out.outputs) == 1 and 0 < len(out.outputs[0].token_ids) <= 8
