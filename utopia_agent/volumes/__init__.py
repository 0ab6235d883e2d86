"""Claim volumes: node-local volumes with a hard size, made, mounted and removed by the agent."""
