"""Exceptions the client library raises."""

from __future__ import annotations

from menos.messages import ErrorCode


class MenosError(RuntimeError):
    """An error reported by the server, or found by the client library, with its
    machine-readable ``code`` (a ``menos.ErrorCode``)."""

    def __init__(self, code: ErrorCode | str, message: str):
        self.code = ErrorCode(code)
        self.message = message
        super().__init__(f"[{self.code.value}] {message}")

    def __reduce__(self):  # picklable (multiprocessing hands errors back from client processes)
        return type(self), (self.code.value, self.message)


class MenosTimeout(MenosError):
    """The server did not answer in time."""

    def __init__(self, code_or_message: str, message: str | None = None):
        # MenosTimeout(message), or (code, message) when unpickled
        super().__init__(ErrorCode.TIMEOUT, code_or_message if message is None else message)
