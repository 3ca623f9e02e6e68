"""One exception type for mistakes a user can fix, so the CLI can print them without a traceback."""


class UserError(Exception):
    """Bad input (file, row, field, config value or path); the message says what and where."""
