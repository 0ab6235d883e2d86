"""The agent's own Prometheus figures: the counters, histograms and gauges its layers record.

Counters and histograms are written by every gunicorn worker into prometheus-client's
multiprocess directory (set by gunicorn.conf.py), so a scrape served by any worker adds up
all of them. The exposition, with the node's and the GPUs' gauges read at scrape time, is
api/prometheus.py's: it reads the whole node, so it stands above every layer it reads.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .metric_files import use_allocated_files

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Before the first metric below opens its file: a full state dir must not kill the worker.
use_allocated_files()

REQUEST_DURATION = Histogram(
    "utopia_agent_http_request_duration_seconds",
    "Time to answer an HTTP request, by route, method and status.",
    ["route", "method", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)
CREATES = Counter(
    "utopia_agent_container_creates_total",
    "Container creates by outcome: created, or the error code that refused or failed it.",
    ["outcome"],
)
DELETES = Counter("utopia_agent_container_deletes_total", "Managed containers deleted through the agent.")
PULL_DURATION = Histogram(
    "utopia_agent_image_pull_duration_seconds",
    "Time image pulls took, by outcome: ok, refused (the registry refused: credentials, no such image), failed.",
    ["outcome"],
    buckets=(0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800),
)
IMAGES_COLLECTED = Counter("utopia_agent_images_collected_total", "Unused pulled images removed by image collection.")

# Set by each worker when it loads its certificate (server/tls_reload.py); the soonest of the live
# workers' is what a scrape shows, so a worker still on an old certificate is never hidden.
TLS_CERTIFICATE_EXPIRY = Gauge(
    "utopia_agent_tls_certificate_expiry_seconds",
    "When the certificate the agent serves HTTPS with expires (Unix seconds); absent on plain HTTP.",
    ["cert_file"],
    multiprocess_mode="livemin",
)
# Registered one by one where no multiprocess directory sums them (a test's single process).
INSTRUMENTS = (REQUEST_DURATION, CREATES, DELETES, PULL_DURATION, TLS_CERTIFICATE_EXPIRY, IMAGES_COLLECTED)
