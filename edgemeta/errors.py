"""The one exception type that reaches users as a one-line message."""


class EdgemetaError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback
    (unless ``--debug``). Anything else escaping the library is a bug in edgemeta.
    """
