"""Deprecated alias of :mod:`resilient_dspy.middleware._shared.partitions`; removed in the next release."""

from resilient_dspy._moved import alias
from resilient_dspy.middleware._shared.partitions import *  # noqa: F403

alias(__name__)
