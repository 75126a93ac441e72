"""``python -m agent.cli``: the same as the ``cleanroom-agent`` script."""

import sys

from agent.cli import main

sys.exit(main())
