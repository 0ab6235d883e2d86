"""Host volumes: roots the operator may not open, read-only mounts, and pins no tenant can redirect."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.agent import ROOT
from tests.support.polling import wait_for
from utopia_agent.config import ConfigError, load_config
from utopia_agent.errors import PolicyViolation
from utopia_agent.allocation.policy import check_volumes_apart
from utopia_agent.claims.volumes import Volume


def config_env(tmp_path: Path, roots: str) -> dict[str, str]:
    return {"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_STATE_DIR": str(tmp_path / "state"), "UTOPIA_AGENT_VOLUME_ROOTS": roots}


@pytest.mark.parametrize(
    "root",
    ["/", "/var", "/var/lib", "/etc/ssl", "/usr/local", "/run", "/proc/1/root", "/var/run/docker.sock", "/var/lib/docker",
     "/root/data", "/var/lib/kubelet", "/var/lib/containerd/x", "{state}", "{state}/mounts", "{tmp}", "{checkout}", "{link_to_etc}"],
)
def test_volume_roots_that_reach_the_system_or_the_agent_refuse_to_start(tmp_path, root):
    (tmp_path / "link").symlink_to("/etc")
    root = root.format(state=tmp_path / "state", tmp=tmp_path, checkout=ROOT / "tests", link_to_etc=tmp_path / "link")
    with pytest.raises(ConfigError, match="UTOPIA_AGENT_VOLUME_ROOTS"):
        load_config(config_env(tmp_path, root))


def test_a_root_holding_the_token_file_refuses_to_start(tmp_path):
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "token").write_text("t0ken")
    env = {**config_env(tmp_path, str(tmp_path / "secret")), "UTOPIA_AGENT_TOKEN_FILE": str(tmp_path / "secret" / "token")}
    with pytest.raises(ConfigError, match="UTOPIA_AGENT_VOLUME_ROOTS"):
        load_config(env)


@pytest.mark.parametrize("root", ["{tmp}/data", "{state}/volumes", "{state}/volumes/team-a"])
def test_ordinary_roots_are_accepted(tmp_path, root):
    root = root.format(state=tmp_path / "state", tmp=tmp_path)
    assert load_config(config_env(tmp_path, root)).volume_roots == (Path(root),)


def test_a_volume_may_not_reach_the_engines_data_root():
    volume = Volume(host="/srv/vols/docker", root="/srv/vols", target="/data")
    with pytest.raises(PolicyViolation, match="data root"):
        check_volumes_apart((volume,), {}, "/srv/vols/docker/overlay2")
    check_volumes_apart((volume,), {"/srv/vols/other": "c" * 64}, "/var/lib/docker")


# --- through the agent, on the real engine -----------------------------------------


def make_dir(agent, *parts: str) -> Path:
    path = agent.state_dir.joinpath("volumes", *parts)
    path.mkdir(parents=True)
    return path


def mounted_points() -> str:
    return Path("/proc/self/mountinfo").read_text()


def test_a_read_only_volume_cannot_be_written(agent, docker_client, test_image, claim):
    data = make_dir(agent, claim())
    (data / "model.bin").write_text("weights")
    response = agent.create(claim(), test_image, command=["sh", "-c", "cat /data/model.bin; touch /data/x && echo WROTE; sleep 300"],
                            volumes={str(data): "/data:ro"})
    assert response.status_code == 201, response.text
    container = docker_client.containers.get(response.json()["container_id"])
    [mount] = container.attrs["HostConfig"]["Mounts"]
    assert (mount["Target"], mount["ReadOnly"]) == ("/data", True)
    wait_for(lambda: b"weights" in container.logs(), timeout=20)
    assert b"WROTE" not in container.logs() and not (data / "x").exists()


def test_a_file_can_be_a_volume(agent, docker_client, test_image, claim):
    data = make_dir(agent, claim())
    (data / "config.yaml").write_text("lr: 0.1\n")
    response = agent.create(claim(), test_image, command=["sh", "-c", "cat /etc/job.yaml; sleep 300"], volumes={str(data / "config.yaml"): "/etc/job.yaml"})
    assert response.status_code == 201, response.text
    container = docker_client.containers.get(response.json()["container_id"])
    wait_for(lambda: b"lr: 0.1" in container.logs(), timeout=20)


def test_a_swapped_symlink_cannot_redirect_the_mount_on_restart(agent_factory, docker_client, test_image, claim):
    """The engine mounts the agent's pin of the directory that was checked: after the tenant swaps
    that path for a symlink to `/`, every restart of the container still sees the same directory."""
    agent = agent_factory(workers=1, UTOPIA_AGENT_RESTART_POLICY="on-failure")
    job = make_dir(agent, claim(), "job")
    (job / "marker").write_text("the checked directory\n")
    response = agent.create(claim(), test_image, command=["sh", "-c", "echo run; ls /data; sleep 1; exit 1"], volumes={str(job): "/data"})
    assert response.status_code == 201, response.text
    container = docker_client.containers.get(response.json()["container_id"])
    wait_for(lambda: container.logs().count(b"run\n") >= 1, timeout=20)
    job.rename(job.with_name("job-moved"))
    job.symlink_to("/")

    wait_for(lambda: container.logs().count(b"run\n") >= 3, timeout=60)
    runs = container.logs().decode().split("run\n")[1:]
    assert all(run.split() == ["marker"] for run in runs), runs


def test_pins_are_released_with_the_claim(agent, docker_client, test_image, claim):
    data = make_dir(agent, claim())
    response = agent.create(claim(), test_image, command=["sleep", "300"], volumes={str(data): "/data"})
    assert response.status_code == 201, response.text
    pin = agent.state_dir / "mounts" / claim() / "0"
    assert f" {pin} " in mounted_points()
    assert agent.delete(f"/api/v1/containers/{response.json()['container_id']}").status_code == 204
    assert f" {pin} " not in mounted_points()
    assert not pin.parent.exists()
    assert data.exists(), "the host directory itself is never removed"


def test_pins_of_a_container_removed_behind_the_agents_back_are_swept(agent_factory, docker_client, test_image, claim):
    agent = agent_factory(workers=2, UTOPIA_AGENT_UNSTARTED_SECONDS="2")
    data = make_dir(agent, claim())
    (data / "keep").write_text("tenant data")
    response = agent.create(claim(), test_image, command=["sleep", "300"], volumes={str(data): "/data"})
    assert response.status_code == 201, response.text
    docker_client.containers.get(response.json()["container_id"]).remove(force=True)
    pin = agent.state_dir / "mounts" / claim()
    wait_for(lambda: not pin.exists(), timeout=30)
    assert f" {pin}/" not in mounted_points()
    assert (data / "keep").read_text() == "tenant data"
