"""The launcher's one error type: bad input or a refused cloud call, shown as one line, exit 2."""


class LauncherError(Exception):
    """A message for the user (which input, what was expected); never a traceback."""
