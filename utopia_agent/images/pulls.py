"""Image pulls: only when the engine lacks the image, with their progress logged, timed and
shown to every worker, and the registry's word asked for a cached private image.

The engine's pull request itself, within the overall and no-progress timeouts, is
engine/image_pull.py's (DockerManager.pull); which images are private is records.py's, when
images go collection.py's.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from ..engine.image_pull import RegistryAuth
from ..engine.manager import DockerManager, PresentImage
from ..engine.errors import EngineConflict, EngineNotFound
from ..errors import ImageInUse, ImagePullFailed, ImageUnavailable, InsufficientStorage, NotFound
from ..node.chore import NodeChore
from ..node.state_file import StateFile
from ..schemas import IMAGE_PATTERN
from ..observability.prometheus import PULL_DURATION
from .collection import ImageCollector
from .records import PulledImages

log = logging.getLogger("utopia_agent.docker")

PULL_PROGRESS_INTERVAL = 5.0
# How often a pull's progress is written for GET /api/v1/images, and how long a failed one stays listed.
PROGRESS_WRITE_INTERVAL = 1.0
FAILED_PULL_KEPT_SECONDS = 600
NO_SPACE = "no space left on device"
# How soon a pull whose worker died is taken over by another (or, with credentials, told failed).
ADOPT_SECONDS = 2.0


class Images:
    """What the node does with images: give creates theirs, pull ahead, list and remove them."""

    def __init__(self, docker: DockerManager, pulled: PulledImages, collector: ImageCollector, state_dir: Path):
        self.docker = docker
        self.pulled = pulled
        self.collector = collector
        self.board = PullBoard(state_dir / "pulls")
        self._adoption = NodeChore("pull-adoption", state_dir / "pull-adoption.stamp", ADOPT_SECONDS, self.adopt_orphans)

    def start(self) -> Images:
        self.collector.start()
        self._adoption.start()
        return self

    def close(self) -> None:
        self._adoption.close()
        self.collector.close()

    def ensure(self, image: str, auth: RegistryAuth | None = None) -> dict[str, str]:
        """Pull `image` unless the engine has it; return its labels, which the engine copies onto
        every container made from it. A cached private image is given only to a caller whose
        credentials its registry accepts (one manifest check); a public or preloaded one costs no
        more than the engine's inspect and a read of the small pulled-images record."""
        present = self.docker.present_image(image)
        if present is None:
            return self._pull(image, auth).labels
        self.check_access(image, present, auth)
        return present.labels

    def check_access(self, image: str, present: PresentImage, auth: RegistryAuth | None) -> None:
        if references := self.pulled.check_out(image, present.id):
            if auth is None:
                raise ImageUnavailable(f"{image} was pulled with credentials: it is private on this node; give the registry's credentials "
                                       "(registry_auth)", image=image)
            self.docker.check_registry_access(image if image in references else references[0], auth)

    def pull_ahead(self, image: str, auth: RegistryAuth | None) -> dict[str, Any]:
        """Start pulling `image` in the background unless the engine has it (then check access as a
        create would); its listing entry, `pulling` when a pull started. A create of the image
        meanwhile pulls too: the engine joins their layer downloads, while each pull asks for the
        manifest with its own credentials."""
        present = self.docker.present_image(image)
        if present is not None:
            self.check_access(image, present, auth)
            return next(entry for entry in self.listing() if entry["id"] == present.id)
        entry = self.board.entry(image, private=auth is not None)
        threading.Thread(target=self._pull_quietly, args=(image, auth, entry), name="pull-ahead", daemon=True).start()
        return {"image": image, "id": None, "size_mb": None, "origin": "pulled_private" if auth else "pulled", "claims": [],
                "last_used": None, "state": "pulling", "progress": {"downloaded_bytes": 0, "total_bytes": 0}}

    def listing(self) -> list[dict[str, Any]]:
        """The images the node holds, then the pulls in flight and recent failures (GET /api/v1/images)."""
        held = self.docker.list_images()
        in_use = self.docker.images_in_use()
        records = self.pulled.read()
        now = int(time.time())
        listed = []
        for image in held:
            mine = {ref: record for ref, record in records.items() if record.get("id") == image.id}
            origin = "preloaded" if not mine else "pulled_private" if any(r.get("private") for r in mine.values()) else "pulled"
            last_used = now if image.id in in_use else max((r.get("last_used", 0) for r in mine.values()), default=None)
            listed.append({"image": min(mine) if mine else (image.references[0] if image.references else image.id), "id": image.id,
                           "size_mb": round(image.size / 1e6, 1), "origin": origin, "claims": sorted(filter(None, in_use.get(image.id, ()))),
                           "last_used": last_used, "state": "present", "progress": None})
        for entry in self.board.entries():
            private = records.get(entry["image"], {}).get("private")
            listed.append({"image": entry["image"], "id": None, "size_mb": None, "origin": "pulled_private" if private else "pulled",
                           "claims": [], "last_used": None, "state": entry["state"], "error": entry.get("error"),
                           "progress": {"downloaded_bytes": entry["downloaded_bytes"], "total_bytes": entry["total_bytes"]}})
        return listed

    def remove(self, reference: str) -> None:
        """Remove an image no container was made from (ImageInUse otherwise); an unknown one, or
        what is no image reference at all, is NotFound."""
        present = self.docker.present_image(reference) if re.fullmatch(IMAGE_PATTERN, reference) else None
        if present is None:
            raise NotFound(f"no image {reference!r} on this node")
        if claims := self.docker.images_in_use().get(present.id):
            named = ", ".join(sorted(filter(None, claims))) or "none of the agent's"
            raise ImageInUse(f"{reference} is used by {len(claims)} container(s); claims: {named}")
        try:
            self.docker.remove_image(reference)
        except EngineConflict as exc:
            raise ImageInUse(f"the engine keeps {reference}: {exc.reason}") from None
        except EngineNotFound:
            raise NotFound(f"no image {reference!r} on this node") from None
        if self.docker.present_image(present.id) is None:
            self.pulled.forget(present.id)
        log.info("image removed image=%s id=%s", reference, present.id[7:19])

    def adopt_orphans(self) -> None:
        """Pulls whose worker died (SIGKILL, OOM) are finished by this one: a pull with credentials
        is told failed instead, since credentials are never written down for another to use."""
        for orphan in self.board.orphans():
            image = orphan["image"]
            if orphan.get("private"):
                self.pulled.failed(image)
                self.board.entry(image, private=True).failed("the worker pulling it stopped; pull again with its credentials")
                log.warning("image pull failed image=%s: its worker (pid %s) stopped", image, orphan.get("pid"), extra={"image": image})
                continue
            log.info("image pull taken over image=%s from its worker (pid %s), which stopped", image, orphan.get("pid"), extra={"image": image})
            entry = self.board.entry(image)
            threading.Thread(target=self._pull_quietly, args=(image, None, entry), name="pull-ahead", daemon=True).start()

    def _pull_quietly(self, image: str, auth: RegistryAuth | None, entry: PullEntry) -> None:
        try:
            self._pull(image, auth, entry)
        except Exception:  # logged by pull(), listed as failed by the board
            pass

    def _pull(self, image: str, auth: RegistryAuth | None, entry: PullEntry | None = None) -> PresentImage:
        entry = entry or self.board.entry(image, private=auth is not None)
        if auth is not None:
            self.pulled.pulling(image)
        try:
            self._pull_with_room(image, auth, entry)
            present = self.docker.present_image(image)
            if present is None:
                raise ImagePullFailed(f"cannot pull {image}: the engine lost it right after the pull", image=image)
        except BaseException as exc:
            if auth is not None:
                self.pulled.failed(image)
            entry.failed(getattr(exc, "message", type(exc).__name__))
            raise
        self.pulled.pulled(image, present.id, auth.owner(image) if auth else None)
        entry.done()
        return present

    def _pull_with_room(self, image: str, auth: RegistryAuth | None, entry: PullEntry) -> None:
        """Collect first when the store is past its high mark, then pull; a pull the disk cannot
        hold is retried once after collecting, then 507."""
        for _ in range(2):
            self.collector.collect()
            try:
                pull(self.docker, image, auth, entry)
                return
            except ImagePullFailed as exc:
                if NO_SPACE not in exc.message.lower():
                    raise
        raise InsufficientStorage(f"no room for {image} in the node's image store, even after collecting unused images", image=image)


