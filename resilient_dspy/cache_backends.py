"""Deprecated alias of :mod:`resilient_dspy.middleware.cache.backends` (and ``.serializer``); removed next release."""

from resilient_dspy._moved import alias
from resilient_dspy.middleware.cache.backends import *  # noqa: F403
from resilient_dspy.middleware.cache.serializer import *  # noqa: F403

alias(__name__)
