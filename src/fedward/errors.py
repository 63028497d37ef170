"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class FedwardError(Exception):
    """Bad input: a flag, a config key, a file or a checkpoint that is not what was expected.

    The message names the bad thing and what was expected, in one line.
    """


class ConfigError(FedwardError):
    """A config key or command-line flag has a bad value."""


class DataError(FedwardError):
    """A data file, row or column is missing or wrong."""


class CheckpointError(FedwardError):
    """A checkpoint or weights file does not fit the model or the run."""
