"""Errors a user can act on. The tools print them as one line and exit with status 2."""


class CrnnError(Exception):
    """Base class: the message says what is wrong, where, and what to do."""


class ConfigError(CrnnError):
    """A config file, key or value is wrong."""


class DataError(CrnnError):
    """A dataset, file, image or transcription cannot be used."""


class CheckpointError(CrnnError):
    """A checkpoint is missing, corrupt or from another project."""
