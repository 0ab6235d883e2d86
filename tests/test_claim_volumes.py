"""Claim volumes on a real engine with real loop mounts: sized, kept past their claims, shared
read-only and written by one claim at a time, found again after restarts and crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import requests

from tests.support.polling import wait_for
from tests.support.prerequisites import require
from tests.support.private_engine import running_private_engine
from utopia_agent.client import VolumeInUse

pytestmark = pytest.mark.usefixtures("nvidia_path")
MIB = 1024 * 1024


def loop_devices_of(image: Path) -> str:
    return subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True, check=True).stdout.strip()


def volume_folder(agent, name: str) -> Path:
    return agent.state_dir / "claim-volumes" / name


@pytest.fixture
def volume(agent, claim):
    """A 1 GiB volume named for the test; deleted afterwards (its claims are removed first by the autouse cleanup)."""
    made: list[str] = []

    def make(suffix: str = "v", size_gb: int = 1) -> str:
        name = claim(suffix)
        response = agent.post("/api/v1/volumes", json={"name": name, "size_gb": size_gb})
        assert response.status_code == 201, response.text
        made.append(name)
        return name

    yield make
    for name in made:
        for container in agent.get("/api/v1/containers").json():
            if container["claim_id"] in agent.get(f"/api/v1/volumes/{name}").json().get("claims", []):
                agent.delete(f"/api/v1/containers/{container['id']}")
        assert agent.delete(f"/api/v1/volumes/{name}").status_code in (204, 404)


def created(agent, claim_id, image, **fields):
    response = agent.create(claim_id, image, **fields)
    assert response.status_code == 201, response.text
    return response.json()["container_id"]


def recorded(agent) -> list[dict]:
    """The node's event history as the agent keeps it (STATE_DIR/events): what GET /api/v1/events
    sends. Read from the files, since closing a live stream waits for its next heartbeat (15 s)."""
    folder = agent.state_dir / "events"
    return [json.loads(line) for name in ("previous.jsonl", "current.jsonl") if (folder / name).exists()
            for line in (folder / name).read_text().splitlines() if line.strip()]


def run_in(docker_client, container_id, script):
    result = docker_client.containers.get(container_id).exec_run(["sh", "-c", script])
    return result.exit_code, result.output.decode()


def test_a_volume_is_made_shown_and_removed_with_nothing_left(agent, claim, volume):
    since = int(agent.get("/api/v1/node").headers["X-Utopia-Revision"])
    name = claim("v")
    response = agent.post("/api/v1/volumes", json={"name": name, "size_gb": 1})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"name", "size_gb", "used_mb", "created", "backend", "claims", "ready"}
    assert (body["name"], body["size_gb"], body["backend"], body["claims"], body["ready"]) == (name, 1, "loop", [], True)
    assert 0 <= body["used_mb"] < 100
    assert response.headers["Location"].endswith(f"/api/v1/volumes/{name}")
    assert agent.get("/api/v1/node").json()["claim_volume_backend"] == "loop"
    again = agent.post("/api/v1/volumes", json={"name": name, "size_gb": 2})
    assert (again.status_code, again.json()["error"], again.json()["volume"]) == (409, "volume_exists", name)
    for bad in ({"name": "-bad", "size_gb": 1}, {"name": "ok", "size_gb": 0}, {"name": "ok", "size_gb": 1.5}, {"name": "ok"},
                {"name": "ok", "size_gb": 1, "labels": {}}):
        refused = agent.post("/api/v1/volumes", json=bad)
        assert (refused.status_code, refused.json()["error"]) == (400, "invalid_request"), bad
    assert agent.get("/api/v1/volumes/ok").status_code == 404

    assert name in [v["name"] for v in agent.get("/api/v1/volumes").json()]
    assert agent.get(f"/api/v1/volumes/{name}").json()["size_gb"] == 1
    folder = volume_folder(agent, name)
    assert loop_devices_of(folder / "disk.img"), "the agent loop-mounted it"
    image = folder / "disk.img"
    assert agent.delete(f"/api/v1/volumes/{name}").status_code == 204
    assert not folder.exists() and not os.path.ismount(folder / "mnt")
    assert wait_for(lambda: not loop_devices_of(image), timeout=15), "its loop device was freed"
    assert agent.delete(f"/api/v1/volumes/{name}").status_code == 404
    changes = [c for c in recorded(agent) if c["revision"] > since and c["kind"] == "volume"]
    assert [(c["action"], c["object"]["name"]) for c in changes] == [("created", name), ("removed", name)]


def test_data_outlives_its_claim_and_a_write_past_the_size_is_enospc(agent, docker_client, test_image, claim, volume):
    name = volume()
    mount = [{"volume": name, "path": "/workspace"}]
    first = created(agent, claim("a"), test_image, gpu_count=1, disk_gb=1, mounts=mount, command=["sleep", "300"])
    first_gpus = set(agent.get(f"/api/v1/containers/{first}").json()["gpu_ids"])
    code, written = run_in(docker_client, first, "dd if=/dev/urandom of=/workspace/data bs=1M count=100 2>/dev/null && md5sum /workspace/data")
    assert code == 0, written
    assert agent.get(f"/api/v1/volumes/{name}").json()["claims"] == [claim("a")]
    assert agent.delete(f"/api/v1/containers/{first}").status_code == 204
    created(agent, claim("hold"), test_image, gpu_count=len(first_gpus), disk_gb=1, command=["sleep", "300"])  # takes the GPUs `a` had

    second = created(agent, claim("b"), test_image, gpu_count=1, disk_gb=1, mounts=mount, command=["sleep", "300"])
    assert not set(agent.get(f"/api/v1/containers/{second}").json()["gpu_ids"]) & first_gpus, "claim b runs on other GPUs"
    assert run_in(docker_client, second, "md5sum /workspace/data") == (0, written)

    code, output = run_in(docker_client, second, "dd if=/dev/zero of=/workspace/big bs=1M count=2048; sync; stat -c %s /workspace/big")
    assert code == 0 and "No space left on device" in output, output
    size = int(output.strip().splitlines()[-1])
    assert 800 * MIB < size < 1024 * MIB, size
    # The node's disk is shared with other work, so its free space proves nothing: what the volume can take
    # of it is its sparse file's blocks, never more than its size.
    assert (volume_folder(agent, name) / "disk.img").stat().st_blocks * 512 <= 1024 * MIB
    [layer] = docker_client.api.containers(all=True, size=True, filters={"id": second})
    assert (layer.get("SizeRw") or 0) < 10 * MIB, "the container's own writable layer took nothing"
    assert agent.get(f"/api/v1/volumes/{name}").json()["used_mb"] > 900


def test_mounts_are_refused_unknown_twice_written_or_in_use_and_shared_read_only(agent, docker_client, test_image, claim, volume):
    name = volume()
    unknown = agent.create(claim("u"), test_image, mounts=[{"volume": "no-such-volume", "path": "/w"}], command=["sleep", "300"])
    assert (unknown.status_code, unknown.json()["error"], unknown.json()["volume"]) == (404, "volume_not_found", "no-such-volume")
    assert docker_client.containers.list(all=True, filters={"label": f"utopia.claim_id={claim('u')}"}) == [], "nothing was made"
    shadow = agent.create(claim("u"), test_image, mounts=[{"volume": name, "path": "/proc/x"}])
    assert (shadow.status_code, shadow.json()["error"]) == (403, "forbidden_by_policy")

    readers = [created(agent, claim(f"r{i}"), test_image, mounts=[{"volume": name, "path": "/data", "read_only": True}], command=["sleep", "300"])
               for i in range(2)]
    code, output = run_in(docker_client, readers[0], "touch /data/x")
    assert code != 0 and "Read-only file system" in output
    writer = agent.create(claim("w"), test_image, mounts=[{"volume": name, "path": "/data"}], command=["sleep", "300"])
    assert (writer.status_code, writer.json()["error"], writer.json()["claim_id"]) == (409, "volume_in_use", claim("r0")), writer.text
    for reader in readers:
        assert agent.delete(f"/api/v1/containers/{reader}").status_code == 204

    owner = created(agent, claim("w"), test_image, mounts=[{"volume": name, "path": "/data"}], command=["sleep", "300"])
    for read_only in (False, True):
        refused = agent.create(claim("x"), test_image, mounts=[{"volume": name, "path": "/data", "read_only": read_only}])
        assert (refused.status_code, refused.json()["error"], refused.json()["claim_id"]) == (409, "volume_in_use", claim("w"))
    assert agent.post(f"/api/v1/containers/{owner}/stop").status_code == 200
    in_use = agent.delete(f"/api/v1/volumes/{name}")
    assert (in_use.status_code, in_use.json()["error"], in_use.json()["claim_id"]) == (409, "volume_in_use", claim("w")), "a stopped claim holds it"
    refused = agent.create(claim("x"), test_image, mounts=[{"volume": name, "path": "/data"}])
    assert refused.status_code == 409, "a stopped claim still holds its read-write mount"


def test_two_concurrent_writers_never_both_win(agent, test_image, claim, volume):
    name = volume()
    answers: list[requests.Response] = []

    def create(suffix):
        answers.append(agent.create(claim(suffix), test_image, mounts=[{"volume": name, "path": "/data"}], command=["sleep", "300"]))

    threads = [threading.Thread(target=create, args=(f"c{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answer.status_code for answer in answers) == [201, 409, 409, 409], [a.text for a in answers]


def answered(agent, path):
    try:
        response = agent.get(path)
    except requests.ConnectionError:
        return None
    return response.json() if response.status_code == 200 else None


def test_an_interrupted_create_is_shown_deleted_or_finished_and_leaves_nothing_hidden(agent_factory, claim, tmp_path):
    """A worker SIGKILLed while mkfs runs (a stand-in mkfs.ext4 that waits): the volume is listed as
    not ready, a delete removes all of it, and one left so is finished at the next start."""
    stand_in = tmp_path / "bin"
    stand_in.mkdir()
    (stand_in / "mkfs.ext4").write_text(f"#!/bin/sh\necho $$ >> {tmp_path}/mkfs.pids\nexec sleep 60\n")
    (stand_in / "mkfs.ext4").chmod(0o755)
    agent = agent_factory(workers=2, PATH=f"{stand_in}:{os.environ['PATH']}")
    names = [claim("gone"), claim("kept")]
    try:
        for name in names:
            sender = threading.Thread(target=lambda n=name: _send_quietly(agent, n), daemon=True)
            sender.start()
            folder = volume_folder(agent, name)
            assert wait_for(lambda f=folder: (f / "disk.img").exists(), timeout=30)
            waiting = [int(pid) for pid in (tmp_path / "mkfs.pids").read_text().split()]
            killed = _worker_in_mkfs(agent, waiting[-1])
            os.kill(killed, signal.SIGKILL)
            os.kill(waiting[-1], signal.SIGKILL)
            sender.join(30)
            shown = wait_for(lambda n=name: answered(agent, f"/api/v1/volumes/{n}"), timeout=60)
            assert (shown["ready"], shown["used_mb"]) == (False, None)
            assert name in [v["name"] for v in agent.get("/api/v1/volumes").json()]
            unusable = agent.create(claim("c"), "utopia-test/busybox:latest", mounts=[{"volume": name, "path": "/data"}])
            assert (unusable.status_code, unusable.json()["error"]) == (404, "volume_not_found")

        assert agent.delete(f"/api/v1/volumes/{names[0]}").status_code == 204
        assert not volume_folder(agent, names[0]).exists()

        agent.stop()
        agent.env["PATH"] = os.environ["PATH"]
        agent.start()
        finished = agent.get(f"/api/v1/volumes/{names[1]}").json()
        assert (finished["ready"], finished["size_gb"]) == (True, 1) and finished["used_mb"] is not None
        assert agent.delete(f"/api/v1/volumes/{names[1]}").status_code == 204
        assert sorted(os.listdir(agent.state_dir / "claim-volumes")) == []
    finally:
        agent.stop()


def _send_quietly(agent, name):
    try:
        agent.post("/api/v1/volumes", json={"name": name, "size_gb": 1}, timeout=60)
    except requests.RequestException:
        pass


def _worker_in_mkfs(agent, mkfs_pid: int) -> int:
    """The worker whose child the waiting mkfs is."""
    parent = int(Path(f"/proc/{mkfs_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert parent in agent.worker_pids()
    return parent


def test_a_volume_beyond_the_free_allocatable_disk_is_refused(agent_factory, docker_client, claim):
    """Volumes count against the node's allocatable disk (the engine data root's filesystem less the reserve), with the claims' disks."""
    root = os.statvfs(docker_client.info()["DockerRootDir"])
    size_gb = root.f_blocks * root.f_frsize / 1024**3
    agent = agent_factory(workers=1, UTOPIA_AGENT_RESERVED_DISK_GB=f"{size_gb - 3:.3f}")
    try:
        name = claim("v")
        assert agent.post("/api/v1/volumes", json={"name": name, "size_gb": 2}).status_code == 201
        refused = agent.post("/api/v1/volumes", json={"name": claim("w"), "size_gb": 2})
        assert (refused.status_code, refused.json()["error"]) == (409, "not_enough_resources"), refused.text
        assert 0 < refused.json()["free_disk_gb"] < 2, "what is left of the 3 GB beside the first volume"
        assert agent.get("/api/v1/volumes/" + claim("w")).status_code == 404, "nothing was made"
        assert agent.delete(f"/api/v1/volumes/{name}").status_code == 204
        assert agent.post("/api/v1/volumes", json={"name": claim("w"), "size_gb": 2}).status_code == 201, "its size is free again"
        assert agent.delete(f"/api/v1/volumes/{claim('w')}").status_code == 204
    finally:
        agent.stop()


