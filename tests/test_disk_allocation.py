"""Claims' container disks allocated like GPUs: sizes, shares, refusals and the node's figures,
with the in-memory engine (the real engine's paths are in test_disks.py)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tests.support.memory_engine import MemoryEngine
from tests.test_api_fast import CONTAINERS, IMAGE, auth, create, make_app
from utopia_agent.claims.disks import DiskLedger, allocatable_gb, default_reserved_gb, disk_share, gb_of
from utopia_agent.claims.records import DISK_LABEL, DISK_QUOTA_LABEL
from utopia_agent.config import ConfigError, load_config
from utopia_agent.disks import quota
from utopia_agent.errors import NotEnoughResources

GIB = 1024 ** 3


def root_filesystem_gb() -> float:
    """The memory engine's claims disk is sized from `/` (see MemoryEngine.storage)."""
    stat = os.statvfs("/")
    return gb_of(stat.f_blocks * stat.f_frsize)


@pytest.fixture
def memory() -> MemoryEngine:
    return MemoryEngine(images={IMAGE: {}})


@pytest.fixture
def small_disk(tmp_path, memory):
    """An app whose claims may have 5 GB of disk in all: the reserve takes the rest of `/`."""
    app = make_app(tmp_path, memory, UTOPIA_AGENT_RESERVED_DISK_GB=f"{root_filesystem_gb() - 5:.1f}")
    yield app
    app.extensions["utopia"].close()


# --- the arithmetic --------------------------------------------------------------------


def test_the_allocatable_disk_is_the_filesystem_less_the_reserve_which_defaults_to_15_percent():
    assert allocatable_gb(100 * GIB, 30.0) == 70.0
    assert default_reserved_gb(100.0) == 15.0 and default_reserved_gb(10.5) == 2.0
    assert allocatable_gb(100 * GIB, None) == 85.0
    assert allocatable_gb(100 * GIB, 150.0) == 0.0, "a reserve beyond the filesystem leaves nothing, never a negative"
    assert gb_of(int(1.99 * GIB)) == 1.9, "an odd size rounds down"


def test_gpu_shares_of_the_disk_never_add_up_to_more_than_the_allocatable_disk():
    for allocatable in (85.0, 100.3, 7.7, 0.5):
        for gpus in (1, 3, 7, 8):
            shares = [disk_share(allocatable, 1, gpus) for _ in range(gpus)]
            assert sum(shares) <= allocatable + 1e-9 or shares[0] == 0.1, (allocatable, gpus)
    assert disk_share(85.0, 2, 8) == 21.2 and disk_share(85.0, 8, 8) == 85.0
    assert disk_share(85.0, 4, 2) == 85.0, "more GPUs than the node counts (a lost one) is the whole disk, no more"


def test_the_ledger_counts_every_consumer_and_refuses_beyond_it_naming_free_disk_gb():
    ledger = DiskLedger(20.0, {"claims": 12.5, "volumes": 5.0})
    assert (ledger.allocated_gb, ledger.free_gb) == (17.5, 2.5)
    ledger.check_fits(2.5)
    with pytest.raises(NotEnoughResources) as refused:
        ledger.check_fits(2.6, what="a volume")
    assert refused.value.details == {"free_disk_gb": 2.5} and "a volume of 2.6 GB" in refused.value.message
    assert DiskLedger(1.0, {"claims": 3.0}).free_gb == 0.0, "over-allocated (the filesystem shrank) shows nothing free"


# --- the mode ------------------------------------------------------------------------------


@pytest.mark.parametrize("driver, backing, options, can", [
    ("btrfs", "", None, True),
    ("zfs", "", None, True),
    ("overlay2", "xfs", frozenset({"rw", "prjquota"}), True),
    ("overlay2", "xfs", frozenset({"rw", "pquota"}), True),
    ("overlay2", "xfs", frozenset({"rw", "noquota"}), False),
    ("overlay2", "xfs", None, False),
    ("overlay2", "extfs", frozenset({"rw", "prjquota"}), False),
    ("vfs", "", None, False),
    ("", "", None, False),
])
def test_whether_the_engine_enforces_sizes_comes_from_its_driver_and_the_mount(driver, backing, options, can):
    refusal = quota.engine_refusal(driver, backing, options)
    assert (refusal is None) == can, refusal


