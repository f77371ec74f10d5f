"""User-facing errors: a message that names the file, row or config key and what was expected."""


class LoralabError(Exception):
    """An error caused by the user's input; the CLI prints it without a traceback."""


class DataError(LoralabError):
    """A dataset file that cannot be read or does not have the expected shape."""


class ConfigError(LoralabError):
    """A config key or value that does not validate."""
