"""The spec digest that makes a retried create exact: the whole validated request but the registry's credentials."""

from __future__ import annotations

from utopia_agent.allocation.policy import spec_digest
from utopia_agent.schemas import CreateContainerSchema

REQUEST = {"claim_id": "claim-1", "image": "busybox:1", "command": ["sleep", "300"], "env_vars": ["A=1"]}


def digest(**changed) -> str:
    return spec_digest(CreateContainerSchema().load({**REQUEST, **changed}))


def test_the_same_request_has_the_same_digest_defaults_spelled_out_or_not():
    assert digest() == digest()
    assert digest() == digest(gpu_count=0, port_mappings=[], volumes={}), "a default sent is the default left out"


def test_any_field_that_differs_changes_the_digest():
    digests = {digest(), digest(command=["sleep", "301"]), digest(env_vars=["A=2"]), digest(image="busybox:2"),
               digest(working_dir="/tmp"), digest(memory_mb=256)}
    assert len(digests) == 6


def test_the_registrys_credentials_are_left_out():
    request = CreateContainerSchema().load(REQUEST)
    assert spec_digest({**request, "registry_auth": {"username": "u", "password": "p"}}) == spec_digest(request)
