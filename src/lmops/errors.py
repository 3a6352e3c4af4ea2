"""The one exception family stage scripts turn into a clean, non-zero exit."""


class LmopsError(Exception):
    """A user-facing error: the message names the file, line or key at fault."""


class DataError(LmopsError):
    """Raw or intermediate data is missing, empty, binary, mis-encoded or misaligned."""


class QualityError(LmopsError):
    """A Great Expectations check failed; the message summarises which and where."""
