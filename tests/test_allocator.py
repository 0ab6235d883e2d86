"""Unit tests of the allocation pieces that need no engine."""

from __future__ import annotations

import socket

from utopia_agent.allocator import NodeAllocations, port_is_free
from utopia_agent.gpus import GpuStatus, gpu_key_held


def _gpu(index: int, uuid: str) -> GpuStatus:
    return GpuStatus(index, uuid, "GPU", 100, 0, 30, 0.0, False, True)


def test_a_listening_port_is_taken_and_a_closed_one_free():
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as docker-proxy (Go) listens
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_is_free(port, "tcp")
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the side that closes first keeps the port in TIME_WAIT
        client.close()
    assert port_is_free(port, "tcp"), "a connection in TIME_WAIT does not keep a new listener off the port"


def test_udp_ports_are_probed_as_udp():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("0.0.0.0", 0))
        port = holder.getsockname()[1]
        assert not port_is_free(port, "udp")
        assert port_is_free(port, "tcp")


def test_allocations_come_from_labels_and_double_claims_are_reported():
    allocations = NodeAllocations.from_labels([
        ("a" * 64, {"utopia.claim_id": "a", "utopia.gpu_ids": "0,1", "utopia.gpu_uuids": "GPU-0,GPU-1", "utopia.ports": "31001:80/tcp"}),
        ("b" * 64, {"utopia.claim_id": "b", "utopia.gpu_ids": "1", "utopia.gpu_uuids": "GPU-1"}),
        ("c" * 64, {"utopia.claim_id": "c", "utopia.gpu_ids": "5"}),
    ])
    assert allocations.double_allocations() == {"GPU-1": ("a" * 64, "b" * 64)}
    assert allocations.port_holders == {(31001, "tcp"): "a" * 64}
    assert gpu_key_held(_gpu(0, "GPU-0"), allocations.gpu_holders)
    assert gpu_key_held(_gpu(5, "GPU-5"), allocations.gpu_holders), "a label without UUIDs holds by index"
    assert not gpu_key_held(_gpu(2, "GPU-2"), allocations.gpu_holders)
