"""The one exception type whose message is meant for a person."""


class UserError(Exception):
    """A bad input or state that the user can fix; its message is one human line.

    The CLI prints it to stderr and exits non-zero; the app shows it with `st.error`.
    Anything else escaping the engine is a bug.
    """
