"""An in-memory engine with DockerManager's interface, for the fast tests (`create_app(docker=...)`).

It keeps the real records (ContainerState, ManagedContainer, Holdings via the labels that
ContainerSpec writes), so a container here is described exactly as the engine layer describes
one; only where they live differs. `fail_next(method, error)` makes the next call of `method`
raise `error`, as the engine layer does when the engine is down or fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from utopia_agent.claims.holders import carrying
from utopia_agent.claims.records import CLAIM_LABEL, MANAGED_LABEL, ContainerSpec, Holdings, ManagedContainer
from utopia_agent.errors import AgentError, ClaimExists, ImagePullFailed, NotManaged
from utopia_agent.engine.manager import EngineStorage, HeldImage, PresentImage
from utopia_agent.claims.records import ContainerState
from utopia_agent.schemas import CONTAINER_ID_PATTERN

DATA_ROOT = "/var/lib/docker"


class NoView:
    """No node view: `snapshot()` is None, so every read asks the engine (here, the dicts)."""

    def volunteer(self) -> None:
        pass

    def snapshot(self) -> None:
        return None


    def close(self) -> None:
        pass


class MemoryEngine:
    """Containers as ContainerState records keyed by id; images as name -> labels."""

    def __init__(self, images: dict[str, dict[str, str]] | None = None):
        self.images: dict[str, dict[str, str]] = dict(images or {})
        self.containers: dict[str, ContainerState] = {}
        self.view = NoView()
        self._faults: dict[str, AgentError] = {}

    def fail_next(self, method: str, error: AgentError) -> None:
        """The next call of `method` raises `error` (EngineUnavailable, EngineError, ...)."""
        if not callable(getattr(self, method, None)):
            raise AttributeError(f"MemoryEngine has no method {method!r}")
        self._faults[method] = error

    def _call(self, method: str) -> None:
        if (error := self._faults.pop(method, None)) is not None:
            raise error

    # --- the engine connection -------------------------------------------------------

    def ping(self) -> None:
        self._call("ping")

    def answered_within(self, seconds: float) -> bool:
        return not self._faults

    def engine_version(self) -> str:
        self._call("engine_version")
        return "memory (API none)"

    def data_root(self) -> str | None:
        self._call("data_root")
        return DATA_ROOT

    def storage(self) -> EngineStorage:
        """Writable layers on the machine's root filesystem, by no driver that takes a size: the
        claims' disk is sized from `/` and measured."""
        self._call("storage")
        return EngineStorage("/", "", "")

    def writable_layer(self, container_id: str) -> None:
        """No writable layer on any filesystem."""
        self._call("writable_layer")
        return None

    def close(self) -> None:
        pass

    # --- reading ---------------------------------------------------------------------

    def _managed(self, claim_id: str | None = None) -> list[ContainerState]:
        return [
            state for state in self.containers.values()
            if state.labels.get(MANAGED_LABEL) == "true" and claim_id in (None, state.labels.get(CLAIM_LABEL))
        ]

    def list_managed(self, claim_id: str | None = None) -> tuple[ManagedContainer, ...]:
        self._call("list_managed")
        return tuple(ManagedContainer.from_state(state) for state in self._managed(claim_id))

    def holders_of(self, label: str) -> list[Holdings]:
        """`label` is `key` or `key=value`, as the engine's label filter takes it."""
        self._call("holders_of")
        return carrying(self._rows(), label)

    def holders_now(self, engine: bool = False) -> tuple[Callable[[str], list[Holdings]], bool]:
        """No view: one list of the rows, as DockerManager.holders_now does while the view is not trusted."""
        rows = self.managed_rows()
        parsed: dict[str, Holdings] = {}
        return (lambda label: carrying(rows, label, parsed)), False

    def managed_rows(self, claim_id: str | None = None) -> list[dict[str, Any]]:
        self._call("managed_rows")
        return self._rows(claim_id)

    def _rows(self, claim_id: str | None = None) -> list[dict[str, Any]]:
        """The managed containers as the engine's list rows."""
        return [{"Id": s.id, "Names": [f"/{s.name}"], "State": s.status, "Labels": dict(s.labels)} for s in self._managed(claim_id)]

    def stale_created(self, older_than: float) -> list[tuple[str, str]]:
        self._call("stale_created")
        cutoff = time.time() - older_than
        return [(s.id, s.labels.get(CLAIM_LABEL, "")) for s in self._managed() if s.status == "created" and s.created < cutoff]

    def listing(self, history) -> tuple[tuple[ManagedContainer, ...], int]:
        return self.list_managed(), history.revision()

    def find_claim(self, claim_id: str, fresh: bool = False) -> str | None:
        self._call("find_claim")
        return next((state.id for state in self._managed(claim_id)), None)

    def claim_holder(self, claim_id: str) -> Holdings | None:
        self._call("claim_holder")
        return next((Holdings.from_labels(state.labels, state.id) for state in self._managed(claim_id)), None)

    def get_managed(self, container_id: str) -> ManagedContainer:
        self._call("get_managed")
        if not re.fullmatch(CONTAINER_ID_PATTERN, container_id):
            raise NotManaged(f"no managed container {container_id!r}: ids are 12 to 64 hex digits")
        matches = [state for state in self._managed() if state.id.startswith(container_id)]
        if len(matches) != 1:
            raise NotManaged(f"no managed container {container_id!r}")
        return ManagedContainer.from_state(matches[0])

    def logs(self, container_id: str, *, tail: int, since: float | None, timestamps: bool) -> bytes:
        self._call("logs")
        return b""

    def follow_logs(self, container_id: str, *, tail: int, since: float | None, timestamps: bool) -> Iterator[bytes]:
        self._call("follow_logs")
        return iter(())

    def container_pid(self, container_id: str) -> int:
        self._call("container_pid")
        return 0

    # --- images, creating and removing -------------------------------------------------

    def present_image(self, image: str) -> PresentImage | None:
        self._call("present_image")
        labels = self.images.get(image)
        return None if labels is None else PresentImage("sha256:" + hashlib.sha256(image.encode()).hexdigest(), labels)

    def list_images(self) -> list[HeldImage]:
        self._call("list_images")
        return [HeldImage(self.present_image(name).id, (name,), 1_000_000) for name in self.images]

    def images_in_use(self) -> dict[str, list[str]]:
        self._call("images_in_use")
        used: dict[str, list[str]] = {}
        for state in self.containers.values():
            used.setdefault(self.present_image(state.image).id, []).append(state.labels.get(CLAIM_LABEL, ""))
        return used

    def remove_image(self, reference: str) -> None:
        self._call("remove_image")
        self.images.pop(reference, None)

    def image_store_usage(self) -> None:
        """No filesystem: image collection never runs here."""
        return None

    def pull(self, image: str, on_event, auth=None) -> None:
        self._call("pull")
        raise ImagePullFailed(f"cannot pull {image}: not in the memory engine", image=image)

    def create(self, spec: ContainerSpec) -> str:
        """A created container, labelled as the engine labels it: the image's labels, then the spec's."""
        self._call("create")
        if holder := next((s.id for s in self.containers.values() if s.name == spec.name), None):
            raise ClaimExists.held_by(spec.claim_id, holder)
        container_id = uuid.uuid4().hex + uuid.uuid4().hex
        self.containers[container_id] = ContainerState(
            id=container_id, name=spec.name, image=spec.image, status="created", created=int(time.time()), started=0, finished=0,
            exit_code=0, oom_killed=False, restart_count=0, error="", labels={**self.images.get(spec.image, {}), **spec.labels()},
        )
        return container_id

    def start(self, container_id: str) -> None:
        self._call("start")
        self.containers[container_id] = dataclasses.replace(self.containers[container_id], status="running", started=int(time.time()))

    def remove(self, container_id: str, grace_seconds: int | None = None) -> None:
        self._call("remove")
        self.containers.pop(container_id, None)

    def remove_if_created(self, name: str, wait_seconds: float = 0.0) -> bool:
        self._call("remove_if_created")
        made = next((s.id for s in self.containers.values() if s.name == name), None)
        if made is not None:
            self.containers.pop(made)
        return made is not None

    def delete_managed(self, container_id: str) -> ManagedContainer:
        container = self.get_managed(container_id)
        self.remove(container.id)
        return container
