"""The errors a user can fix: the CLI prints them as one line and exits 1 (3 for missed targets).

Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, configuration or environment, explained in the message."""


class ConfigError(UserError, ValueError):
    """A config file, option or value is invalid."""
