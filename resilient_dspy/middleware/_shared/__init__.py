"""Helpers shared by several layers (partitions, error filters, bounded waits); one copy each.

See docs/architecture.md.
"""
