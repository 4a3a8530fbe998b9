"""The one exception type whose message is meant for a person."""


class UserError(Exception):
    """A bad input or state that the user can fix; its message is one human line.

    The CLI prints it to stderr and exits non-zero; the app shows it with `st.error`.
    Anything else escaping the engine is a bug.
    """


def run_script(main) -> None:
    """Run a script's `main()` as the command line runs a command: a UserError ends it with its one
    line on stderr ("error: ...") and exit status 2, never a traceback."""
    import sys
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
