"""Claims' container disks: the node's allocatable disk as the engine sees it, how sizes are
enforced (by the engine's storage driver, or by measuring), and the measurements."""
