"""The one exception type for user mistakes.

A UserError ends the program with its message on one line and exit status 2, no traceback
(docs/contracts.md, "Errors"). Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix: bad config, unknown name, malformed or missing data."""

    exit_code = 2


def brief(error: BaseException, limit: int = 200) -> str:
    """An exception from a library (torch, h5py, pickle) as a clause for a one-line message: its type and
    its first sentence, cut at `limit` characters (some say a paragraph)."""
    text = (str(error).strip().splitlines() or [""])[0]
    text = text.split(". ", 1)[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
