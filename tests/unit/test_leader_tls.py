"""A leader that serves TLS with a certificate the controller does not trust (another CA, another name)
fails the replica's start at once, naming the flags, instead of retrying until the start timeout."""

from concurrent import futures
from pathlib import Path

import grpc
import pytest

from controller.fleet.executor import RankGroup, WorkerStartError
from controller.fleet.replica import Replica, ReplicaSpec
from tests.integration.tls import make_cert
from worker.auth import server_credentials


class Running:  # a rank that stays up
    pid, node = 1, "test"

    def poll(self):
        return None

    def lines(self):
        return iter(())

    def report(self):
        return None


class Fixed:
    name = "ray"

    def __init__(self, group):
        self.group = group

    def launch(self, replica, token, native_kernels):
        return self.group


@pytest.mark.parametrize("trust", ["other-ca", "other-name"])
def test_a_leader_certificate_the_controller_does_not_trust_fails_the_start_at_once(tmp_path, trust):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert, key = make_cert(tmp_path / "a", name="leader", ips=())
    other, _ = make_cert(tmp_path / "b", name="leader", ips=())
    server = grpc.server(futures.ThreadPoolExecutor(2))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(str(cert), str(key)))
    server.start()
    try:
        ca = other if trust == "other-ca" else cert
        name = "leader" if trust == "other-ca" else "someone-else"
        group = RankGroup(ranks=[Running()], target=f"127.0.0.1:{port}",
                          credentials=grpc.ssl_channel_credentials(Path(ca).read_bytes()),
                          channel_options=[("grpc.ssl_target_name_override", name)])
        replica = Replica("r", ReplicaSpec(model_dir=tmp_path, start_timeout_s=60), tmp_path)
        replica.executor = Fixed(group)
        with pytest.raises(WorkerStartError, match="certificate fails the controller's check"):
            replica._launch()
    finally:
        server.stop(0)
