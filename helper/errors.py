"""The one exception type for mistakes a user can fix (bad flag, missing file, wrong checkpoint).

The CLIs catch it, print one line on stderr and exit with code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
