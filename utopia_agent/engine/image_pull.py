"""The engine's pull request, within the overall and no-progress timeouts.

What a pull is for the node (its progress in the log, its duration on /metrics, when it is
needed at all) is images/pulls.py's; this module only speaks to the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import docker
import requests
import urllib3
from docker.errors import APIError

from ..config import Config
from ..errors import EngineUnavailable, ImagePullFailed
from .errors import is_timeout


def stream_pull(api: docker.APIClient, image: str, config: Config, on_event: Callable[[dict[str, Any]], None]) -> None:
    """The engine's pull request, with a read timeout equal to the no-progress timeout; each
    progress event the engine sends is handed to `on_event`.

    docker-py's `pull` sends `timeout=None` and would wait on a stalled registry forever,
    so this sends the same request through its lower-level calls. Closing the response
    is what makes the engine abandon the pull, so every way out of here closes it.
    """
    repository, tag = docker.utils.parse_repository_tag(image)
    auth_header = docker.auth.get_config_header(api, docker.auth.resolve_repository_name(repository)[0])
    deadline = time.monotonic() + config.pull_timeout
    response = None
    try:
        response = api._post(
            api._url("/images/create"),
            params={"fromImage": repository, "tag": tag or "latest"},
            headers={"X-Registry-Auth": auth_header} if auth_header else {},
            stream=True,
            timeout=(config.engine_timeout, config.pull_idle_timeout),
        )
        api._raise_for_status(response)
        for event in api._stream_helper(response, decode=True):
            if "error" in event:
                raise ImagePullFailed(f"cannot pull {image}: {event['error']}", image=image)
            on_event(event)
            if time.monotonic() > deadline:
                raise ImagePullFailed(f"cannot pull {image}: took longer than {config.pull_timeout:g} s", image=image)
    except APIError as exc:
        raise ImagePullFailed(f"cannot pull {image}: {exc.explanation or exc}", image=image) from None
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        if is_timeout(exc):
            raise ImagePullFailed(f"cannot pull {image}: no progress for {config.pull_idle_timeout:g} s", image=image) from None
        raise EngineUnavailable(f"the Docker engine is unreachable (pull image): {type(exc).__name__}") from None
    finally:
        if response is not None:
            response.close()
