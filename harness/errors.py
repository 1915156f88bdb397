"""The one exception type for user mistakes.

A UserError ends the program with its message on one line and exit status 2, no traceback
(docs/contracts.md, "Errors"). Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: bad config, unknown name, malformed or missing data."""

    exit_code = 2
