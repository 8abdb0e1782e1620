"""Backends that serve a workload and return per-request records (real engines now; the simulator later)."""
