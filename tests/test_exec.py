"""Commands in a claim's container, once (POST) and interactive (WebSocket, Kubernetes' channel protocol), on the real engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pexpect
import pytest
import websocket

from tests.support.certificates import tls_env
from tests.support.polling import wait_for
from utopia_agent.client import ContainerNotRunning, ExecSession, NotFound, ReadOnlyToken, TooManyExecSessions

READ_TOKEN = "read-only-token-exec-0123456789"
PER_CLAIM = 8
IDLE_SECONDS = 3
OUTPUT_BYTES = 4096
V5, V4 = "v5.channel.k8s.io", "v4.channel.k8s.io"


@pytest.fixture(scope="module")
def exec_agent(module_agents, test_image):
    """Two workers; small output bound and idle timeout so tests reach them quickly."""
    return module_agents(
        workers=2, UTOPIA_AGENT_READ_TOKEN=READ_TOKEN, UTOPIA_AGENT_EXEC_SESSIONS_PER_CLAIM=str(PER_CLAIM),
        UTOPIA_AGENT_EXEC_IDLE_SECONDS=str(IDLE_SECONDS), UTOPIA_AGENT_EXEC_OUTPUT_BYTES=str(OUTPUT_BYTES),
        UTOPIA_AGENT_NETWORK_ISOLATION="off",
    )


@pytest.fixture(scope="module")
def https_exec_agent(module_agents, pki, test_image):
    return module_agents(workers=2, ca_file=pki.ca_file, UTOPIA_AGENT_NETWORK_ISOLATION="off", **tls_env(pki.server))


def running(agent, claim_id: str, image: str) -> str:
    response = agent.create(claim_id, image, command=["sleep", "600"])
    assert response.status_code == 201, response.text
    return response.json()["container_id"]


@pytest.fixture(scope="module")
def box(exec_agent, test_image):
    """One running container of a claim of this module's, shared by the tests that only run commands in it."""
    claim_id = f"exec-box-{time.monotonic_ns() % 10**8}"
    container_id = running(exec_agent, claim_id, test_image)
    yield container_id
    exec_agent.delete(f"/api/v1/containers/{container_id}")


def exec_once(agent, container_id: str, **body):
    return agent.post(f"/api/v1/containers/{container_id}/exec", json=body)


def processes(docker_client, container_id: str) -> list[str]:
    """The commands running in the container, as the engine's top lists them."""
    top = docker_client.api.top(container_id)
    column = top["Titles"].index("CMD") if "CMD" in top["Titles"] else -1
    return [row[column] for row in top["Processes"]]


# --- one-shot -------------------------------------------------------------------------


