"""The node's changes, numbered, kept in the state dir and served as a stream."""
