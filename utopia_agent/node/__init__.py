"""Node-wide state shared by the workers: the state dir and its files, drain, per-node roles,
system metrics, claim usage, and the schemas of GET /api/v1/metrics."""