def test_once_answers_exit_code_stdout_and_stderr(exec_agent, box):
    response = exec_once(exec_agent, box, command=["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert response.status_code == 200, response.text
    assert response.json() == {"exit_code": 3, "stdout": "out\n", "stderr": "err\n", "truncated": False, "timed_out": False}
    ok = exec_once(exec_agent, box, command=["true"]).json()
    assert ok["exit_code"] == 0


def test_once_takes_env_and_working_dir_and_refuses_reserved_names(exec_agent, box):
    body = exec_once(exec_agent, box, command=["sh", "-c", "echo $GREETING; pwd"], env=["GREETING=hi"], working_dir="/tmp").json()
    assert body["stdout"] == "hi\n/tmp\n"
    refused = exec_once(exec_agent, box, command=["true"], env=["NVIDIA_VISIBLE_DEVICES=all"])
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden_by_policy"
    assert "env" in refused.json()["errors"]
    for bad in ({"command": []}, {"command": "ls"}, {"command": ["ls"], "timeout": 0}, {"command": ["ls"], "extra": 1},
                {"command": ["ls"], "env": ["1X=y"]}, {"command": ["ls"], "working_dir": "tmp"}):
        answer = exec_once(exec_agent, box, **bad)
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_request", (bad, answer.text)


def test_once_bounds_the_output_and_says_so(exec_agent, box):
    body = exec_once(exec_agent, box, command=["sh", "-c", f"head -c {OUTPUT_BYTES * 50} /dev/zero | tr '\\0' a; echo done >&2"]).json()
    assert body["truncated"] is True and body["exit_code"] == 0
    assert body["stdout"] == "a" * OUTPUT_BYTES and body["stderr"] == "done\n"


def test_once_kills_the_command_and_its_children_past_the_timeout(exec_agent, box, docker_client):
    started = time.monotonic()
    body = exec_once(exec_agent, box, command=["sh", "-c", "sleep 301 & sleep 302; echo never"], timeout=1).json()
    assert body["timed_out"] is True and body["exit_code"] == 137 and body["stdout"] == ""
    assert time.monotonic() - started < 10
    assert wait_for(lambda: not any("sleep 30" in p for p in processes(docker_client, box)), 5), processes(docker_client, box)


def test_once_runs_with_the_containers_own_capabilities_never_more(exec_agent, box, docker_client):
    inside = exec_once(exec_agent, box, command=["sh", "-c", "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status"]).json()["stdout"]
    main = exec_once(exec_agent, box, command=["sh", "-c", "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/1/status"]).json()["stdout"]
    assert inside == main and "CapEff" in inside
    assert "NoNewPrivs:\t1" in inside, "the agent's containers run with no-new-privileges, and so do their execs"


def test_once_is_404_for_an_unknown_container_and_409_for_a_stopped_one(exec_agent, test_image, claim, docker_client):
    missing = exec_once(exec_agent, "0123456789ab", command=["true"])
    assert missing.status_code == 404
    container_id = running(exec_agent, claim(), test_image)
    docker_client.api.stop(container_id, timeout=0)
    wait_for(lambda: exec_agent.get(f"/api/v1/containers/{container_id}").json()["status"] == "exited", 10)
    stopped = exec_once(exec_agent, container_id, command=["true"])
    assert stopped.status_code == 409 and stopped.json()["error"] == "container_not_running", stopped.text
    client = exec_agent.new_client()
    with pytest.raises(ContainerNotRunning):
        client.exec(container_id, ["true"])
    with pytest.raises(NotFound):
        client.exec("0123456789ab", ["true"])
    exec_agent.delete(f"/api/v1/containers/{container_id}")


def test_once_is_logged_and_told_on_the_event_stream_without_arguments(exec_agent, box):
    since = exec_agent.client.revision()
    exec_once(exec_agent, box, command=["sh", "-c", "exit 4", "secret-argument"], env=["TOKEN=secret-env"])
    changes = exec_agent.client.watch(since=since)
    change = next(change for change in changes if change["kind"] == "exec")
    assert change["action"] == "ended"
    assert {k: change["object"][k] for k in ("container_id", "command", "mode", "exit_code")} == {
        "container_id": box, "command": "sh", "mode": "once", "exit_code": 4}
    assert wait_for(lambda: "exec ended" in exec_agent.log(), 5)
    line = next(line for line in exec_agent.log().splitlines() if "exec ended" in line and "exit_code=4" in line)
    assert "command=sh" in line and "duration=" in line
    assert "secret" not in exec_agent.log()


def test_the_read_token_is_refused_on_both_routes(exec_agent, box):
    post = exec_agent.post(f"/api/v1/containers/{box}/exec", json={"command": ["true"]}, headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert post.status_code == 403 and post.json()["error"] == "read_only_token"
    with pytest.raises(ReadOnlyToken):
        ExecSession.open(exec_agent.base_url, READ_TOKEN, box, ["true"])
    assert exec_agent.get("/api/v1/containers", headers={"Authorization": f"Bearer {READ_TOKEN}"}).status_code == 200


# --- interactive ----------------------------------------------------------------------


def session(agent, container_id: str, command: list[str], **options) -> ExecSession:
    return agent.new_client().exec_session(container_id, command, **options)


def test_a_session_passes_stdin_to_its_end_and_answers_the_exit_code(exec_agent, box):
    with session(exec_agent, box, ["sh", "-c", "cat; echo bye >&2; exit 5"], stdin=True) as shell:
        assert shell.protocol == V5
        shell.write(b"hello ")
        shell.write(b"world\n")
        shell.close_stdin()
        out, err = shell.read_all(timeout=10)
    assert out == b"hello world\n" and err == b"bye\n"
    assert shell.exit_code == 5


def test_a_v4_client_is_served_and_its_status_is_a_kubernetes_status(exec_agent, box):
    ws = websocket.create_connection(
        f"ws://127.0.0.1:{exec_agent.port}/api/v1/containers/{box}/exec?command=sh&command=-c&command=echo+hi%3B+exit+2",
        header=[f"Authorization: Bearer {exec_agent.token}"], subprotocols=[V4], timeout=10)
    try:
        assert ws.subprotocol == V4
        frames = []
        while True:
            opcode, data = ws.recv_data(control_frame=False)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            frames.append(data)
    finally:
        ws.close()
    assert bytes([1]) + b"hi\n" in frames
    status = json.loads(next(frame for frame in frames if frame[0] == 3)[1:])
    assert status["status"] == "Failure" and status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "2"}]


def test_a_resize_is_what_stty_sees(exec_agent, box):
    with session(exec_agent, box, ["sh", "-c", "read line; stty size"], stdin=True, tty=True) as shell:
        shell.resize(123, 45)
        time.sleep(0.3)
        shell.write(b"go\r")
        out, _ = shell.read_all(timeout=10)
    assert b"45 123" in out, out
    assert shell.exit_code == 0


def test_a_client_that_vanishes_leaves_no_process(exec_agent, box, docker_client):
    shell = session(exec_agent, box, ["sleep", "303"], stdin=True)
    assert wait_for(lambda: any("sleep 303" in p for p in processes(docker_client, box)), 10)
    shell.abort()  # the connection drops without a close frame: a client killed
    assert wait_for(lambda: not any("sleep 303" in p for p in processes(docker_client, box)), 10), processes(docker_client, box)


def test_an_idle_session_ends_and_its_command_with_it(exec_agent, box, docker_client):
    with session(exec_agent, box, ["sleep", "304"], stdin=True) as shell:
        started = time.monotonic()
        shell.read_all(timeout=IDLE_SECONDS + 10)
        assert IDLE_SECONDS - 0.5 <= time.monotonic() - started < IDLE_SECONDS + 8
    assert shell.exit_code == 137
    assert wait_for(lambda: not any("sleep 304" in p for p in processes(docker_client, box)), 5)


def test_a_session_ends_when_its_container_stops(exec_agent, test_image, claim, docker_client):
    container_id = running(exec_agent, claim(), test_image)
    with session(exec_agent, container_id, ["sleep", "305"], stdin=True) as shell:
        assert wait_for(lambda: any("sleep 305" in p for p in processes(docker_client, container_id)), 10)
        docker_client.api.kill(container_id)
        shell.read_all(timeout=10)
    assert shell.exit_code is not None and shell.exit_code != 0
    exec_agent.delete(f"/api/v1/containers/{container_id}")


def test_sessions_are_bounded_per_claim_and_per_node_and_health_answers_while_16_are_open(exec_agent, test_image, claim):
    containers = [running(exec_agent, claim(str(i)), test_image) for i in range(3)]
    opened: list[ExecSession] = []
    try:
        opened += [session(exec_agent, containers[0], ["sleep", "306"], stdin=True) for _ in range(PER_CLAIM)]
        with pytest.raises(TooManyExecSessions) as per_claim:
            session(exec_agent, containers[0], ["true"])
        assert per_claim.value.retry_after == 5 and "UTOPIA_AGENT_EXEC_SESSIONS_PER_CLAIM" in per_claim.value.message
        refused = exec_once(exec_agent, containers[0], command=["true"])
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "5"
        opened += [session(exec_agent, containers[1], ["sleep", "306"], stdin=True) for _ in range(16 - PER_CLAIM)]
        with pytest.raises(TooManyExecSessions) as per_node:
            session(exec_agent, containers[2], ["true"])
        assert "16" in per_node.value.message
        for _ in range(20):
            started = time.monotonic()
            assert exec_agent.get("/health", auth=False, timeout=5).status_code == 200
            assert time.monotonic() - started < 1
            assert exec_agent.get("/api/v1/containers").status_code == 200
    finally:
        for shell in opened:
            shell.close()
    assert wait_for(lambda: exec_once(exec_agent, containers[2], command=["true"]).status_code == 200, 10)
    for container_id in containers:
        exec_agent.delete(f"/api/v1/containers/{container_id}")


def test_a_session_is_refused_before_the_upgrade(exec_agent, box):
    url = f"/api/v1/containers/{box}/exec"
    plain = exec_agent.get(url, params={"command": "true"})
    # Without the upgrade the route is POST's alone (Werkzeug's routing: a WebSocket rule matches only upgrades).
    assert plain.status_code == 405 and "GET" not in plain.headers["Allow"] and "POST" in plain.headers["Allow"], plain.text
    headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    no_protocol = exec_agent.get(url, params={"command": "true"}, headers=headers)
    assert no_protocol.status_code == 400 and "v5.channel.k8s.io" in no_protocol.json()["message"]
    no_command = exec_agent.get(url, headers={**headers, "Sec-WebSocket-Protocol": V5})
    assert no_command.status_code == 400 and "command" in no_command.json()["errors"]
    no_key = exec_agent.get(url, params={"command": "true"}, headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Protocol": V5})
    assert no_key.status_code == 400 and "Missing header" in no_key.json()["message"], no_key.text
    unknown = exec_agent.get("/api/v1/containers/0123456789ab/exec", params={"command": "true"}, headers={**headers, "Sec-WebSocket-Protocol": V5})
    assert unknown.status_code == 404


def test_the_kubernetes_clients_stream_runs_a_command_and_reads_stdout_and_the_exit_status(exec_agent, box):
    from kubernetes.client import Configuration
    from kubernetes.stream.ws_client import WSClient

    url = f"ws://127.0.0.1:{exec_agent.port}/api/v1/containers/{box}/exec?command=sh&command=-c&command=echo+from-k8s%3B+exit+7"
    client = WSClient(Configuration(), url, headers={"authorization": f"Bearer {exec_agent.token}"}, capture_all=True)
    client.run_forever(timeout=10)
    assert client.read_stdout() == "from-k8s\n"
    assert client.returncode == 7
    ok = WSClient(Configuration(), url.replace("exit+7", "exit+0"), headers={"authorization": f"Bearer {exec_agent.token}"}, capture_all=True)
    ok.run_forever(timeout=10)
    assert ok.returncode == 0


def test_exec_over_https_once_and_interactive(https_exec_agent, test_image, claim, pki):
    container_id = running(https_exec_agent, claim(), test_image)
    client = https_exec_agent.new_client()
    assert client.exec(container_id, ["sh", "-c", "echo tls"]).stdout == "tls\n"
    with client.exec_session(container_id, ["cat"], stdin=True) as shell:
        shell.write(b"x" * 100_000)
        shell.close_stdin()
        out, _ = shell.read_all(timeout=10)
    assert out == b"x" * 100_000 and shell.exit_code == 0
    https_exec_agent.delete(f"/api/v1/containers/{container_id}")


# --- the CLI ----------------------------------------------------------------------------


def cli_env(agent) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("UTOPIA_AGENT_")}, "UTOPIA_AGENT_TOKEN": agent.token}


