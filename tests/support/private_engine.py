"""A second dockerd of the test's own, so the shared engine is never touched.

It has its own data root, exec root (and so its own containerd), pidfile, socket and
bridge. It must never run with `--bridge=none`: that removes the interface named docker0,
which belongs to the shared engine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import docker

from tests.support.engine import EngineHandle, ensure_engine, ensure_test_image
from tests.support.prerequisites import require


def _ifindex(name: str) -> int | None:
    try:
        return int(Path(f"/sys/class/net/{name}/ifindex").read_text())
    except OSError:
        return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class PrivateEngine:
    """A dockerd on its own socket and bridge, stopped and started by the test.

    `subnet` is the first two octets of the bridge's /24 (the third comes from the bridge's
    random name), so two modules' engines can use distinct ranges.
    """

    def __init__(self, root: Path, subnet: str = "10.213", dockerd_args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.root = root
        self.socket = root / "docker.sock"
        self.base_url = f"unix://{self.socket}"
        self.bridge = f"utb{uuid.uuid4().hex[:8]}"
        self.subnet = subnet
        self.extra_args = dockerd_args
        self.env = env or {}
        self.handle: EngineHandle | None = None
        self.logs: list[Path] = []

    @property
    def args(self) -> tuple[str, ...]:
        return (
            f"--data-root={self.root / 'data'}", f"--exec-root={self.root / 'exec'}",
            f"--pidfile={self.root / 'docker.pid'}", f"--host={self.base_url}",
            f"--bridge={self.bridge}", "--iptables=false", "--ip-masq=false",
            # Claim containers run `sleep`, which ignores SIGTERM as PID 1: do not wait 10 s for each.
            "--shutdown-timeout=1",
            *self.extra_args,
        )

    def create_bridge(self) -> None:
        third = int(self.bridge[3:5], 16)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.{third}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def start(self) -> PrivateEngine:
        self.handle = ensure_engine(base_url=self.base_url, dockerd_args=self.args, env=self.env, client_timeout=30)
        assert self.handle.started_by_us, "something else answered on the private engine's socket"
        self.logs.append(self.handle.log_path)
        return self

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.stop()
            self.handle = None

    @property
    def client(self) -> docker.DockerClient:
        return self.handle.client

    def remove_all(self) -> None:
        """Everything in this engine belongs to the test that started it, so every container goes, and
        every network it made: a stopped dockerd leaves its networks' bridges (and their routes) on the
        host, where a subnet the shared engine gives later would lose its traffic to them."""
        for container in self.client.containers.list(all=True):
            container.remove(force=True, v=True)
        for network in self.client.networks.list():
            if network.name not in ("bridge", "host", "none"):
                network.remove()

    def destroy(self) -> None:
        if self.handle is not None:
            try:
                self.remove_all()
            except docker.errors.DockerException:
                pass  # an engine that no longer answers: nothing more can be asked of it
        self.stop()
        if _ifindex(self.bridge) is not None:
            _ip("link", "delete", self.bridge)
        shutil.rmtree(self.root, ignore_errors=True)
        for log in self.logs:
            log.unlink(missing_ok=True)


@contextmanager
def running_private_engine(shared: docker.DockerClient, **options) -> Iterator[PrivateEngine]:
    """A started private engine holding the test image, destroyed afterwards; the shared engine
    (`shared`) and its docker0 must come through unchanged. `options` go to PrivateEngine."""
    require(
        os.geteuid() == 0 and shutil.which("dockerd") is not None and shutil.which("ip") is not None,
        "a private dockerd needs root, dockerd and ip (make test installs docker.io and iproute2 as root)",
    )
    docker0 = _ifindex("docker0")
    # A short root: dockerd's and containerd's unix socket paths must stay under 108 bytes.
    private = PrivateEngine(Path(tempfile.mkdtemp(prefix="utopia-eng-", dir="/tmp")), **options)
    try:
        private.create_bridge()
        private.start()
        ensure_test_image(private.client)
        yield private
        if private.handle is not None:
            private.remove_all()
    finally:
        private.destroy()
        assert _ifindex("docker0") == docker0, "the shared engine's docker0 changed"
        assert shared.ping()


@contextmanager
def running_btrfs_engine(subnet: str) -> Iterator[PrivateEngine]:
    """A private dockerd whose data root is a loop-mounted 4 GB btrfs: its driver takes a container's
    size (qgroups, which it enables itself). Torn down in order: its containers and networks, the
    dockerd, the mount, its own loop device (never `losetup -D`), the bridge."""
    require(os.geteuid() == 0 and shutil.which("mkfs.btrfs") is not None and shutil.which("dockerd") is not None,
            "a btrfs engine needs root, btrfs-progs and dockerd (make test installs them as root)")
    root = Path(tempfile.mkdtemp(prefix="utopia-btr-", dir="/tmp"))
    image, data = root / "btrfs.img", root / "data"
    data.mkdir()
    engine = PrivateEngine(root, subnet=subnet, dockerd_args=("--storage-driver=btrfs",))
    try:
        subprocess.run(["truncate", "-s", "4G", str(image)], check=True)
        subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(data)], check=True)
        engine.create_bridge()
        engine.start()
        ensure_test_image(engine.client)
        yield engine
    finally:
        if engine.handle is not None:
            try:
                engine.remove_all()
            except docker.errors.DockerException:
                pass
        engine.stop()
        subprocess.run(["umount", str(data)], check=False)
        # `mount -o loop` lets the device go with the mount; detach it only if it stayed.
        loop = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout.split(":", 1)[0]
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        engine.destroy()
