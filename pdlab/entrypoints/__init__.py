"""Serving front ends that put a network API in front of engine instances (FastDeploy's `entrypoints`)."""
