"""Exceptions the client library raises."""

from __future__ import annotations


class MenosError(RuntimeError):
    """An error reported by the server, with its machine-readable ``code`` (messages.ErrorCode)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message

    def __reduce__(self):  # picklable (multiprocessing hands errors back from client processes)
        return MenosError, (self.code, self.message)


class MenosTimeout(MenosError):
    """The server did not answer in time."""

    def __init__(self, message: str):
        super().__init__("timeout", message)

    def __reduce__(self):
        return MenosTimeout, (self.message,)