def pull(docker: DockerManager, image: str, auth: RegistryAuth | None, entry: PullEntry) -> None:
    """Pull within the overall and no-progress timeouts, logging progress and the outcome."""
    progress = _PullProgress(image, entry)
    log.info("image pull started image=%s credentials=%s", image, "given" if auth else "none", extra={"image": image})
    try:
        docker.pull(image, progress.update, auth)
    except (ImagePullFailed, ImageUnavailable) as exc:
        PULL_DURATION.labels("refused" if isinstance(exc, ImageUnavailable) else "failed").observe(progress.elapsed())
        log.warning("image pull failed image=%s seconds=%.1f reason=%s", image, progress.elapsed(), exc.message, extra={"image": image})
        raise
    PULL_DURATION.labels("ok").observe(progress.elapsed())
    log.info("image pull finished image=%s seconds=%.1f %s", image, progress.elapsed(), progress.summary(), extra={"image": image})


class PullBoard:
    """The pulls under way on the node, one small file each in the state dir, so every worker
    lists every pull's progress (a create's too); a failed one stays listed a while."""

    def __init__(self, directory: Path):
        self._dir = directory

    def entry(self, image: str, private: bool = False) -> PullEntry:
        self._dir.mkdir(exist_ok=True)
        return PullEntry(StateFile(self._dir / f"{uuid.uuid4().hex}.json"), image, private)

    def entries(self) -> list[dict[str, Any]]:
        """Pulls under way (those whose worker died too, until another takes them over) and recent failures, oldest first."""
        listed = []
        for path in sorted(self._dir.glob("*.json")) if self._dir.is_dir() else ():
            record = StateFile(path).read()
            if not record or (record.get("state") == "failed" and time.time() - record.get("at", 0) > FAILED_PULL_KEPT_SECONDS):
                path.unlink(missing_ok=True)
                continue
            listed.append(record)
        return sorted(listed, key=lambda record: record.get("started", 0))

    def orphans(self) -> Iterator[dict[str, Any]]:
        """The records of pulls whose worker died, each given to one caller only: the first to rename
        its file takes it, so two workers never take over the same pull."""
        for path in sorted(self._dir.glob("*.json")) if self._dir.is_dir() else ():
            record = StateFile(path).read()
            if record.get("state") != "pulling" or _alive(record.get("pid", 0)):
                continue
            taken = path.with_suffix(".taken")
            try:
                os.rename(path, taken)
            except FileNotFoundError:
                continue
            taken.unlink()
            yield record


