"""The claim volume rows of `make bench` (`benchmarks/bench.py --only volumes` runs them alone).

- POST /api/v1/volumes of 10 GiB (loop backend) against the same volume made by hand: a sparse
  file, `mkfs.ext4` with the agent's options, `mount -o loop`; the engine's own `docker volume
  create` (no size, nothing to format) is in the note for scale.
- A create that mounts a claim volume (read-only, so both sides may hold it at once) against the
  engine's create + start with the agent's own create arguments and the same bind mount.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

from utopia_agent.claims.records import ClaimMount
from utopia_agent.volumes.backends import LoopBackend

VOLUME_GB = 10


def _by_hand(folder: Path) -> None:
    folder.mkdir()
    LoopBackend().make(folder, VOLUME_GB * 1024**3)


def _undo_by_hand(folder: Path) -> None:
    subprocess.run(["umount", str(folder / "mnt")], check=True)
    for path in (folder / "disk.img", folder / "mnt" / "data"):
        if path.is_file():
            path.unlink()
    os.rmdir(folder / "mnt")
    os.rmdir(folder)


def figure_volume_create(bench, say, compare, samples: int) -> None:
    """POST /api/v1/volumes (10 GiB) vs the same loop volume by hand, interleaved; each removed after its round."""
    agent_ms, hand_ms, engine_ms = [], [], []
    work = bench.tmp / "volumes-by-hand"
    work.mkdir()
    for i in range(samples + 2):
        name = bench.claim("vol")
        order = ["agent", "hand"] if i % 2 == 0 else ["hand", "agent"]
        for who in order:
            start = time.perf_counter()
            if who == "agent":
                with bench.agent.new_client() as client:
                    client.create_volume(name, VOLUME_GB)
                agent_ms.append((time.perf_counter() - start) * 1000)
            else:
                _by_hand(work / name)
                hand_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        bench.api.create_volume(name)
        engine_ms.append((time.perf_counter() - start) * 1000)
        bench.api.remove_volume(name)
        with bench.agent.new_client() as client:
            client.delete_volume(name)
        _undo_by_hand(work / name)
    del agent_ms[:2], hand_ms[:2], engine_ms[:2]
    engine_median = sorted(engine_ms)[len(engine_ms) // 2]
    bench.add(compare(f"POST /api/v1/volumes, {VOLUME_GB} GiB (loop)", agent_ms, hand_ms, 1.5,
                      f"baseline: the same volume by hand (truncate, mkfs.ext4 -m 0 with lazy init, mount -o loop); "
                      f"the engine's docker volume create (no size, nothing formatted) took {engine_median:.1f} ms median")
              .keep_samples(agent=agent_ms, by_hand=hand_ms, docker_volume_create=engine_ms))


def figure_mount_create(bench, say, compare, samples: int) -> None:
    """POST with a claim volume mounted vs SDK create + start with the agent's arguments and the same bind, interleaved."""
    name = bench.claim("mnt")
    with bench.agent.new_client() as client:
        client.create_volume(name, 1)
    source = str(bench.tmp / "agent" / "claim-volumes" / name / "mnt" / "data")
    mount = {"volume": name, "path": "/workspace", "read_only": True}
    creates: dict[str, list[float]] = {"agent": [], "engine": []}
    try:
        for i in range(samples + 2):
            made: dict[str, str] = {}
            for who in (["agent", "engine"] if i % 2 == 0 else ["engine", "agent"]):
                start = time.perf_counter()
                if who == "agent":
                    with bench.agent.new_client() as client:
                        made[who] = client.create(bench.claim("m"), bench.image, command=["sleep", "3600"], mounts=[mount]).container_id
                else:
                    spec = replace(bench.spec_the_agent_makes(0), claim_id=bench.claim("mb"),
                                   mounts=(ClaimMount(name, "/workspace", True),), claim_mount_sources=(source,))
                    made[who] = bench.raw_create(spec)
                creates[who].append((time.perf_counter() - start) * 1000)
            bench.http.delete(made["agent"])
            bench.raw_stop_remove(made["engine"])
    finally:
        with bench.agent.new_client() as client:
            client.delete_volume(name)
    for series in creates.values():
        del series[:2]
    bench.add(compare("POST /api/v1/containers mounting a claim volume", creates["agent"], creates["engine"], 1.10,
                      "baseline: SDK create + start with the agent's own create arguments and the same bind mount "
                      "(read-only on both sides, so both may hold the volume at once); no GPU")
              .keep_samples(agent=creates["agent"], engine_create_and_start=creates["engine"]))
