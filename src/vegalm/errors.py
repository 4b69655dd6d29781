"""User-facing errors. The CLI prints these as one line (no traceback unless --debug)."""


class VegaError(Exception):
    """A mistake in the user's input: a path, a file's contents, a recipe key. Message names file:line or key."""
