"""Session admission: whether a client's Hello starts a session, and on what terms.

Pure: the verdict depends only on the Hello, who sent it, the sessions open now and
the server's fixed facts; checkpoints are looked up through an injected function.
The manager's shell spawns the worker for an ``Admit``, parks a ``Wait``, and
answers a ``Refuse`` with its error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import msgspec

from manager.scheduler import TooLarge
from manager.sessions import Session, checkpoint_dir, server_steps
from menos import checkpoint
from menos.adapter_spec import position_offset
from menos.chain import blocks_text
from menos.codecs import Codec
from menos.adapter_spec import validate as validate_adapter
from menos.cut import Cut
from menos.estimator import estimate, vanilla_task_token, with_margin
from menos.messages import PROTOCOL_VERSION, ErrorCode, Hello
from menos.quantization import Quantization, adapter_problem
from menos.schedule import held_gradient_bytes
from menos.schedule import validate as validate_recipe


@dataclass(frozen=True)
class Admit:
    identity: str  # "" for an anonymous client
    cut: Cut
    m_f: int  # estimated tokens (the worker's profile replaces them)
    m_b: int
    resume_step: int = -1


@dataclass(frozen=True)
class Wait:
    """The identity's previous session is writing its last checkpoint: answer once it exits."""

    previous: Session


@dataclass(frozen=True)
class Refuse:
    code: ErrorCode
    message: str


Verdict = Admit | Wait | Refuse


def demand(config, hello: Hello, elem_bytes: int,
           quantization: Quantization = Quantization.NONE) -> tuple[Cut, int, int, int]:  # fmt: skip
    """(cut, M_f token, M_b token, standing bytes) the estimator predicts for ``hello``'s
    client: what admission checks here and a cluster's gateway places by. ValueError for a
    cut the model cannot have."""
    cut = Cut(config.num_hidden_layers, hello.head_layers, hello.tail_layers)
    est = estimate(config, cut.head, cut.tail, hello.batch_size, hello.seq_len, elem_bytes, hello.adapter,
                   quantization.value)  # fmt: skip
    standing = est.standing + held_gradient_bytes(hello.recipe, est.adapter_weights)
    return cut, with_margin(est.m_f), with_margin(est.m_b), standing


def shape_key(hello: Hello) -> bytes:
    """What a session's memory profile depends on: sessions alike in it profile alike (a later
    one's worker takes an earlier one's profile instead of measuring it again)."""
    return msgspec.json.encode((hello.head_layers, hello.tail_layers, hello.adapter, hello.batch_size, hello.seq_len,
                                hello.recipe, hello.compression))  # fmt: skip


