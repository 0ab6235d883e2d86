"""Logs, the request log and Prometheus."""
