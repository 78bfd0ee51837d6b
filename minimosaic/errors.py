"""User-facing errors.

A `MinimosaicError` is a mistake the user can fix (a missing file, a config that cannot work, a GPU
asked for where none is). Its message is one line: what is wrong and what to do. The CLI prints it and
exits with code 2; programming errors stay ordinary exceptions with a traceback.
"""


class MinimosaicError(Exception):
    """A user error with a one-line message saying what is wrong and how to fix it."""
