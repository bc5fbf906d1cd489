"""The cut layer's codecs: round trips within their stated bounds, mismatched frames
refused, and clients with different codecs training at once on one manager."""

import threading
import time

import pytest
import torch

import menos
from menos import codecs
from menos.codecs import Codec, CodecError

CLIENT = dict(batch_size=2, seq_len=16, lr=1e-2, head_layers=1, tail_layers=1)


def _x(scale=3.0):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 64, generator=gen) * scale
    x[0, 0] = 0.0  # an all-zero row: its scale must still be finite and positive
    x[1, 1, 5] = 1e3  # an outlier: it sets its own row's scale only
    return x


def test_half_precision_round_trips_within_their_mantissa():
    x = _x()
    for codec, bits in ((Codec.BF16, 8), (Codec.FP16, 11)):
        frames = codecs.encode(x, codec)
        assert codecs.nbytes(frames) == x.numel() * 2
        y = codecs.decode(frames, codec, torch.float32)
        assert y.dtype == torch.float32 and y.shape == x.shape
        assert ((y - x).abs() <= x.abs() * 2.0**-bits + 1e-30).all(), codec


def test_int8_round_trips_within_half_a_step_per_row():
    x = _x()
    q, scale = codecs.encode(x, Codec.INT8)
    assert (q.dtype, scale.dtype, tuple(scale.shape)) == (torch.int8, torch.float32, (4, 32, 1))
    assert codecs.nbytes([q, scale]) == x.numel() + 4 * 4 * 32  # about a quarter of fp32 at H = 64
    y = codecs.decode([q, scale], Codec.INT8, torch.float32)
    bound = x.abs().amax(-1, keepdim=True) / 254 + 1e-6
    assert ((y - x).abs() <= bound).all()
    assert torch.equal(y[0, 0], torch.zeros(64)) and (scale > 0).all()
    assert (y[0, 1:] - x[0, 1:]).abs().max() < 0.1  # the outlier in row (1, 1) costs no other row precision
    assert codecs.decode(codecs.encode(x, Codec.NONE), Codec.NONE, torch.float32) is x


@pytest.mark.parametrize("frames, codec, words", [
    ([torch.zeros(2, 4, 8)], Codec.BF16, "expected torch.bfloat16"),
    ([torch.zeros(2, 4, 8, dtype=torch.bfloat16), torch.zeros(1)], Codec.BF16, "carries 1 tensor frame"),
    ([torch.zeros(2, 4, 8, dtype=torch.int8)], Codec.INT8, "carries 2 tensor frame"),
    ([torch.zeros(2, 4, 8, dtype=torch.int8), torch.zeros(2, 4, 1)], Codec.INT8, "not finite and positive"),
    ([torch.zeros(2, 4, 8, dtype=torch.int8), torch.full((2, 4, 1), float("nan"))], Codec.INT8, "not finite"),
    ([torch.zeros(2, 4, 8, dtype=torch.int8), torch.full((2, 4, 1), float("inf"))], Codec.INT8, "not finite"),
    ([torch.zeros(2, 4, 8, dtype=torch.int8), torch.ones(2, 3, 1)], Codec.INT8, "expected scales"),
    ([torch.zeros(2, 4, 8, dtype=torch.int8), torch.ones(2, 4, 1, dtype=torch.float16)], Codec.INT8, "float32"),
    ([torch.full((2, 4, 8), -128, dtype=torch.int8), torch.ones(2, 4, 1)], Codec.INT8, "-128"),
    ([torch.zeros(2, 4, 8, dtype=torch.float16), torch.ones(2, 4, 1)], Codec.INT8, "torch.int8"),
])  # fmt: skip
def test_frames_that_do_not_match_the_codec_are_refused(frames, codec, words):
    with pytest.raises(CodecError, match=words):
        codecs.decode(frames, codec, torch.float32)


def test_an_unknown_codec_is_refused_at_connect():
    with pytest.raises(ValueError, match="one of None, 'none', 'bf16', 'fp16', 'int8'"):
        menos.ClientConfig(compression="zip")


def _train(endpoint, codec, out):
    with menos.connect(endpoint, compression=codec, identity=f"codec-{codec}", seed=3, **CLIENT) as c:
        gen = torch.Generator().manual_seed(7)
        batches = [torch.randint(0, 128, (2, 16), generator=gen) for _ in range(4)]
        losses = [c.train_step(b) for b in batches * 3]
        (me,) = [s for s in menos.status(endpoint).clients if s.session == c.session]
        out[codec] = (losses, c.times.summary(), me.compression)


