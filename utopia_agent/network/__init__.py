"""Tenant networks: the claims' own bridge network and the firewall rules that isolate it."""
