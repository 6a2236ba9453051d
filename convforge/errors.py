"""The one exception type for mistakes a user can fix.

Every part raises :class:`UserError` for bad input (an unknown model name, a
missing file, an option out of range). Its message is one line that names what
was wrong and what is accepted; the CLI prints it and exits with status 2
instead of showing a traceback. Anything else that escapes is a bug and keeps
its traceback. This module imports nothing, so every part may use it.
"""


class UserError(ValueError):
    """Bad input from the user; the message is shown as-is on one line."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of ``error``'s message, or its type's name when it has none
    (for a one-line message built from a library's multi-line or empty exception)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def check_choice(kind: str, value: str, choices) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a UserError listing them."""
    if value not in choices:
        raise UserError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")
    return value


def check_int(kind: str, value, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum`` (bools are not), else a UserError."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or value < minimum:
        need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise UserError(f"{kind} must be {need}, got {value!r}")
    return int(value)