def test_clients_with_different_codecs_train_at_once(shared_manager):
    mgr = shared_manager("llama")
    out: dict = {}
    threads = [threading.Thread(target=_train, args=(mgr.endpoint, c, out)) for c in (None, "bf16", "fp16", "int8")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert set(out) == {None, "bf16", "fp16", "int8"}
    plain = out[None][0]
    for codec in ("bf16", "fp16", "int8"):
        losses = out[codec][0]
        assert losses[-1] < losses[0]  # it trains
        assert max(abs(a - b) for a, b in zip(losses, plain)) < 0.02 * plain[0], codec  # close to full precision
        assert losses != plain  # and the codec is really in use
    sent = {c: out[c][1]["bytes_sent"] for c in out}
    received = {c: out[c][1]["bytes_received"] for c in out}
    print(f"\nbytes per step, sent {sent}, received {received}")
    for way in (sent, received):  # headers included
        assert way["bf16"] < 0.6 * way[None] and way["int8"] < 0.4 * way[None]
    assert {c: out[c][2] for c in out} == {None: Codec.NONE, "bf16": Codec.BF16, "fp16": Codec.FP16, "int8": Codec.INT8}


class _LocalChannel:
    """The manager's side of menos.sections in-process, with a small chunk size."""

    def __init__(self, tensors, codec, chunk_bytes):
        self.tensors, self.codec, self.chunk_bytes, self.requests, self.bytes = tensors, codec, chunk_bytes, 0, 0

    def send(self, msg):
        from menos import sections

        self.requests += 1
        self.reply = sections.chunk(self.tensors, msg, self.codec, self.chunk_bytes)

    def recv(self, expect):
        msg, frames = self.reply
        if isinstance(msg, expect):
            self.bytes += sum(f.nbytes for f in frames)
            return msg, frames
        raise menos.MenosError(msg.code, msg.message)


@pytest.mark.parametrize("codec", [Codec.NONE, Codec.BF16, Codec.INT8])
def test_sections_arrive_in_chunks_of_whole_rows_exactly_or_in_16_bits(codec):
    from menos import sections
    from menos.messages import SectionRequest

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(37, 16, generator=g), torch.randn(16, generator=g), torch.randn(3, 5, 8, generator=g)]
    chan = _LocalChannel(tensors, codec, chunk_bytes=10 * 16 * 4)  # 10 rows of 16 floats a chunk
    got = sections.fetch(chan, sections.metas(tensors, codec), torch.float32, progress=False)
    # the chunk size counts bytes as sent: 37 rows in 10s (16 bits: in 20s); one row; 15 short rows at once
    assert chan.requests == (4 + 1 + 1 if codec is Codec.NONE else 2 + 1 + 1)
    for want, have in zip(tensors, got):
        if codec is Codec.NONE:
            assert torch.equal(want, have)
        else:  # bf16: 8 bits of mantissa
            torch.testing.assert_close(have, want, rtol=2**-8, atol=0)
    assert chan.bytes == sum(t.numel() for t in tensors) * (4 if codec is Codec.NONE else 2)
    error, _ = sections.chunk(tensors, SectionRequest(index=3, row=0), codec)
    assert error.code.value == "bad_request" and "there are 3" in error.message
    error, _ = sections.chunk(tensors, SectionRequest(index=0, row=37), codec)
    assert "37 rows" in error.message


def test_a_join_over_a_slow_link_outlasts_the_client_timeout(start_manager, checkpoints):
    """The sections take longer than --client-timeout over this link: the heartbeats keep
    the session alive while they arrive, and bf16 sections take half the bytes."""
    mgr = start_manager("--model", checkpoints("llama"), "--client-timeout", "1.5", "--heartbeat", "0.25")
    client = dict(batch_size=2, seq_len=16, head_layers=1, tail_layers=1, link="1ms,800Kbit")
    joined = {}
    for codec in (None, "bf16"):
        t0 = time.monotonic()
        with menos.connect(mgr.endpoint, compression=codec, **client) as c:
            joined[codec] = (time.monotonic() - t0, c.bytes_received)
            assert c.train_step(torch.randint(0, 128, (2, 16))) > 0  # the session outlived the transfer
    assert joined[None][0] > 2 * 1.5  # longer than the client timeout, twice over
    assert joined["bf16"][1] < 0.6 * joined[None][1]