def test_the_setting_picks_the_mode_and_engine_refuses_where_the_engine_cannot():
    assert quota.resolve("auto", None).mode == "engine"
    assert quota.resolve("auto", "no quotas").mode == "measured"
    assert quota.resolve("measured", None).mode == "measured"
    assert quota.resolve("off", "no quotas").mode == "off"
    assert quota.resolve("engine", None).mode == "engine"
    with pytest.raises(quota.EngineCannotEnforce, match="no quotas"):
        quota.resolve("engine", "no quotas")


def test_the_mount_under_the_data_root_is_the_deepest_one_holding_it():
    mountinfo = (
        "22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "40 22 7:3 / /srv/docker rw,relatime shared:9 - xfs /dev/loop3 rw,attr2,inode64,prjquota\n"
        "41 22 7:4 / /srv/docker-old rw,relatime - xfs /dev/loop4 rw,noquota\n"
    )
    assert "prjquota" in quota.mount_options_of("/srv/docker/data", mountinfo)
    assert "prjquota" not in quota.mount_options_of("/srv/docker-old", mountinfo)
    assert quota.mount_options_of("/var/lib/docker", mountinfo) == frozenset({"rw", "relatime"})
    assert quota.mount_options_of("/x", "") is None


# --- the configuration --------------------------------------------------------------------


