"""Errors the user can fix: reported as one line on stderr, exit code 2."""


class UserError(Exception):
    """Bad input or usage: the message is shown as ``error: <message>``."""
