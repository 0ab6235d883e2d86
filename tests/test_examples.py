"""The README's training job: the request it shows is one the agent accepts.

The job itself needs a PyTorch image, which a machine without the internet cannot get, so
here it is compiled and its request checked against the agent's own schema, not run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.support.agent import ROOT
from utopia_agent.schemas import MAX_STRING, CreateContainerSchema, load_request

SCRIPT = ROOT / "examples" / "train.py"


def readme_request() -> dict:
    """Run the README's `python3 -c '...'` that builds the create body, from the checkout's root."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"python3 -c '(import json; print\(json\.dumps\(.*?\)\))' \\", readme)
    assert match, "the README shows how the training job's request is built"
    output = subprocess.run([sys.executable, "-c", match.group(1)], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(output)


def test_the_training_job_fits_one_command_item_and_compiles():
    source = SCRIPT.read_text()
    assert len(source) <= MAX_STRING, f"{len(source)} characters: `python -c` takes one command item"
    compile(source, str(SCRIPT), "exec")


def test_the_readme_request_runs_the_script_and_is_valid():
    body = readme_request()
    assert body["command"] == ["python", "-c", SCRIPT.read_text()]
    request = load_request(CreateContainerSchema(), body)
    assert request["gpu_count"] == 1 and request["restart_policy"] == "no"
