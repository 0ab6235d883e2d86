"""The state dir's record of pulled images: private marks before a pull, what a failed pull
leaves, public pulls, last use and forgetting (no engine needed)."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext

from utopia_agent.images.records import LAST_USED_RESOLUTION, PulledImages

REF = "reg:5000/team/train:1"
ID = "sha256:" + "a" * 64


def records(tmp_path) -> dict:
    path = tmp_path / "pulled-images.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_a_reference_is_private_before_its_pull_ends_and_by_id_after(tmp_path):
    pulled = PulledImages(tmp_path, nullcontext)
    pulled.pulling(REF)
    assert pulled.check_out(REF, "sha256:unknown") == [REF], "marked before the pull ends"
    pulled.pulled(REF, ID, "owner-digest")
    assert pulled.check_out("sha256:" + "a" * 12, ID) == [REF], "any name of the same image is private"
    assert records(tmp_path)[REF]["owners"] == ["owner-digest"] and records(tmp_path)[REF]["pending"] == 0
    assert "password" not in (tmp_path / "pulled-images.json").read_text()


def test_a_failed_pull_leaves_no_mark_once_no_other_pull_is_under_way(tmp_path):
    pulled = PulledImages(tmp_path, nullcontext)
    pulled.pulling(REF)
    pulled.pulling(REF)
    pulled.failed(REF)
    assert pulled.check_out(REF, ID) == [REF], "the other pull is still under way"
    pulled.failed(REF)
    assert records(tmp_path) == {}


def test_a_pull_without_credentials_makes_every_reference_of_the_image_public(tmp_path):
    pulled = PulledImages(tmp_path, nullcontext)
    pulled.pulling(REF)
    pulled.pulled(REF, ID, "owner-digest")
    pulled.pulled("reg:5000/team/train:latest", ID, None)
    assert pulled.check_out(REF, ID) == []
    assert {ref: record["private"] for ref, record in records(tmp_path).items()} == {REF: False, "reg:5000/team/train:latest": False}


def test_a_create_renews_a_stale_last_use_and_forgetting_drops_every_reference(tmp_path):
    pulled = PulledImages(tmp_path, nullcontext)
    pulled.pulled(REF, ID, None)
    stale = int(time.time()) - LAST_USED_RESOLUTION - 10
    pulled.used([ID], stale)
    pulled.check_out(REF, ID)
    assert records(tmp_path)[REF]["last_used"] >= int(time.time()) - 2
    pulled.forget(ID)
    assert records(tmp_path) == {}
