"""The one user-facing error type."""


class LowbitError(ValueError):
    """Bad user input or a state the user can fix. The message names the file, field and fix.

    The CLI prints the message as one paragraph and exits with code 2, without a traceback.
    """
