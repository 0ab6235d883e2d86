"""The agent's gunicorn.conf.py, with each worker pausing right after its fork, before its own signal
handlers are in place, for UTOPIA_TEST_FORK_PAUSE seconds: a SIGHUP that a reload sends then is the
one a worker forked during a certificate reload gets (tests/test_tls.py)."""

import os
import time
from pathlib import Path

_agent_config = Path(__file__).resolve().parents[2] / "gunicorn.conf.py"
exec(compile(_agent_config.read_text(), str(_agent_config), "exec"))
_agent_post_fork = globals()["post_fork"]


def post_fork(server, worker):  # noqa: F811 (wraps the agent's)
    _agent_post_fork(server, worker)
    time.sleep(float(os.environ.get("UTOPIA_TEST_FORK_PAUSE", "0")))
