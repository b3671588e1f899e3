"""The one exception type users see for bad input: it names the problem and the fix."""


class PretextlabError(ValueError):
    """Bad input or an impossible configuration; the message says what is wrong and how to fix it."""
