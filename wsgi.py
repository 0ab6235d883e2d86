"""The WSGI entry point gunicorn loads in each worker: `gunicorn -c gunicorn.conf.py wsgi:app`."""

import logging
import sys

from utopia_agent.app import create_app
from utopia_agent.config import ConfigError
from utopia_agent.gpus.inventory import GpuBackendError

try:
    app = create_app()
except (ConfigError, GpuBackendError) as error:
    logging.getLogger("utopia_agent").error("cannot start: %s", error)
    # Exit code 3 tells the gunicorn master that the worker cannot boot, so it stops instead of respawning.
    sys.exit(3)
