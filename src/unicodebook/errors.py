"""The one exception type users see.

Anything raised as :class:`UnicodebookError` is a problem with the user's input (a file, a
config, a checkpoint) rather than a bug; the CLI prints it as a single ``error: …`` line and
exits non-zero.
"""


class UnicodebookError(Exception):
    """A user-facing error: bad input, config or checkpoint. Message is one line."""


class ConfigError(UnicodebookError):
    """An unknown key, a wrong type or an invalid value in a run configuration."""


class TrainingStopped(UnicodebookError):
    """A training run that SIGTERM stopped after it saved a checkpoint (the CLI exits 143)."""


class BadImageError(UnicodebookError):
    """An image file that cannot be read, or whose mode or size cannot be accepted."""
