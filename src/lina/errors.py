"""Errors that the command line turns into a clear message and an exit code, never a traceback."""


class LinaError(Exception):
    """A problem the user can fix; the message says what and how. Exit code 1."""

    exit_code = 1


class ConfigError(LinaError):
    """An invalid setting, detected before any worker starts. Exit code 2.

    Args:
        field: the config field (or option) at fault, e.g. ``"top_k"``.
        problem: what is wrong with its value.
        fix: what to do instead.
    """

    exit_code = 2

    def __init__(self, field: str, problem: str, fix: str):
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"invalid {field}: {problem}. Fix: {fix}")
