"""Exception types.  Every error a user can cause derives from DistmlipError; the CLI prints
its message (which names the file, structure and field) and exits non-zero without a traceback."""


class DistmlipError(Exception):
    """Base class for errors caused by input, configuration or environment."""


class ConfigError(DistmlipError):
    """Invalid configuration file or option (unknown key, wrong type, bad value)."""


class InputError(DistmlipError):
    """Invalid input data: malformed file, non-finite value, overlapping atoms, ..."""


class DataFormatError(DistmlipError):
    """An HDF5 data set, model or checkpoint that is corrupt, truncated or of a wrong version."""


class DistributedError(DistmlipError):
    """The parallel environment is inconsistent (e.g. more local ranks than GPUs, a launcher
    whose rank variables cannot be read)."""


class StorageError(DistmlipError):
    """A file could not be written or read back: disk full, quota, read-only folder, missing
    permission.  The message names the path and the system's reason."""


class NonFiniteError(DistmlipError):
    """Training produced non-finite values (loss, gradients or parameters)."""


class LockedError(DistmlipError):
    """Another job holds the output folder."""