def test_the_cli_and_the_client_make_mount_stop_start_and_remove(agent, test_image, claim):
    from tests.test_cli import api_env, run_cli, table_rows

    env, name = api_env(agent), claim("v")
    made = run_cli("volume", "create", name, "--size-gb", "1", env=env)
    assert (made.returncode, made.stdout.strip()) == (0, name), made.stderr
    assert run_cli("volume", "create", name, "--size-gb", "1", env=env).returncode == 6, "409 volume_exists is a conflict"
    client = agent.new_client()
    created = client.create(claim("a"), test_image, command=["sleep", "300"], mounts=[{"volume": name, "path": "/data"}])
    shown = client.volume(name)
    assert (shown.size_gb, shown.backend, shown.claims) == (1, "loop", [claim("a")])
    [row] = [row for row in table_rows(run_cli("volumes", env=env).stdout) if row[0] == name]
    assert row[1:3] == ["1", "GB"] and claim("a") in row
    stopped = run_cli("stop", created.container_id, env=env)
    assert (stopped.returncode, stopped.stdout.split()) == (0, [created.container_id[:12], "stopped"]), stopped.stderr
    assert client.get(created.container_id).stopped is True
    assert json.loads(run_cli("start", created.container_id, "--json", env=env).stdout)["stopped"] is False
    with pytest.raises(VolumeInUse) as in_use:
        client.delete_volume(name)
    assert in_use.value.claim_id == claim("a")
    client.delete(created.container_id)
    removed = run_cli("volume", "rm", name, env=env)
    assert (removed.returncode, removed.stdout.strip()) == (0, name), removed.stderr
    assert [v.name for v in client.volumes() if v.name == name] == []


