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


class ConfigErrors(ConfigError):
    """Several invalid settings, all reported at once. Exit code 2.

    ``errors`` holds every :class:`ConfigError`; ``field``, ``problem`` and ``fix`` are those of the
    first, so code that handles one ConfigError keeps working.
    """

    def __init__(self, errors: list[ConfigError]):
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.field, first.problem, first.fix)
        lines = [str(e) for e in self.errors]
        self.args = (f"{len(lines)} invalid settings:\n  " + "\n  ".join(lines),)


def raise_all(errors: list[ConfigError]) -> None:
    """Raise nothing for no error, the error itself for one, :class:`ConfigErrors` for several."""
    flat = [e for err in errors for e in (err.errors if isinstance(err, ConfigErrors) else [err])]
    if len(flat) == 1:
        raise flat[0]
    if flat:
        raise ConfigErrors(flat)
