"""The errors a user can fix: the CLI prints them as one line and exits 1 (3 for missed targets, 4 for bad
input that a retry cannot mend).

Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input, configuration or environment, explained in the message."""


class ConfigError(UserError, ValueError):
    """A config file, option or value is invalid."""


class BadInput(UserError):
    """The input itself is wrong (a malformed line, data too small for its targets, a diverging loss, a
    refused key): rerunning the same step on it fails the same way, so the CLI exits 4 and Argo does not retry."""