@pytest.fixture
def btrfs_dir(tmp_path):
    """A loop-mounted 3 GB btrfs (btrfs-progs), unmounted and its loop device freed afterwards."""
    require(shutil.which("mkfs.btrfs") is not None and os.geteuid() == 0, "btrfs volumes need root and btrfs-progs (make test installs them)")
    image, mounted = tmp_path / "btrfs.img", tmp_path / "btrfs"
    mounted.mkdir()
    subprocess.run(["truncate", "-s", "3G", str(image)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mounted)], check=True)
    try:
        yield mounted
    finally:
        subprocess.run(["umount", str(mounted)], check=False)
        if loop := loop_devices_of(image).split(":", 1)[0]:
            subprocess.run(["losetup", "-d", loop], check=False)


def test_on_btrfs_a_volume_is_a_subvolume_whose_qgroup_limit_stops_writes(agent_factory, docker_client, test_image, claim, btrfs_dir):
    agent = agent_factory(workers=1, UTOPIA_AGENT_CLAIM_VOLUMES_DIR=str(btrfs_dir / "volumes"))
    try:
        assert agent.get("/api/v1/node").json()["claim_volume_backend"] == "btrfs"
        name = claim("v")
        made = agent.post("/api/v1/volumes", json={"name": name, "size_gb": 1})
        assert (made.status_code, made.json()["backend"]) == (201, "btrfs"), made.text
        holder = created(agent, claim("a"), test_image, mounts=[{"volume": name, "path": "/workspace"}], command=["sleep", "300"])
        code, output = run_in(docker_client, holder, "dd if=/dev/zero of=/workspace/big bs=1M count=2048; sync; stat -c %s /workspace/big")
        assert code == 0 and "Disk quota exceeded" in output, output
        assert 800 * MIB < int(output.strip().splitlines()[-1]) <= 1024 * MIB
        assert agent.get(f"/api/v1/volumes/{name}").json()["used_mb"] > 800
        assert agent.delete(f"/api/v1/containers/{holder}").status_code == 204
        assert agent.delete(f"/api/v1/volumes/{name}").status_code == 204
        assert not (btrfs_dir / "volumes" / name).exists()
    finally:
        agent.stop()


