"""Defences a client turns on at connect: applied on the client, before anything leaves it.

What crosses the cut, x_c = head(embed(input_ids)), can be inverted back to tokens by the
server (issue #30). Each defence changes only what is sent; the server serves a defended
client as any other.

- ``clip:C``: each position's activation RMS (L2 norm / sqrt(hidden)) is scaled down to at
  most C, so that no position stands out and the noise below has a known scale.
- ``noise:S``: Gaussian noise of std S x each position's RMS (after clipping) is added.
- ``nopeek:W``: NoPeek (Vepakomma, Singh, Gupta, Raskar, 2020, "NoPeek: Information leakage
  reduction to share activations in distributed deep learning", arXiv:2008.09161): W x the
  distance correlation between the token embeddings and the sent activations is added to
  the loss that trains the client's head, which learns to send less of its input.
- ``gradnoise:S``: Gaussian noise of std S x each position's RMS is added to the gradient the
  client sends back for the server's output, which otherwise names each position's label
  (``menos.privacy.attacks.label_recovery``); the server's adapter trains on the noisy one.

Specs join with "+": ``"clip:2+noise:0.5"``; ``"none"`` (or None) is no defence.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads on first use: ClientConfig, which parses specs, is imported by light tools
    import torch

_FORMS = ("'none', or NAME:VALUE joined by '+' with NAME one of clip, noise, nopeek, gradnoise and VALUE >= 0 "
          "(e.g. 'clip:2+noise:0.5')")
_NOPEEK_ROWS = 1024  # positions the distance correlation compares at most (its cost is quadratic)


@dataclass(frozen=True)
class Defence:
    noise: float = 0.0  # Gaussian noise, std = noise x each position's activation RMS (after clipping); 0: off
    clip: float = 0.0  # clip each position's activation RMS to at most `clip`, before the noise; 0: off
    nopeek: float = 0.0  # weight of NoPeek's distance-correlation loss on the client's head; 0: off
    gradnoise: float = 0.0  # Gaussian noise on the gradient sent back, std = gradnoise x each position's RMS; 0: off

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and value >= 0):
                raise ValueError(f"defence {f.name}={value!r}: a finite number >= 0 (0: off)")
            object.__setattr__(self, f.name, float(value))


def parse(spec: "str | Defence | None") -> Defence:
    """``None`` / ``"none"`` -> ``Defence()``; ``"noise:0.5"``, ``"clip:2+noise:0.5"``, ``"nopeek:0.1"``."""
    if spec is None or isinstance(spec, Defence):
        return spec or Defence()
    if not isinstance(spec, str):
        raise ValueError(f"defence={spec!r}: {_FORMS}")
    if spec.strip().lower() == "none":
        return Defence()
    names = {f.name for f in fields(Defence)}
    values: dict[str, float] = {}
    for part in spec.split("+"):
        name, sep, value = part.strip().partition(":")
        name = name.strip().lower()
        if not sep or name not in names:
            raise ValueError(f"defence={spec!r}: bad part {part!r}; {_FORMS}")
        if name in values:
            raise ValueError(f"defence={spec!r}: {name} given twice; {_FORMS}")
        try:
            values[name] = float(value)
        except ValueError:
            values[name] = math.nan
        if not (math.isfinite(values[name]) and values[name] >= 0):
            raise ValueError(f"defence={spec!r}: bad part {part!r}; {_FORMS}")
    return Defence(**values)


def describe(d: Defence) -> str:
    """The spec ``parse`` reads back as ``d``: ``"none"``, ``"clip:2+noise:0.5"``, ..."""
    parts = [f"{name}:{_number(getattr(d, name))}" for name in ("clip", "noise", "nopeek", "gradnoise") if getattr(d, name)]
    return "+".join(parts) or "none"


def _number(v: float) -> str:
    text = repr(v)  # exact, so that parse(describe(d)) == d
    return text[:-2] if text.endswith(".0") else text


def rms(x: torch.Tensor) -> torch.Tensor:
    """Each position's RMS over the hidden dimension, (B, T, 1), float32."""
    return x.float().pow(2).mean(-1, keepdim=True).sqrt()


