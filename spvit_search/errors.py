"""The one base class of every error a user can cause (bad input, unreachable device, ...).

The CLI turns these into a one-line message and a non-zero exit code; anything else is a bug
and keeps its traceback.
"""


class SpvitError(Exception):
    """An error in what the user asked for, with a message that says what and where."""
