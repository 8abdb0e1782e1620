"""Instances as processes: roles, control-plane messages, deployments (docs/structures.md)."""
