"""The two kinds of error the engine reports as one line: bad input (exit status 2) and a run that cannot go
on (exit status 1)."""


class InputError(Exception):
    """Bad user input: a missing path, a malformed or damaged file, an unknown id, a run in use.

    The message is one line naming the file (and line, where there is one) and what is wrong.
    """


class RunError(Exception):
    """A run that cannot go on through no fault of its input: training diverged, a write failed (a full
    disk). The message is one line naming where (stage, epoch and step; or the file) and what to do; what
    was written before stays intact, so ``--resume`` continues once the cause is gone."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when the message is empty): what a one-line
    report says of an error raised by another library."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
