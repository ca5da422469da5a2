"""The one error type users see for bad input: a message naming the field and the value."""


class ConfigError(ValueError):
    """Raised for bad recipes, overrides, data or world layouts, before any collective call.

    `splitlora_ds.train` prints it as a single line and exits non-zero on every rank.
    """
