"""Tests of endpoints that other issues add: kept out of the run until the agent serves them.

`awaits(path, issue)` skips a test while this tree's OpenAPI document lacks `path` (checked
when the tests are collected, from the code under test, not from a list kept by hand). Once
the endpoint lands, the mark lets the test run; the lead then removes the mark, so that a
later loss of the endpoint fails the test instead of skipping it.
"""

from __future__ import annotations

import re

import pytest

from utopia_agent.api.openapi import build_spec


def _shape(path: str) -> str:
    """A path with its parameters' names dropped: `/gpus/{uuid}` and `/gpus/{gpu_uuid}` match."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def served(path: str) -> bool:
    """Whether the agent's OpenAPI document has `path`."""
    return _shape(path) in {_shape(p) for p in build_spec()["paths"]}


def awaits(path: str, issue: int) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not served(path), reason=f"awaits {path} (issue {issue}); remove this mark once it is served")
