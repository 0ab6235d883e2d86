"""Utopia node agent: starts Docker containers with exclusive GPUs for claims."""

__version__ = "0.1.0"
