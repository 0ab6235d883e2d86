"""The floor of the stack for `make bench`: an app that does nothing, under the agent's own gunicorn.conf.py.

Served as `gunicorn -c gunicorn.conf.py benchmarks.bare_app:app`, it has the agent's workers,
gthread threads and keep-alive, and answers every request with a /health-sized JSON body. What
/health and GET one container cost above it is the agent's own work.
"""

import json
import time


def app(environ, start_response):
    timestamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body = json.dumps({"status": "healthy", "timestamp": timestamp}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
