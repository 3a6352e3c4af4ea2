"""The one exception family stage scripts turn into a clean, non-zero exit."""


class LmopsError(Exception):
    """A user-facing error: the message names the file, line or key at fault."""


class DataError(LmopsError):
    """Raw or intermediate data is missing, empty, binary, mis-encoded or misaligned."""


class QualityError(LmopsError):
    """A Great Expectations check failed; the message summarises which and where."""


class DiskFullError(LmopsError):
    """An output could not be written: no space left, file size or quota limit reached."""

    def __init__(self, path: object, reason: str):
        self.path, self.reason = path, reason
        super().__init__(
            f"disk full writing {path}: {reason}; free some space (or raise the "
            "quota or file size limit) and rerun"
        )

    def __reduce__(self) -> tuple:  # survives pickling (worker processes)
        return type(self), (self.path, self.reason)
