"""Node-wide state shared by the workers: the state dir and its files, drain, per-node roles,
system metrics and claim usage."""
