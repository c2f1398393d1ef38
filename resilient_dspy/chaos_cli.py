"""Deprecated alias of :mod:`resilient_dspy.cli.chaos`; removed in the next release."""

import sys

from resilient_dspy._moved import alias
from resilient_dspy.cli.chaos import *  # noqa: F403
from resilient_dspy.cli.chaos import main

alias(__spec__.name if __spec__ is not None else __name__)  # run with -m, this module is __main__

if __name__ == "__main__":
    sys.exit(main())
