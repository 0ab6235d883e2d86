"""A missing prerequisite skips a test on a developer's machine and fails it in CI."""

from __future__ import annotations

import pytest

from tests.support import prerequisites


@pytest.mark.parametrize("in_ci,outcome", [(True, pytest.fail.Exception), (False, pytest.skip.Exception)])
def test_missing_prerequisite(monkeypatch, in_ci, outcome):
    monkeypatch.setattr(prerequisites, "IN_CI", in_ci)
    with pytest.raises(outcome, match="supervisord"):
        prerequisites.require(False, "supervisord is not installed")
    prerequisites.require(True, "never raised")