def apply(x: torch.Tensor, d: Defence, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T, H) -> what is sent, same shape and dtype; differentiable (clipping is a rescale,
    the noise a constant added). ``x`` itself when neither clip nor noise is on."""
    if not (d.clip or d.noise):
        return x
    y = x.float()
    if d.clip:
        y = y * (d.clip / rms(y).clamp(min=d.clip)).to(y.dtype)  # 1 where already within the bound
    return _noisy(y, d.noise, generator).to(x.dtype)


def apply_to_gradient(g: torch.Tensor, d: Defence, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, T, H) gradient for the server's output -> the one sent back, same shape and dtype;
    ``g`` itself when gradnoise is off."""
    if not d.gradnoise:
        return g
    return _noisy(g.float(), d.gradnoise, generator).to(g.dtype)


def _noisy(y: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """y + N(0, 1) x sigma x each position's RMS (float32); y itself at sigma 0."""
    if not sigma:
        return y
    import torch

    device = generator.device if generator is not None else y.device
    eps = torch.randn(y.shape, generator=generator, dtype=torch.float32, device=device).to(y.device)
    return y + eps * (sigma * rms(y.detach()))  # the scale is data, not a path for gradients


def generator(d: Defence, seed: int, step: int, private: torch.Tensor, gradient: bool = False) -> torch.Generator | None:
    """The noise's generator for one request (``gradient``: for its gradient), None when that
    noise is off.

    Seeded from the client's seed and step, so that a run is reproducible, and from a
    tensor that never leaves the client (the tokens; for the gradient, the gradient itself):
    the server knows the seed (it is in Hello) and the step, and with them alone it could
    draw the same noise and take it off."""
    if not (d.gradnoise if gradient else d.noise):
        return None
    import torch

    h = hashlib.sha256(f"{seed}:{step}:{'gradient:' if gradient else ''}".encode())
    data = private.detach().to("cpu").contiguous()
    h.update((data.float() if data.is_floating_point() else data.to(torch.int64)).numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1))


def distance_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Szekely et al., 2007) between the rows of ``a`` and ``b``
    (each row flattened): near 0 for independent samples, 1 for ones related by a similarity.
    Differentiable; float32."""
    if a.shape[0] != b.shape[0] or a.shape[0] < 2:
        raise ValueError(f"distance_correlation needs as many rows in each (>= 2), got {a.shape[0]} and {b.shape[0]}")
    A, B = _centred_distances(a), _centred_distances(b)
    dcov2_ab, dvar2_a, dvar2_b = (A * B).mean(), (A * A).mean(), (B * B).mean()
    denom = (dvar2_a * dvar2_b).sqrt()
    if denom <= 0:  # a constant sample: no dependence to measure
        return dcov2_ab * 0
    return (dcov2_ab / denom).clamp(min=1e-12).sqrt()  # clamped: sqrt's gradient at 0 is inf


def _centred_distances(x: torch.Tensor) -> torch.Tensor:
    import torch

    x = x.reshape(x.shape[0], -1).float()
    sq = x.pow(2).sum(-1)
    off_diagonal = 1 - torch.eye(x.shape[0], dtype=x.dtype, device=x.device)  # exact 0s, not rounding errors
    d2 = ((sq[:, None] + sq[None, :] - 2 * x @ x.T) * off_diagonal).clamp(min=1e-12)  # as above; and equal rows
    d = d2.sqrt()
    return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()


def nopeek_term(d: Defence, embeddings: torch.Tensor, x_c: torch.Tensor) -> torch.Tensor | None:
    """d.nopeek x dCor(embeddings, sent activations), with each position a sample (the inversion
    attacks read positions); None when NoPeek is off or nothing before the cut trains."""
    if not d.nopeek or not x_c.requires_grad:
        return None
    import torch

    a, b = embeddings.detach().flatten(0, -2), x_c.flatten(0, -2)  # (B*T, H)
    if a.shape[0] > _NOPEEK_ROWS:  # evenly spaced positions: the cost is quadratic in them
        keep = torch.linspace(0, a.shape[0] - 1, _NOPEEK_ROWS, device=a.device).long()
        a, b = a[keep], b[keep]
    return d.nopeek * distance_correlation(a, b)
