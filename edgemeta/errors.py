"""The one exception type that reaches users as a one-line message."""


class EdgemetaError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback
    (unless ``--debug``). Anything else escaping the library is a bug in edgemeta.
    """


def denied(path, doing: str) -> EdgemetaError:
    """The one message for a permission problem: whose the file is and who asked, never "damaged",
    never advice that would discard it."""
    import os
    import pwd  # (edgemeta runs on Linux and macOS: boards and hosts alike)
    import stat

    def name(uid: int) -> str:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return f"uid {uid}"

    try:
        st = os.stat(path)
        whose = f"owned by {name(st.st_uid)}, {stat.filemode(st.st_mode)}"
    except OSError:
        whose = "a folder above it is not open to you"
    me = name(os.geteuid())
    return EdgemetaError(f"permission denied to {doing} {path} ({whose}; this is {me}): run as its owner, or give {me} "
                         "access (chown, chmod or the group); nothing was changed")
