"""The exec parts that need no engine: the session bounds, the process-tree kill, the channel protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.polling import wait_for
from utopia_agent.config import MAX_EXEC_SESSIONS
from utopia_agent.engine.exec import kill_process_tree
from utopia_agent.errors import TooManyExecSessions
from utopia_agent.exec.channels import ClientMessage, status_message
from utopia_agent.exec.slots import SessionSlots


def test_sessions_are_bounded_per_claim_and_per_agent_and_a_closed_slot_is_free_again(tmp_path):
    slots = SessionSlots(tmp_path / "exec", per_claim=3)
    other_worker = SessionSlots(tmp_path / "exec", per_claim=3)  # another worker's view of the same folder
    held = [slots.take("a"), other_worker.take("a"), slots.take("a")]
    with pytest.raises(TooManyExecSessions, match="claim a already runs 3"):
        other_worker.take("a")
    held += [slots.take(f"c{i}") for i in range(MAX_EXEC_SESSIONS - 3)]
    with pytest.raises(TooManyExecSessions, match=f"already runs {MAX_EXEC_SESSIONS}"):
        slots.take("b")
    os.close(held.pop())
    os.close(held.pop(0))
    held += [slots.take("a")]
    for fd in held:
        os.close(fd)


def test_a_dead_workers_slots_are_free_at_once(tmp_path):
    script = ("import sys, time; from utopia_agent.exec.slots import SessionSlots; s = SessionSlots(__import__('pathlib').Path(sys.argv[1]), 16); "
              "[s.take('x') for _ in range(16)]; print('held', flush=True); time.sleep(60)")
    worker = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "exec")], stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert worker.stdout.readline().strip() == "held"
        with pytest.raises(TooManyExecSessions):
            SessionSlots(tmp_path / "exec", 16).take("y")
    finally:
        worker.kill()
        worker.wait()
    os.close(SessionSlots(tmp_path / "exec", 16).take("y"))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_the_kill_ends_the_process_and_its_descendants_and_nothing_when_it_is_no_longer_the_one_meant():
    tree = subprocess.Popen(["sh", "-c", "sleep 307 & sleep 308 & wait"])
    try:
        assert wait_for(lambda: len(open(f"/proc/{tree.pid}/task/{tree.pid}/children").read().split()) == 2, 5)
        children = [int(pid) for pid in open(f"/proc/{tree.pid}/task/{tree.pid}/children").read().split()]
        assert kill_process_tree(tree.pid, lambda: False) is False, "not confirmed the one meant: nothing is signalled"
        assert _alive(tree.pid) and all(_alive(child) for child in children)
        assert kill_process_tree(tree.pid, lambda: True) is True
        tree.wait(5)
        assert wait_for(lambda: not any(_alive(child) for child in children), 5)
    finally:
        if tree.poll() is None:
            tree.kill()
            tree.wait()
    assert kill_process_tree(tree.pid, lambda: True) is False, "gone (and reaped): nothing to open"


def test_client_messages_binary_or_text_and_resizes():
    assert ClientMessage.parse(b"\x00hi") == ClientMessage(0, b"hi")
    assert ClientMessage.parse("\x00hé") == ClientMessage(0, "hé".encode())
    assert ClientMessage.parse(b"") is None and ClientMessage.parse("") is None
    assert ClientMessage.parse(b'\x04{"Width": 120, "Height": 40}').size() == (120, 40)
    for bad in (b"\x04{", b'\x04{"Width": 0, "Height": 4}', b'\x04{"Width": "x", "Height": 4}', b"\x04[]", b'\x04{"Width": 70000, "Height": 1}'):
        assert ClientMessage.parse(bad).size() is None, bad


def test_the_final_status_reads_as_client_go_reads_it():
    assert json.loads(status_message(0)[1:])["status"] == "Success" and status_message(0)[0] == 3
    failed = json.loads(status_message(3)[1:])
    assert failed["reason"] == "NonZeroExitCode" and failed["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    unknown = json.loads(status_message(None)[1:])
    assert unknown["status"] == "Failure" and "details" not in unknown