@dataclass
class Admission:
    """This server's terms; ``admit`` applies them to one Hello."""

    config: object  # the base model's transformers config
    elem_bytes: int  # bytes per base weight
    check: Callable[[int], None]  # the scheduler's: raises TooLarge for a token that can never be granted
    room_for: Callable[[int, int], bool]  # the scheduler's: one more session's standing memory still fits
    state_dir: str
    max_clients: int
    vanilla: bool = False
    block_bytes: Callable[[range], int] | None = None  # vanilla: base bytes of a server range
    steps_of: Callable[[str], list[int]] = checkpoint.steps  # checkpoints in a directory
    codecs: frozenset = frozenset(Codec)  # the cut-layer codecs clients may declare
    min_head: int = 0  # blocks a client must keep before the server's range (the block holds none below)
    stop: int = 0  # the block after the last this server holds (0: the model's last); a chain's stage holds fewer
    quantization: Quantization = Quantization.NONE  # how the block's Linears are stored (menos.quantization)

    def admit(self, hello: Hello, user: str | None, sessions: Iterable[Session], connected: bool) -> Verdict:
        """``user``: the authenticated key (CURVE) or None; ``connected``: this connection has a session."""
        sessions = list(sessions)
        if connected:
            return Refuse(ErrorCode.BAD_REQUEST, "this connection already has a session")
        if len(sessions) >= self.max_clients:
            return Refuse(ErrorCode.BAD_REQUEST, f"the server is full ({self.max_clients} sessions)")
        identity = user or hello.identity  # an authenticated key wins over a claimed name
        previous = next((s for s in sessions if identity and s.identity == identity), None)
        if previous is not None:
            if previous.ended and previous.successor is None:
                return Wait(previous)
            return Refuse(ErrorCode.BAD_REQUEST, "this identity already has a session")
        if hello.protocol != PROTOCOL_VERSION:
            return Refuse(ErrorCode.BAD_REQUEST, f"protocol {hello.protocol}, server speaks {PROTOCOL_VERSION}: the "
                          "client and the server are different Menos releases; install the same one on both")  # fmt: skip
        try:
            validate_adapter(hello.adapter)
            validate_recipe(hello.recipe)
        except ValueError as exc:
            return Refuse(ErrorCode.BAD_REQUEST, str(exc))
        problem = adapter_problem(self.quantization, hello.adapter)
        if problem:
            return Refuse(ErrorCode.BAD_REQUEST, problem)
        if hello.compression not in self.codecs:
            allowed = ", ".join(sorted(c.value for c in self.codecs))
            return Refuse(ErrorCode.BAD_REQUEST, f"compression {hello.compression.value!r} is not allowed here ({allowed})")
        if hello.head_layers < self.min_head:
            return Refuse(ErrorCode.BAD_REQUEST, f"head_layers={hello.head_layers}: this server runs no block below "
                          f"{self.min_head} (--min-head-layers {self.min_head}): keep at least {self.min_head} on the client")  # fmt: skip
        layers = self.config.num_hidden_layers
        if self.stop and layers - hello.tail_layers > self.stop:
            return Refuse(ErrorCode.BAD_REQUEST, f"tail_layers={hello.tail_layers}: this server is one stage of a "
                          f"chain and holds blocks {blocks_text((self.min_head, self.stop))} (--blocks {self.min_head}:"
                          f"{self.stop}): keep at least {layers - self.stop} after it, on the client or on the "
                          "next stages (menos.connect([...]) with every stage's endpoint)")  # fmt: skip
        max_pos = getattr(self.config, "max_position_embeddings", None) or hello.seq_len
        virtual = position_offset(hello.adapter)  # prefix tuning: the real tokens start after the prefix
        if not (0 < hello.batch_size and 0 < hello.seq_len <= max_pos - virtual):
            extra = f" with {virtual} virtual tokens" if virtual else ""
            return Refuse(ErrorCode.BAD_REQUEST, f"batch_size must be > 0 and seq_len in 1..{max_pos - virtual}{extra}")
        try:
            cut, m_f, m_b, standing = demand(self.config, hello, self.elem_bytes, self.quantization)
            if self.vanilla:  # one token for the whole task: its own blocks too
                m_f = m_b = vanilla_task_token(self.block_bytes(cut.server_blocks), m_b)
            self.check(m_b)
            if not self.room_for(standing, m_b):
                raise TooLarge(f"with its standing memory ({standing} bytes: adapter, optimizer, kept "
                               "input, held gradients) does not fit beside the sessions' standing memory")  # fmt: skip
        except TooLarge as exc:
            return Refuse(ErrorCode.TOO_LARGE, f"a backward of this client {exc}; lower batch_size or seq_len")
        except ValueError as exc:
            return Refuse(ErrorCode.BAD_REQUEST, str(exc))
        resume_step = -1
        if hello.resume_steps:
            saved = server_steps(checkpoint_dir(self.state_dir, identity), self.steps_of) if identity else []
            common = set(hello.resume_steps) & set(saved)
            if not common:
                return Refuse(
                    ErrorCode.NO_CHECKPOINT,
                    f"no server checkpoint matches the client's steps {sorted(hello.resume_steps)} "
                    f"(server has {saved if identity else 'none: resuming needs an identity'})",
                )
            resume_step = max(common)
        return Admit(identity, cut, m_f, m_b, resume_step)
