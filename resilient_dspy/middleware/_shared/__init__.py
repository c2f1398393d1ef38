"""Helpers shared by several layers (partitions, error filters); one copy each. See docs/architecture.md."""
