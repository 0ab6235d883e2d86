"""Unit tests of the allocation pieces that need no engine: ports, labels, GPU states and quarantines."""

from __future__ import annotations

import socket

from utopia_agent.allocation.allocator import port_is_free
from utopia_agent.gpus.health import _quarantine_in, views_of
from utopia_agent.gpus.sampler import GpuSample
from utopia_agent.gpus.inventory import GpuStatus
from utopia_agent.claims.holders import claims_on, gpu_claims, gpu_holder, gpus_held_twice, port_holders
from utopia_agent.claims.records import Holdings


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


def test_holders_come_from_labels_and_double_claims_are_reported():
    holdings = [
        Holdings.from_labels({"utopia.claim_id": "a", "utopia.gpu_ids": "0,1", "utopia.gpu_uuids": "GPU-0,GPU-1", "utopia.ports": "31001:80/tcp"}, "a" * 64),
        Holdings.from_labels({"utopia.claim_id": "b", "utopia.gpu_ids": "1", "utopia.gpu_uuids": "GPU-1"}, "b" * 64),
        Holdings.from_labels({"utopia.claim_id": "c", "utopia.gpu_ids": "5"}, "c" * 64),
    ]
    assert gpus_held_twice(holdings) == {"GPU-1": ("a" * 64, "b" * 64)}
    assert port_holders(holdings) == {(31001, "tcp"): "a" * 64}
    claims = gpu_claims(holdings)
    assert gpu_holder(_gpu(0, "GPU-0"), claims) == "a"
    assert gpu_holder(_gpu(5, "GPU-5"), claims) == "c", "a label without UUIDs holds by index"
    assert gpu_holder(_gpu(2, "GPU-2"), claims) is None
    assert claims_on(_gpu(1, "GPU-1"), holdings) == ["a", "b"], "every claim on a GPU held twice"
    assert claims_on(_gpu(5, "GPU-5"), holdings) == ["c"]


def test_a_gpu_has_one_state_and_only_free_ones_are_given():
    gpus = tuple(_gpu(i, f"GPU-{i}") for i in range(5))
    gpus = (*gpus[:4], GpuStatus(4, None, "GPU", 100, None, None, None, False, False))
    sample = GpuSample(gpus, {}, dirty={"GPU-2": "compute processes are running", "GPU-3": "512 MiB of memory still in use"})
    records = {"quarantined": {"GPU-1": {"reason": "Xid 79"}, "GPU-3": {"reason": "fan"}}, "xid_events": {"GPU-1": [{"time": 1, "code": 79}]}}
    views = views_of(sample, [], {"GPU-0": "claim-a", "GPU-1": "claim-b"}, records)
    assert [(v.state, v.claim_id, v.reason) for v in views] == [
        ("allocated", "claim-a", None),
        ("quarantined", "claim-b", "Xid 79"),
        ("releasing", None, "compute processes are running"),
        ("quarantined", None, "fan"),
        ("lost", None, "NVML cannot read the GPU's UUID"),
    ]
    assert views[1].xid_events == [{"time": 1, "code": 79}]


def test_a_quarantine_that_lifts_itself_gives_way_to_one_for_the_operator():
    records: dict = {}
    assert _quarantine_in(records, "GPU-0", "stray processes", "release", automatic_release=True)
    assert not _quarantine_in(records, "GPU-0", "stray processes again", "release", automatic_release=True)
    assert _quarantine_in(records, "GPU-0", "Xid 79", "xid")
    assert not _quarantine_in(records, "GPU-0", "stray processes", "release", automatic_release=True)
    assert not _quarantine_in(records, "GPU-0", "double-bit ECC error", "double_bit_ecc"), "the first fault is kept"
    assert records["quarantined"]["GPU-0"]["reason"] == "Xid 79" and not records["quarantined"]["GPU-0"]["automatic_release"]
    assert _quarantine_in(records, "GPU-0", "by hand", "operator", replace=True)
    assert records["quarantined"]["GPU-0"]["reason"] == "by hand"


def test_rows_asked_about_several_labels_are_parsed_once(monkeypatch):
    """A create asks one list of rows about up to seven labels: each row is parsed once for all of them."""
    from utopia_agent.claims.holders import carrying

    rows = [{"Id": f"c{i}", "Names": [f"/utopia-t{i}"], "State": "running",
             "Labels": {"utopia.managed": "true", "utopia.claim_id": f"t{i}", "utopia.cpus": "1", **({"utopia.gpu_ids": "0"} if i == 0 else {})}}
            for i in range(3)]
    parses: list[str] = []
    real = Holdings.of_row
    monkeypatch.setattr(Holdings, "of_row", classmethod(lambda cls, row: parses.append(row["Id"]) or real(row)))
    parsed: dict = {}
    assert [h.container_id for h in carrying(rows, "utopia.cpus", parsed)] == ["c0", "c1", "c2"]
    assert [h.claim_id for h in carrying(rows, "utopia.gpu_ids", parsed)] == ["t0"]
    assert [h.container_id for h in carrying(rows, "utopia.claim_id=t1", parsed)] == ["c1"]
    assert sorted(parses) == ["c0", "c1", "c2"]
    carrying(rows, "utopia.managed")
    assert len(parses) == 6, "without a shared `parsed`, every question parses its rows"
