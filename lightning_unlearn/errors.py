"""One exception type for mistakes a user can fix, so the CLI can print them without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (file, row, field, config value or path); the message says what and where."""


class ConfigError(UserError, ValueError):
    """A config value out of its range (the message names the key). Also a ValueError, so code that
    validates values and catches ValueError keeps working."""


def brief(error: BaseException) -> str:
    """The informative line of a library's error, for a one-line message: transformers and peft
    errors run to pages (load reports, every supported class), with the line that matters (a size
    mismatch, a module not found) somewhere inside."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = next((x for x in lines if "mismatch" in x.lower() or "not found" in x.lower()), lines[0])
    return line if len(line) <= 300 else line[:297] + "..."


def find_user_error(error: BaseException) -> UserError | None:
    """The UserError that caused ``error``, if any.

    jsonargparse instantiates config classes inside its own type checks and re-raises what their
    constructors raise as a ValueError (``Does not validate against any of the Union subtypes``),
    keeping the original only as ``__cause__``. The CLI looks through that chain so a bad config
    value still prints as our one line, not as jsonargparse's dump of the whole namespace.
    """
    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        stack.extend(e for e in (current.__context__, current.__cause__) if e is not None)
    return None
