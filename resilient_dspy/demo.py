"""Deprecated alias of :mod:`resilient_dspy.cli.demo`; removed in the next release."""

from resilient_dspy._moved import alias
from resilient_dspy.cli.demo import *  # noqa: F403

alias(__name__)
