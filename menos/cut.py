"""Where a client's model is cut: blocks on the client before and after the server's range."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cut:
    """``head`` blocks on the client, then the server's, then ``tail`` on the client again."""

    layers: int  # decoder blocks in the whole model
    head: int
    tail: int

    def __post_init__(self):
        if self.head < 0 or self.tail < 0:
            raise ValueError("head_layers and tail_layers must be >= 0")
        if self.head + self.tail >= self.layers:
            raise ValueError(
                f"head_layers + tail_layers = {self.head + self.tail} leaves no block for the server "
                f"(model has {self.layers})"
            )

    @classmethod
    def around(cls, layers: int, server_layers: tuple[int, int]) -> "Cut":
        """The cut whose server range is ``[start, stop)`` (as a Welcome names it)."""
        start, stop = server_layers
        return cls(layers, start, layers - stop)

    @property
    def head_blocks(self) -> range:
        return range(0, self.head)

    @property
    def server_blocks(self) -> range:
        return range(self.head, self.layers - self.tail)

    @property
    def tail_blocks(self) -> range:
        return range(self.layers - self.tail, self.layers)

    @property
    def server_layers(self) -> tuple[int, int]:
        return (self.server_blocks.start, self.server_blocks.stop)

    @property
    def client_blocks(self) -> tuple[int, ...]:
        return (*self.head_blocks, *self.tail_blocks)
