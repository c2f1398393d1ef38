"""The ``resilient-dspy`` command line (an application on top of the library and its test kit): ``demo``,
``chaos-server`` and ``chaos``; see docs/architecture.md."""

from resilient_dspy.cli.app import fail, main

__all__ = ["fail", "main"]
