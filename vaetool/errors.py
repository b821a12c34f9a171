"""Errors the engine raises: one line each, saying what went wrong and what to do."""


class VaetoolError(Exception):
    """A failure the user can act on; the CLI prints it as one `error:` line."""


class DataError(VaetoolError):
    """An input file or folder that cannot be read or does not fit."""


class CheckpointError(VaetoolError):
    """A checkpoint that is missing, damaged, foreign or incompatible."""


class ConfigError(VaetoolError):
    """A configuration value that is out of range or unknown."""


class DivergenceError(VaetoolError):
    """Training produced a NaN or infinite loss."""


class OutputError(VaetoolError):
    """An output that cannot be written, or would destroy something."""


class StorageError(OutputError):
    """The output location takes no more writes (disk full, read-only): the whole batch stops, not one file."""