def test_after_a_reboot_volumes_are_mounted_before_their_claims_start_and_a_stopped_claim_stays_stopped(docker_client, agent_factory, claim):
    """A reboot, played on an engine of the test's own (the shared one is never restarted): the engine
    comes back before the agent, with one claim's volume not mounted, and fails to start that claim
    (its bind source is inside the volume's filesystem, so nothing is written to the disk below),
    while a claim stopped by request stays stopped although its restart policy is `always`. The agent
    mounts the volume and starts the first; both, and the volume, are found again through SIGKILLed
    workers, and the stopped claim starts again with its policy given back."""
    with running_private_engine(docker_client, subnet="10.222") as private:
        agent = agent_factory(workers=2, DOCKER_HOST=private.base_url, UTOPIA_AGENT_RESTART_POLICY="always", UTOPIA_AGENT_UNSTARTED_SECONDS="4")
        name, image = claim("v"), "utopia-test/busybox:latest"
        try:
            assert agent.post("/api/v1/volumes", json={"name": name, "size_gb": 1}).status_code == 201
            holder = created(agent, claim("a"), image, mounts=[{"volume": name, "path": "/data"}], command=["sleep", "300"])
            assert run_in(private.client, holder, "echo before-reboot > /data/file")[0] == 0
            stopped = created(agent, claim("s"), image, gpu_count=2, disk_gb=1, command=["sleep", "300"])
            assert agent.post(f"/api/v1/containers/{stopped}/stop").status_code == 200
            agent.stop()
            private.stop()
            folder = volume_folder(agent, name)
            subprocess.run(["umount", str(folder / "mnt")], check=True)
            private.start()
            state = private.client.api.inspect_container(holder)["State"]
            assert not state["Running"] and state["Error"], "the engine could not start it without its volume"
            assert not (folder / "mnt" / "data").exists(), "nothing was made on the disk below"
            assert not private.client.api.inspect_container(stopped)["State"]["Running"], "the engine's restart left the stopped claim stopped"

            agent.start()
            assert wait_for(lambda: private.client.api.inspect_container(holder)["State"]["Running"], timeout=30), agent.log()[-2000:]
            assert run_in(private.client, holder, "cat /data/file") == (0, "before-reboot\n")
            for pid in agent.worker_pids():
                os.kill(pid, signal.SIGKILL)
            shown = wait_for(lambda: answered(agent, f"/api/v1/containers/{stopped}"), timeout=60)
            assert (shown["stopped"], shown["status"]) == (True, "exited")
            volume = agent.get(f"/api/v1/volumes/{name}").json()
            assert volume["ready"] and volume["used_mb"] is not None and volume["claims"] == [claim("a")], "mounted again, and found"
            assert not [gpu for gpu in agent.get("/api/v1/gpus").json() if gpu["claim_id"] == claim("s")], "it holds no GPU"
            assert agent.post(f"/api/v1/containers/{stopped}/start").status_code == 200
            assert private.client.api.inspect_container(stopped)["HostConfig"]["RestartPolicy"]["Name"] == "always"
            for container_id in (holder, stopped):
                assert agent.delete(f"/api/v1/containers/{container_id}").status_code == 204
            assert agent.delete(f"/api/v1/volumes/{name}").status_code == 204
        finally:
            agent.stop()


def test_a_volume_the_volumes_filesystem_has_no_room_for_is_507_with_nothing_left(agent_factory, claim, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    (full / "volumes").mkdir()
    subprocess.run(["dd", "if=/dev/zero", f"of={full / 'fill'}", "bs=64k"], capture_output=True, check=False)  # to the last byte
    agent = agent_factory(workers=1, UTOPIA_AGENT_CLAIM_VOLUMES_DIR=str(full / "volumes"))
    try:
        refused = agent.post("/api/v1/volumes", json={"name": claim("v"), "size_gb": 1})
        assert (refused.status_code, refused.json().get("error")) == (507, "insufficient_storage"), refused.text
        assert os.listdir(full / "volumes") == [] and agent.get("/api/v1/volumes").json() == []
    finally:
        agent.delete(f"/api/v1/volumes/{claim('v')}")
        agent.stop()
        subprocess.run(["umount", str(full)], check=True)