class PullEntry:
    def __init__(self, file: StateFile, image: str, private: bool = False):
        """`private`: the pull has credentials, which no other worker could take it over with."""
        self._file = file
        self._record = {"image": image, "state": "pulling", "pid": os.getpid(), "started": time.time(), "at": time.time(),
                        "downloaded_bytes": 0, "total_bytes": 0, "private": private}
        self._written = 0.0
        self._file.write(self._record, durable=False)

    def progress(self, downloaded: int, total: int) -> None:
        self._record.update(downloaded_bytes=downloaded, total_bytes=total)
        if time.monotonic() - self._written >= PROGRESS_WRITE_INTERVAL:
            self._written = time.monotonic()
            try:
                self._file.write({**self._record, "at": time.time()}, durable=False)
            except OSError:  # a full state dir: the pull goes on, its progress shows at the next write that fits
                pass

    def failed(self, reason: str) -> None:
        """Listed as failed a while; on a full state dir not listed at all, and the failure itself is what the caller gets."""
        try:
            self._file.write({**self._record, "state": "failed", "error": reason, "at": time.time()}, durable=False)
        except OSError:
            self._file.remove()

    def done(self) -> None:
        self._file.remove()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


class _PullProgress:
    """Logs a pull's progress every few seconds (layers done, bytes downloaded) and posts it to the board."""

    def __init__(self, image: str, entry: PullEntry):
        self._image = image
        self._entry = entry
        self._started = time.monotonic()
        self._last_log = self._started
        self._layers: dict[str, tuple[int, int]] = {}
        self._done: set[str] = set()

    def update(self, event: dict[str, Any]) -> None:
        layer = event.get("id")
        status = event.get("status", "")
        if layer and "progressDetail" in event and event["progressDetail"].get("total"):
            detail = event["progressDetail"]
            if status.startswith("Downloading"):
                self._layers[layer] = (detail.get("current", 0), detail["total"])
                self._entry.progress(*self._bytes())
        if layer and status in ("Pull complete", "Already exists", "Download complete"):
            self._done.add(layer)
        now = time.monotonic()
        if now - self._last_log >= PULL_PROGRESS_INTERVAL:
            self._last_log = now
            log.info("image pull progress image=%s seconds=%.0f %s", self._image, self.elapsed(), self.summary())

    def _bytes(self) -> tuple[int, int]:
        return sum(c for c, _ in self._layers.values()), sum(t for _, t in self._layers.values())

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def summary(self) -> str:
        current, total = self._bytes()
        return f"layers_done={len(self._done)} downloaded_mb={current / 1e6:.1f} of_mb={total / 1e6:.1f}"
