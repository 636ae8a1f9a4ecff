"""User-facing errors: the CLI prints them as one line on stderr and exits with status 2."""


class UserError(Exception):
    """A mistake in the user's input (paths, config keys, values); the message says what to do."""
