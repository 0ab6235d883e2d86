"""The engine's pull request and its registry check, with the caller's credentials when given.

What a pull is for the node (its progress in the log, its duration on /metrics, when it is
needed at all, which images are private) is images/'s; this module only speaks to the engine.
The credentials go into the X-Registry-Auth header of the one request they are for, and
nowhere else: not a log line, not an error message (the registry's own reasons never hold them).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import docker
import requests
import urllib3
from docker.errors import APIError

from ..config import Config
from ..errors import EngineUnavailable, ImagePullFailed, ImageUnavailable
from .errors import is_timeout

# How the engine passes on a registry's refusal, in a pull or a manifest check: missing or wrong
# credentials, no such repository or tag. Anything else (a network failure, a registry's 5xx)
# may pass and stays ImagePullFailed.
REGISTRY_REFUSALS = (
    "no basic auth credentials",
    "unauthorized",
    "authentication required",
    "denied",
    "manifest unknown",
    "name unknown",
    "repository does not exist",
    "not found",
)


@dataclass(frozen=True)
class RegistryAuth:
    """A create's credentials for its image's registry; the password never shows in a repr."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def of(cls, body: dict[str, Any]) -> RegistryAuth | None:
        """The credentials of a validated create or pull body, None when it has none."""
        given = body.get("registry_auth")
        return cls(given["username"], given["password"]) if given else None

    def owner(self, image: str) -> str:
        """Who pulled: a digest of the image's registry and the user, never the password."""
        return hashlib.sha256(f"{registry_of(image)}\0{self.username}".encode()).hexdigest()[:32]

    def header(self, image: str) -> str:
        return docker.auth.encode_header({"username": self.username, "password": self.password, "serveraddress": registry_of(image)})


def registry_of(image: str) -> str:
    """The registry an image reference names (`docker.io` when it names none)."""
    repository, _ = docker.utils.parse_repository_tag(image)
    return docker.auth.resolve_repository_name(repository)[0] or "docker.io"


def stream_pull(api: docker.APIClient, image: str, config: Config, on_event: Callable[[dict[str, Any]], None],
                auth: RegistryAuth | None = None) -> None:
    """The engine's pull request, with a read timeout equal to the no-progress timeout; each
    progress event the engine sends is handed to `on_event`.

    docker-py's `pull` sends `timeout=None` and would wait on a stalled registry forever,
    so this sends the same request through its lower-level calls. Closing the response
    is what makes the engine abandon the pull, so every way out of here closes it. Without
    `auth`, the credentials of the engine's own Docker config (the operator's) are sent.
    """
    repository, tag = docker.utils.parse_repository_tag(image)
    header = auth.header(image) if auth else docker.auth.get_config_header(api, docker.auth.resolve_repository_name(repository)[0])
    deadline = time.monotonic() + config.pull_timeout
    response = None
    try:
        with _registry_errors(image, "pull", config):
            response = api._post(
                api._url("/images/create"),
                params={"fromImage": repository, "tag": tag or "latest"},
                headers={"X-Registry-Auth": header} if header else {},
                stream=True,
                timeout=(config.engine_timeout, config.pull_idle_timeout),
            )
            api._raise_for_status(response)
            for event in api._stream_helper(response, decode=True):
                if "error" in event:
                    raise _registry_error(image, "pull", str(event["error"]))
                on_event(event)
                if time.monotonic() > deadline:
                    raise ImagePullFailed(f"cannot pull {image}: took longer than {config.pull_timeout:g} s", image=image)
    finally:
        if response is not None:
            response.close()


def check_access(api: docker.APIClient, image: str, auth: RegistryAuth, config: Config) -> None:
    """Ask the registry, through the engine, whether `auth` may pull `image`: its manifest only,
    no layers (the engine's /distribution/<name>/json, which asks the registry, never its cache)."""
    with _registry_errors(image, "check", config):
        response = api._get(api._url("/distribution/{0}/json", image), headers={"X-Registry-Auth": auth.header(image)},
                            timeout=(config.engine_timeout, config.pull_idle_timeout))
        api._raise_for_status(response)


@contextmanager
def _registry_errors(image: str, what: str, config: Config) -> Iterator[None]:
    """The engine's answers and the connection's failures of a pull or a check, as the agent's errors."""
    try:
        yield
    except APIError as exc:
        raise _registry_error(image, what, str(exc.explanation or exc)) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        if is_timeout(exc):
            raise ImagePullFailed(f"cannot {what} {image}: no progress for {config.pull_idle_timeout:g} s", image=image) from None
        raise EngineUnavailable(f"the Docker engine is unreachable ({what} image): {type(exc).__name__}") from None


def _registry_error(image: str, what: str, reason: str) -> ImagePullFailed | ImageUnavailable:
    """A registry's refusal (credentials, no such image) is ImageUnavailable; any other failure may pass."""
    if any(text in reason.lower() for text in REGISTRY_REFUSALS):
        return ImageUnavailable(f"cannot {what} {image}: the registry refused: {reason}", image=image)
    return ImagePullFailed(f"cannot {what} {image}: {reason}", image=image)
