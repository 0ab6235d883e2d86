"""`python -m utopia_agent.cli`: the utopia-agent command."""

import sys

from . import main

sys.exit(main())
