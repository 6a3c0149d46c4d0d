"""Errors that reach users: one line that names the file, key or value at fault."""


class FP8LMError(Exception):
    """A problem with the user's input or environment. The CLI prints it on one line and exits 2."""


class ModelLoadError(FP8LMError):
    """A model folder or file that cannot be loaded (missing, corrupt, unsupported)."""


class EngineDeadError(FP8LMError):
    """The engine stopped (a step hung or failed) and cannot serve further requests. `public`: what
    a server may tell its clients (no exception text); the message itself goes to the log."""

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public or message
