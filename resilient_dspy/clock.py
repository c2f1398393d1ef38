"""Deprecated alias of :mod:`resilient_dspy.core.clock`; this old path is removed in the next release."""

from resilient_dspy._moved import alias
from resilient_dspy.core.clock import *  # noqa: F403

alias(__name__)
