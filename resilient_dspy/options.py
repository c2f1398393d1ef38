"""Deprecated alias of :mod:`resilient_dspy.core.options`; this old path is removed in the next release."""

from resilient_dspy._moved import alias
from resilient_dspy.core.options import *  # noqa: F403

alias(__name__)
