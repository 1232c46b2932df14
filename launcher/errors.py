"""The launcher's one error type: bad input or a refused cloud call, shown as one line, exit 2."""


class LauncherError(Exception):
    """A message for the user (which input, what was expected); never a traceback."""


class Interrupted(BaseException):
    """Ctrl-C in the launcher (`cli.run` raises it from SIGINT). Not a KeyboardInterrupt, which
    click turns into "Aborted!" and exit 1: it reaches `cli.run`, which says in one line what was
    stopped and exits 130. Every remote command of the moment is ended on its worker too."""
