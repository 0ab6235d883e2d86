"""The engine layer: the only code that imports docker (connection, error mapping, container config,
the manager, logs, and the node view with its event watcher)."""
