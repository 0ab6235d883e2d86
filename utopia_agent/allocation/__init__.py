"""Deciding under the node's allocation lock: the allocator, the node's policy, and the janitor that
tidies what a crash left behind."""
