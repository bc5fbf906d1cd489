import pathlib
import re
import subprocess
import sys

import msgspec
import pytest
import torch

from menos import wire
from menos.messages import Activations, Forward, Header, Hello, LoraSpec, TensorMeta


@pytest.mark.parametrize("name", wire.DTYPE_NAMES)
def test_roundtrip_every_dtype(name):
    dtype = wire.dtype_from_name(name)
    t = (torch.randn(2, 3, 5) * 100).to(dtype)
    msg, (back,) = wire.decode(wire.encode(Forward(step=7, train=True), [t]))
    assert msg == Forward(step=7, train=True)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)
    back += 1  # decoded tensors are writable and do not alias the frame


def test_roundtrip_non_contiguous_and_empty():
    t = torch.randn(4, 6).t()
    e = torch.empty(0, 3)
    _, (a, b) = wire.decode(wire.encode(Activations(step=1), [t, e]))
    assert torch.equal(a, t) and b.shape == (0, 3)


def test_nested_structs_roundtrip():
    hello = Hello(head_layers=2, tail_layers=1, adapter=LoraSpec(r=4, alpha=8, target_modules=("q_proj",)))
    msg, tensors = wire.decode(wire.encode(hello))
    assert msg == hello and tensors == []


def _raw(msg_dict, metas=()):
    return msgspec.msgpack.encode({"msg": msg_dict, "tensors": [list(m) for m in metas]})


@pytest.mark.parametrize(
    "frames, why",
    [
        ([b"\xc1garbage"], "malformed"),
        ([_raw({"type": "no_such_type"})], "malformed"),
        ([_raw({"type": "forward", "step": "one", "train": True})], "malformed"),
        ([_raw({"type": "forward", "train": True})], "malformed"),  # missing field
        ([_raw({"type": "forward", "step": 1, "train": True, "extra": 1})], "malformed"),
        ([_raw({"type": "forward", "step": 1, "train": True}, [("float32", (2, 2))])], "declares 1"),
        ([_raw({"type": "forward", "step": 1, "train": True}, [("float32", (2, 2))]), b"x" * 15], "needs 16"),
        ([_raw({"type": "forward", "step": 1, "train": True}, [("complex64", (1,))]), b"x" * 8], "unknown dtype"),
        ([_raw({"type": "forward", "step": 1, "train": True}, [("float32", (1 << 40, 1 << 40))]), b"x" * 4], "needs"),
        ([_raw({"type": "forward", "step": 1, "train": True}, [("float32", (-1, 4))]), b""], "invalid shape"),
        ([], "empty"),
    ],
)
def test_malformed_messages_raise_wire_error(frames, why):
    with pytest.raises(wire.WireError, match=why):
        wire.decode(frames)


def test_header_schema_matches_encoder():
    frames = wire.encode(Forward(step=1, train=False), [torch.zeros(2)])
    header = msgspec.msgpack.decode(frames[0], type=Header)
    assert header.tensors == (TensorMeta("float32", (2,)),)


def test_no_pickle_on_any_network_path():
    """The wire never unpickles: no module of ours imports pickle or uses torch.load on bytes."""
    root = pathlib.Path(__file__).resolve().parents[1]
    pattern = re.compile(r"\b(import pickle|from pickle|cPickle|dill|ForkingPickler|torch\.load|pickle\.loads)\b")
    offenders = [
        f"{p.relative_to(root)}:{i}"
        for pkg in ("menos", "manager", "worker")
        for p in (root / pkg).rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_messages_are_built_by_keyword_only():
    with pytest.raises(TypeError):
        Forward(1, True)  # a positional field would shift silently when one is added


def test_protocol_modules_load_without_torch():
    """menos.wire, menos.messages, menos.keys and `import menos` stay light: no torch,
    transformers or peft until a tensor or the client library is used."""
    code = (
        "import sys, menos, menos.wire, menos.messages, menos.keys, menos.channel, menos.estimator, "
        "manager.cli, manager.status_view\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_pipe_messages_roundtrip_and_refuse_oversized():
    import io

    from menos.messages import SpawnWorker, WorkerSpawned

    buf = io.BytesIO()
    wire.write_message(buf, SpawnWorker(manager="ipc:///x", session="ab", manager_pid=7))
    wire.write_message(buf, WorkerSpawned(pid=9))
    buf.seek(0)
    assert wire.read_message(buf) == SpawnWorker(manager="ipc:///x", session="ab", manager_pid=7)
    assert wire.read_message(buf) == WorkerSpawned(pid=9)
    assert wire.read_message(buf) is None  # end of stream
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.read_message(io.BytesIO(b"\xff\xff\xff\xff"))


def test_every_message_type_travels():
    """A message type left out of the wire's union cannot be decoded: the first peer to receive
    one would take it for a malformed header."""
    import typing

    from menos import messages
    from menos.message_base import _Msg

    def every(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from every(sub)

    defined = {c for c in every(_Msg) if c.__module__.startswith("menos.") and c.__struct_config__.tag is not None}
    assert {messages.Hello, messages.Chain, messages.SpawnWorker} <= defined
    assert defined - set(typing.get_args(messages.Message)) == set()
