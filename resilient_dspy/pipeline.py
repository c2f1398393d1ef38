"""Deprecated alias of :mod:`resilient_dspy.core.pipeline`; this old path is removed in the next release."""

from resilient_dspy._moved import alias
from resilient_dspy.core.call import *  # noqa: F403
from resilient_dspy.core.pipeline import *  # noqa: F403

alias(__name__)