@pytest.mark.parametrize("variable, value, problem", [
    ("UTOPIA_AGENT_DISK_QUOTA", "xfs", "expected one of auto, engine, measured, off"),
    ("UTOPIA_AGENT_DEFAULT_DISK_GB", "0", "more than 0"),
    ("UTOPIA_AGENT_DEFAULT_DISK_GB", "ten", "expected a number of GB"),
    ("UTOPIA_AGENT_DEFAULT_DISK_GB", "inf", "more than 0"),
    ("UTOPIA_AGENT_RESERVED_DISK_GB", "-1", "0 or more"),
    ("UTOPIA_AGENT_RESERVED_DISK_GB", "nan", "0 or more"),
])
def test_a_bad_disk_variable_is_refused_naming_it(tmp_path, variable, value, problem):
    with pytest.raises(ConfigError, match=problem) as refused:
        load_config({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_STATE_DIR": str(tmp_path), variable: value})
    assert refused.value.variable == variable


def test_the_disk_variables_default_to_auto_10_gb_and_15_percent(tmp_path):
    config = load_config({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_STATE_DIR": str(tmp_path)})
    assert (config.disk_quota, config.default_disk_gb, config.reserved_disk_gb) == ("auto", 10.0, None)


# --- creates --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, "1", True, None, 2 * 1024 * 1024, [1]])
def test_a_disk_size_that_is_not_a_positive_number_is_refused_with_nothing_made(small_disk, memory, value):
    response = create(small_disk.test_client(), disk_gb=value, command=["sleep", "60"])
    assert response.status_code == 400, response.get_json()
    assert "disk_gb" in response.get_json()["errors"] and memory.containers == {}


def test_each_claim_gets_the_size_asked_its_gpu_share_or_the_default_shown_in_resources(small_disk, memory):
    client = small_disk.test_client()
    asked = create(client, claim_id="asked", disk_gb=1.5, command=["sleep", "60"])
    assert asked.status_code == 201, asked.get_json()
    gpu = create(client, claim_id="gpu", gpu_count=2, command=["sleep", "60"])
    assert gpu.status_code == 201, gpu.get_json()
    resources = {c["claim_id"]: c["resources"]["disk_gb"] for c in client.get(CONTAINERS, headers=auth()).get_json()}
    assert resources == {"asked": 1.5, "gpu": 1.2}, "a 2-GPU claim of 8 gets a quarter of 5 GB, rounded down to 0.1"
    labels = memory.containers[asked.get_json()["container_id"]].labels
    assert (labels[DISK_LABEL], labels[DISK_QUOTA_LABEL]) == ("1.5", "measured")

    defaulted = make_app(small_disk.extensions["utopia"].config.state_dir.parent / "other", MemoryEngine(images={IMAGE: {}}),
                         UTOPIA_AGENT_DEFAULT_DISK_GB="2.5")
    try:
        made = create(defaulted.test_client(), claim_id="plain", command=["sleep", "60"])
        assert made.status_code == 201 and defaulted.test_client().get(CONTAINERS, headers=auth()).get_json()[0]["resources"]["disk_gb"] == 2.5
    finally:
        defaulted.extensions["utopia"].close()


def test_a_create_beyond_the_allocatable_disk_is_409_naming_free_disk_gb_with_nothing_left_behind(small_disk, memory):
    client = small_disk.test_client()
    assert create(client, claim_id="first", disk_gb=3, command=["sleep", "60"]).status_code == 201
    before = dict(memory.containers)
    refused = create(client, claim_id="second", disk_gb=2.5, command=["sleep", "60"])
    assert refused.status_code == 409
    body = refused.get_json()
    assert body["error"] == "not_enough_resources" and body["free_disk_gb"] == 2.0 and "2.5 GB requested" in body["message"]
    assert memory.containers == before, "nothing made"
    gpu_share = create(client, claim_id="all-gpus", gpu_count=8, command=["sleep", "60"])
    assert gpu_share.status_code == 409 and gpu_share.get_json()["free_disk_gb"] == 2.0, "the 8 GPUs' share is all 5 GB"
    assert create(client, claim_id="second", disk_gb=2, command=["sleep", "60"]).status_code == 201, "what is free fits exactly"


def test_a_deleted_claim_frees_its_disk_and_a_stopped_one_keeps_it(small_disk, memory):
    client = small_disk.test_client()
    made = create(client, claim_id="a", disk_gb=4, command=["sleep", "60"]).get_json()["container_id"]
    memory.containers[made] = dataclasses.replace(memory.containers[made], status="exited")
    assert create(client, claim_id="b", disk_gb=4, command=["sleep", "60"]).status_code == 409, "an exited claim's layer stays"
    assert client.delete(f"{CONTAINERS}/{made}", headers=auth()).status_code == 204
    assert create(client, claim_id="b", disk_gb=4, command=["sleep", "60"]).status_code == 201


def test_the_node_shows_the_disk_and_counts_a_second_kind_of_consumer(small_disk):
    client = small_disk.test_client()
    assert create(client, claim_id="a", disk_gb=1.5, command=["sleep", "60"]).status_code == 201
    disk = client.get("/api/v1/node", headers=auth()).get_json()["disk"]
    assert disk == {"quota": "measured", "allocatable_gb": 5.0, "allocated_gb": 1.5, "free_gb": 3.5, "pressure": False}

    allocator = small_disk.extensions["utopia"].allocator
    allocator.disk.add_consumer("scratch", lambda: 3.0)
    with pytest.raises(ValueError):
        allocator.disk.add_consumer("scratch", lambda: 1.0)
    assert allocator.disk_ledger().held == {"claims": 1.5, "volumes": 0.0, "scratch": 3.0}, "claim volumes count too (none made here)"
    refused = create(client, claim_id="b", disk_gb=1, command=["sleep", "60"])
    assert refused.status_code == 409 and refused.get_json()["free_disk_gb"] == 0.5
    assert client.get("/api/v1/node", headers=auth()).get_json()["disk"]["allocated_gb"] == 4.5


def test_the_node_shows_no_disk_while_the_engine_is_down(small_disk, memory):
    from utopia_agent.errors import EngineUnavailable

    memory.fail_next("list_managed", EngineUnavailable("down"))
    response = small_disk.test_client().get("/api/v1/node", headers=auth())
    assert response.status_code == 200 and response.get_json()["disk"] is None


# --- the measurement ------------------------------------------------------------------------


def test_a_layer_is_measured_as_du_counts_it_blocks_and_hard_links_once(tmp_path):
    from utopia_agent.disks.usage import layer_bytes

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "data").write_bytes(b"x" * 1024 * 1024)
    os.link(tmp_path / "d" / "data", tmp_path / "d" / "again")
    with open(tmp_path / "sparse", "wb") as sparse:
        sparse.truncate(1024 ** 3)
    measured = layer_bytes(str(tmp_path))
    assert 1024 * 1024 <= measured < 1024 * 1024 + 64 * 1024, "the data once, the sparse file's gigabyte not at all"
    assert layer_bytes(str(tmp_path / "gone")) is None


def test_a_layer_is_walked_again_only_when_the_node_grew_past_its_headroom_or_the_backstop_came():
    from utopia_agent.disks.usage import Layer

    layer = Layer("c", "/x", limit_bytes=1000, quota="measured")
    assert layer.needs_walk(now=0.0, growth=0, backstop=300), "never measured"
    layer.used_bytes, layer.walked_at, layer.growth_at_walk = 600, 100.0, 5000
    assert not layer.needs_walk(now=101.0, growth=5000, backstop=300), "nothing written anywhere"
    assert not layer.needs_walk(now=101.0, growth=5400, backstop=300), "the node grew less than its 400 bytes of headroom"
    assert layer.needs_walk(now=101.0, growth=5401, backstop=300), "it may be past its size"
    assert layer.needs_walk(now=400.0, growth=5000, backstop=300), "the backstop: space freed elsewhere may hide growth"
    assert not Layer("c", "/x", None, "off", 10, 100.0, 0).needs_walk(now=101.0, growth=10 ** 12, backstop=300), "no size: only the backstop"


class TrustedView:
    """A node view that can be trusted (its snapshot is not None): the disk sampler reads the claims then."""

    trusted = True

    def snapshot(self):
        return object() if self.trusted else None

    def volunteer(self) -> None:
        pass

    def close(self) -> None:
        pass


class LayeredEngine(MemoryEngine):
    """The memory engine with each container's writable layer in a directory of the test's."""

    def __init__(self, layers: Path, **options):
        super().__init__(**options)
        self.view = TrustedView()
        self.layers = layers

    def writable_layer(self, container_id: str) -> str:
        path = self.layers / container_id
        path.mkdir(exist_ok=True)
        return str(path)


@pytest.fixture
def layered(tmp_path):
    engine = LayeredEngine(tmp_path / "layers", images={IMAGE: {}})
    engine.layers.mkdir()
    app = make_app(tmp_path, engine)
    app.extensions["utopia"].disks.close()  # the test samples itself
    yield app, engine
    app.extensions["utopia"].close()


def test_a_measured_claim_past_its_size_is_stopped_and_one_within_it_or_not_measured_is_not(layered):
    from utopia_agent.disks.usage import DiskUsage

    app, engine = layered
    client = app.test_client()
    ids = {name: create(client, claim_id=name, disk_gb=0.001, command=["sleep", "60"]).get_json()["container_id"] for name in ("over", "within")}
    for claim_id, quota_mode in (("off", "off"), ("engine", "engine")):
        made = create(client, claim_id=claim_id, disk_gb=0.001, command=["sleep", "60"]).get_json()["container_id"]
        state = engine.containers[made]
        engine.containers[made] = dataclasses.replace(state, labels={**state.labels, DISK_QUOTA_LABEL: quota_mode})
        ids[claim_id] = made
    for name in ("over", "off", "engine"):
        (Path(engine.writable_layer(ids[name])) / "data").write_bytes(b"x" * 2 * 1024 * 1024)
    stopped: list[tuple[str, str]] = []
    agent = app.extensions["utopia"]
    usage = DiskUsage(engine, agent.allocator.disk, agent.config.state_dir, lambda container_id, reason: stopped.append((container_id, reason)))
    assert usage.sample_if_holder()
    assert stopped == [(ids["over"], "disk_limit_exceeded")], "only the measured claim past its 1 MiB"
    figures = usage.samples()["claims"]
    assert figures[ids["over"]]["used_bytes"] > 2 * 1024 * 1024 > figures[ids["within"]]["used_bytes"]
    assert figures[ids["engine"]]["limit_bytes"] == int(0.001 * 1024 ** 3), "every claim is measured for its stats"
    response = client.get(f"{CONTAINERS}/{ids['over']}/stats", headers=auth()).get_json()
    assert (response["disk_used_mb"], response["disk_limit_mb"]) == (2, 1)
    engine.containers[ids["over"]] = dataclasses.replace(engine.containers[ids["over"]], status="exited")
    assert usage.sample_if_holder() and stopped == [(ids["over"], "disk_limit_exceeded")], "stopped once"
    assert usage.used_bytes(ids["over"]) == figures[ids["over"]]["used_bytes"], "a stopped claim's layer stays: so does its figure"

    engine.view.trusted = False
    assert not usage.sample_if_holder(), "without a trusted node view the sampler waits: no engine call a second"


def test_a_claim_that_could_not_be_stopped_is_stopped_at_the_next_sample(layered):
    from utopia_agent.disks.usage import DiskUsage
    from utopia_agent.errors import EngineUnavailable

    app, engine = layered
    made = create(app.test_client(), claim_id="over", disk_gb=0.001, command=["sleep", "60"]).get_json()["container_id"]
    (Path(engine.writable_layer(made)) / "data").write_bytes(b"x" * 2 * 1024 * 1024)
    tries: list[str] = []

    def stop(container_id: str, reason: str) -> None:
        tries.append(container_id)
        if len(tries) == 1:
            raise EngineUnavailable("the engine did not answer")

    agent = app.extensions["utopia"]
    usage = DiskUsage(engine, agent.allocator.disk, agent.config.state_dir, stop)
    view = engine.view.snapshot()
    engine.view.snapshot = lambda: view  # the same view each second: nothing else would make the sampler look again
    usage.sample_if_holder()
    usage.sample_if_holder()
    assert tries == [made, made]


def test_a_claim_that_stopped_is_walked_once_more_for_the_size_it_stopped_at(layered):
    """Walks are lazy (a claim far from its size waits for the backstop), so the last walk of a
    claim that stops, whoever stopped it, may be long out of date: its final figure is walked."""
    from utopia_agent.disks.usage import DiskUsage

    app, engine = layered
    made = create(app.test_client(), claim_id="ends", disk_gb=1, command=["sleep", "60"]).get_json()["container_id"]
    agent = app.extensions["utopia"]
    usage = DiskUsage(engine, agent.allocator.disk, agent.config.state_dir, None)
    assert usage.sample_if_holder()
    first = usage.used_bytes(made)
    (Path(engine.writable_layer(made)) / "data").write_bytes(b"x" * 3 * 1024 * 1024)
    engine.containers[made] = dataclasses.replace(engine.containers[made], status="exited")
    assert usage.sample_if_holder()
    assert usage.used_bytes(made) >= first + 3 * 1024 * 1024, "the size it stopped at"
    (Path(engine.writable_layer(made)) / "more").write_bytes(b"x" * 1024 * 1024)
    assert usage.sample_if_holder() is not None
    assert usage.used_bytes(made) < first + 4 * 1024 * 1024, "walked once, not every second while stopped"


def test_where_the_agent_does_not_see_the_engines_data_root_creates_fail_naming_it(tmp_path):
    from utopia_agent.engine.manager import EngineStorage

    class ElsewhereEngine(MemoryEngine):
        """An engine whose data root lies in a mount namespace the agent does not share."""

        def storage(self) -> EngineStorage:
            return EngineStorage(str(tmp_path / "not-here"), "overlay2", "extfs")

    engine = ElsewhereEngine(images={IMAGE: {}})
    app = make_app(tmp_path, engine)
    try:
        client = app.test_client()
        refused = create(client, disk_gb=1, command=["sleep", "60"])
        assert refused.status_code == 500 and refused.get_json()["error"] == "node_fault"
        assert str(tmp_path / "not-here") in refused.get_json()["message"] and "bind-mount the data root" in refused.get_json()["message"]
        assert engine.containers == {}
        assert client.get("/api/v1/node", headers=auth()).get_json()["disk"] is None
    finally:
        app.extensions["utopia"].close()


def test_an_idle_node_is_not_looked_at_again_until_the_filesystem_grows_or_a_walk_falls_due(layered, monkeypatch):
    from utopia_agent.disks.usage import DiskUsage

    app, engine = layered
    create(app.test_client(), claim_id="idle", disk_gb=1, command=["sleep", "60"])
    agent = app.extensions["utopia"]
    used = [10 * 1024 ** 3]
    monkeypatch.setattr(agent.allocator.disk, "filesystem_bytes", lambda: (100 * 1024 ** 3, 100 * 1024 ** 3 - used[0]))
    walks: list[str] = []
    monkeypatch.setattr("utopia_agent.disks.usage.layer_bytes", lambda path: walks.append(path) or 4096)
    view = engine.view.snapshot()
    engine.view.snapshot = lambda: view
    usage = DiskUsage(engine, agent.allocator.disk, agent.config.state_dir, None, backstop=300)
    assert usage.sample_if_holder() and len(walks) == 1, "a new claim is walked at once"
    assert not usage.sample_if_holder() and len(walks) == 1, "nothing changed: not even the claims are looked at"
    used[0] += 4096
    assert usage.sample_if_holder() and len(walks) == 1, "the node grew by less than the claim's headroom: looked at, not walked"
    used[0] += 2 * 1024 ** 3
    assert usage.sample_if_holder() and len(walks) == 2, "the node grew past its headroom: walked"
