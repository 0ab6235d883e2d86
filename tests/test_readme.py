"""The README's offline quickstart, run as a newcomer would run it: its own commands, in order.

The fenced `sh` blocks under "## Offline quickstart" are the commands. The one with `make run`
is started in the background (as in its own shell) and stopped with Ctrl-C's SIGINT; the
blocks after it run as one shell script, as typed into a second shell. The test only moves
the agent to a free loopback port and a temporary state dir, so it never meets an agent of
the developer's.

The README is the front door (at most 300 lines) and docs/ holds the rest: every file there is
linked, from the README or (a picture) from a page of docs/, and every relative link of these
pages leads to a file that exists and, with an anchor, to a heading of it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess

import docker.errors
import pytest

from tests.support.agent import ROOT, make_run_is_installed
from tests.support.engine import free_port, remove_images
from tests.support.polling import wait_for
from tests.support.prerequisites import require

SECTION = "## Offline quickstart"
README_ADDRESS = "127.0.0.1:8600"
IMAGE = "quickstart/busybox:latest"
CONTAINER = "utopia-demo"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 300


def quickstart_blocks() -> list[str]:
    """The `sh` blocks of the quickstart section, in order."""
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end != -1 else None]
    return re.findall(r"^```sh\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)


def run_script(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def test_the_offline_quickstart_works_as_written(docker_client, nvidia_path, tmp_path):
    require(shutil.which("make") is not None and shutil.which("curl") is not None, "make and curl")
    require(make_run_is_installed(), "an installed .venv (make test makes it)")
    require(shutil.which("docker") is not None and os.path.exists("/usr/bin/busybox"), "the docker CLI and busybox-static")
    if docker_client.containers.list(all=True, filters={"name": f"^/{CONTAINER}$"}):
        pytest.fail(f"a container {CONTAINER} exists already on this engine; the quickstart would meet it")

    blocks = quickstart_blocks()
    [server] = [i for i, block in enumerate(blocks) if "make run" in block]
    assert 0 < server < len(blocks) - 1, "image first, then the agent, then the requests"

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UTOPIA_AGENT_")}
    env.update({
        "UTOPIA_AGENT_BIND": f"127.0.0.1:{port}",
        "UTOPIA_AGENT_STATE_DIR": str(tmp_path / "state"),
        "UTOPIA_AGENT_WORKERS": "2",
    })
    made_here = [path for path in (ROOT / ".run", ROOT / ".run" / "token", ROOT / ".run" / "image") if not path.exists()]
    image_existed = bool(docker_client.images.list(name=IMAGE))
    log_path = tmp_path / "make-run.log"
    agent = None
    try:
        setup = run_script("\n".join(blocks[:server]), env)
        assert setup.returncode == 0, setup.stderr
        assert docker_client.images.get(IMAGE)

        with open(log_path, "w") as log:
            agent = subprocess.Popen(
                ["bash", "-euo", "pipefail", "-c", blocks[server]],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        assert wait_for(lambda: agent.poll() is not None or f"listening on http://127.0.0.1:{port}" in log_path.read_text(), timeout=60)
        assert agent.poll() is None, log_path.read_text()[-3000:]

        requests_script = "\n".join(blocks[server + 1:]).replace(README_ADDRESS, f"127.0.0.1:{port}")
        result = run_script(requests_script, env)
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert '"status":"healthy"' in out.replace(" ", "")
        assert re.search(r'"container_id":\s*"[0-9a-f]{64}"', out), out
        assert '"claim_id":"demo"' in out.replace(" ", "") and '"status":"running"' in out.replace(" ", "")
        [visible] = re.findall(r"^NVIDIA_VISIBLE_DEVICES=(.*)$", out, flags=re.MULTILINE)
        assert len(visible.split(",")) == 2 and all(uuid.startswith("GPU-fake-") for uuid in visible.split(","))
        gpu_rows = [line for line in out.splitlines() if re.match(r"\d+\s+GPU-fake-", line)]
        assert len(gpu_rows) == 8, out
        held = [line for line in gpu_rows if re.search(r"\sallocated\s+demo\s", line)]
        assert len(held) == 2 and {re.search(r"GPU-fake-\S+", line).group() for line in held} == set(visible.split(","))
        assert out.rstrip().splitlines()[-1] == "204"
        assert not docker_client.containers.list(all=True, filters={"name": f"^/{CONTAINER}$"})
    finally:
        if agent is not None and agent.poll() is None:
            os.killpg(agent.pid, signal.SIGINT)  # Ctrl-C in the agent's shell
            try:
                agent.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait(10)
        try:
            docker_client.containers.get(CONTAINER).remove(force=True)
        except docker.errors.NotFound:
            pass
        if not image_existed:
            remove_images(docker_client, [IMAGE])
        for path in reversed(made_here):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
    assert (tmp_path / "state" / "agent.lock").read_text() == "", "Ctrl-C stopped the agent cleanly"


def pages() -> list:
    """The README and every Markdown page of docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def _without_code(text: str) -> str:
    """`text` without its fenced blocks and inline code, where a `#` or `](` is no heading or link."""
    text = re.sub(r"^```.*?^```$", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`(?:[^`\n]|\n(?!\s*\n))*`", "", text)  # a code span may go on over a line break


def relative_links(page) -> list[str]:
    """The targets of the page's links and images that are not URLs, as written."""
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _without_code(page.read_text()))
    return [target for target in targets if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def anchors(page) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*$", _without_code(page.read_text()), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_readme_is_a_front_door():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/"


def test_every_file_of_docs_is_linked():
    readme_links = {(README.parent / target.partition("#")[0]).resolve() for target in relative_links(README)}
    doc_links = {(page.parent / target.partition("#")[0]).resolve() for page in pages() for target in relative_links(page)}
    files = [path for path in sorted(DOCS.rglob("*")) if path.is_file()]
    assert files
    unlinked_pages = [str(path.relative_to(ROOT)) for path in files if path.suffix == ".md" and path.resolve() not in readme_links]
    assert not unlinked_pages, f"README.md links none of {unlinked_pages}"
    unlinked = [str(path.relative_to(ROOT)) for path in files if path.resolve() not in doc_links]
    assert not unlinked, f"no page links {unlinked}"


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    broken = []
    for page in pages():
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken
