"""Deprecated alias of :mod:`resilient_dspy.binding` (split into targets, shape, usage, settings, lm_identity)."""

from resilient_dspy._moved import alias
from resilient_dspy.binding.lm_identity import *  # noqa: F403
from resilient_dspy.binding.settings import *  # noqa: F403
from resilient_dspy.binding.shape import *  # noqa: F403
from resilient_dspy.binding.targets import *  # noqa: F403
from resilient_dspy.binding.usage import *  # noqa: F403
from resilient_dspy.core.pipeline import *  # noqa: F403

alias(__name__)
