"""Moved to the pretextlab.training package; this name stays for scripts written against it."""

from pretextlab.training import *  # noqa: F401,F403
from pretextlab.training import __all__  # noqa: F401
