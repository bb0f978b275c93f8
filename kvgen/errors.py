"""The one exception type kvgen raises for bad input; the CLI turns it into a one-line error."""


class KvgenError(Exception):
    """A problem with the user's input: a file, a field, a value. The message names it."""
