"""``python -m resilient_dspy.cli``: the ``resilient-dspy`` command."""

import sys

from resilient_dspy.cli.app import main

if __name__ == "__main__":  # imported (a walk of the package's modules), it does nothing
    sys.exit(main())
