"""Deprecated alias of :mod:`resilient_dspy.binding.estimate`; this old path is removed in the next release."""

from resilient_dspy._moved import alias
from resilient_dspy.binding.estimate import *  # noqa: F403

alias(__name__)
