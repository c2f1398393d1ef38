"""Deprecated alias of :mod:`resilient_dspy.core.health`; this old path is removed in the next release."""

from resilient_dspy._moved import alias
from resilient_dspy.core.health import *  # noqa: F403

alias(__name__)