def test_the_cli_exits_with_the_commands_code_and_passes_stdin(exec_agent, box):
    base = [sys.executable, "-m", "utopia_agent.cli", "exec", "--url", exec_agent.base_url]
    env = cli_env(exec_agent)
    since = exec_agent.client.revision()
    failed = subprocess.run([*base, box, "--", "sh", "-c", "echo out; echo err >&2; exit 4"], env=env, capture_output=True, timeout=60)
    assert (failed.returncode, failed.stdout, failed.stderr) == (4, b"out\n", b"err\n")
    echoed = subprocess.run([*base, "-i", box, "--", "cat"], env=env, input=b"piped\x00bytes", capture_output=True, timeout=60)
    assert (echoed.returncode, echoed.stdout) == (0, b"piped\x00bytes")
    missing = subprocess.run([*base, "0123456789ab", "--", "true"], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 5 and "404" in missing.stderr
    events = subprocess.run([sys.executable, "-m", "utopia_agent.cli", "events", "--url", exec_agent.base_url, "--since", str(since)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert any(" exec " in line and "sh interactive exit 4 exited" in line for line in events.stdout.splitlines()), events.stdout


def test_the_cli_gives_a_real_terminal_raw_and_resized_through_a_pty(exec_agent, box):
    child = pexpect.spawn(sys.executable, ["-m", "utopia_agent.cli", "exec", "-it", "--url", exec_agent.base_url, box, "--", "sh"],
                          env=cli_env(exec_agent), dimensions=(24, 80), timeout=15)
    try:
        child.expect("# ")
        child.sendline("stty size")
        child.expect("24 80")
        child.setwinsize(40, 100)  # the kernel sends the CLI SIGWINCH
        time.sleep(0.5)
        child.sendline("stty size")
        child.expect("40 100")
        child.sendcontrol("c")  # raw mode: Ctrl-C reaches the shell, which goes on
        child.expect("# ")
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 3


def test_stopping_the_agent_ends_its_sessions_and_their_commands_at_once(agent_factory, test_image, claim, docker_client):
    agent = agent_factory(workers=1, UTOPIA_AGENT_NETWORK_ISOLATION="off")
    container_id = running(agent, claim(), test_image)
    shell = session(agent, container_id, ["sleep", "309"], stdin=True)
    assert wait_for(lambda: any("sleep 309" in p for p in processes(docker_client, container_id)), 10)
    started = time.monotonic()
    agent.stop()
    assert time.monotonic() - started < 10, "the graceful stop did not wait out the session"
    assert not any("sleep 309" in p for p in processes(docker_client, container_id))
    shell.read_all(timeout=5)
    assert shell.ended
    docker_client.api.remove_container(container_id, force=True)
