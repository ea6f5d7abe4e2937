"""The one named logger of phantom_core (library code logs, never prints)."""

import logging

logger = logging.getLogger("phantom")
