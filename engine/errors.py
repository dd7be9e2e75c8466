"""Errors caused by the user's input, reported by the CLI as one line with exit status 2."""


class InputError(Exception):
    """Bad user input: a missing path, a malformed file, an unknown id.

    The message is one line naming the file (and line, where there is one) and what is wrong.
    """
