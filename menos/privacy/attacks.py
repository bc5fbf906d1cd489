"""Attacks of an honest-but-curious server: pure functions of the recorded traffic and the public base.

Each gets a ``Traffic`` (what crossed the cut) and ``base`` (the public base model, a full
transformers causal LM, as ``menos.models.load_base`` loads it) and returns predictions; the
victim's data (token ids, labels) is never an input here, and scoring against the truth is
the driver's business (``tools.audit``). Predictions are per recorded step, in
``traffic.complete()`` order.

    nearest_neighbour   each position's activation -> the token whose lone activation is nearest
    learned_inversion   a small network trained on the attacker's own public text -> tokens
    label_recovery      the gradients the client sends -> its labels (its tail stood in by the public blocks)
"""

from __future__ import annotations

import torch
from torch import nn

from menos.privacy.traffic import Traffic
from menos.surgery import BlockRunner, build_section, embed, family_of, logits

_CHUNK = 4096  # vocabulary rows per pass through the head blocks


def _client_section(base: nn.Module, head_layers: int) -> tuple[nn.Module, BlockRunner]:
    """The public base's client ends and first ``head_layers`` blocks, sharing the base's tensors."""
    dtype = next(base.parameters()).dtype
    section = build_section(base.config, base.state_dict(), range(head_layers), True, dtype)
    return section, BlockRunner(section)


@torch.no_grad()
def _head(section, runner, ids: torch.Tensor, head_layers: int, position_ids=None) -> torch.Tensor:
    """Token ids (B, T) through the public embeddings and head blocks -> (B, T, H), float32."""
    return runner.run(embed(section, ids, position_ids=position_ids), range(head_layers)).float()


def _lone_tokens(section, runner, head_layers: int, position: int) -> torch.Tensor:
    """Every vocabulary token alone at ``position`` through the head blocks -> (V, H), unit rows."""
    vocab = section.config.vocab_size
    out = []
    for lo in range(0, vocab, _CHUNK):
        ids = torch.arange(lo, min(vocab, lo + _CHUNK)).unsqueeze(1)  # (v, 1)
        out.append(_head(section, runner, ids, head_layers, torch.full_like(ids, position))[:, 0])  # (v, H)
    return nn.functional.normalize(torch.cat(out), dim=-1)  # (V, H)


def nearest_neighbour(traffic: Traffic, base: nn.Module) -> list[torch.Tensor]:
    """Predicted token ids (B, T) per step: each position's activation matched, by cosine, to
    every vocabulary token run alone through the public embeddings and head blocks.

    Positions: rotary models (Llama, Mistral, Qwen2) use position 0 for every position,
    which is exact for a lone token (its query and key rotate by the same angle, and one
    key takes all the attention), so only the context the token misses differs. Models
    with learned positions (OPT) get one candidate set per position 0..T-1."""
    section, runner = _client_section(base, traffic.head_layers)
    rotary = family_of(base.config).rotary
    candidates: dict[int, torch.Tensor] = {}  # position -> (V, H)
    preds = []
    for step in traffic.complete():
        x = nn.functional.normalize(step.received.float(), dim=-1)  # (B, T, H)
        cols = []
        for p in range(x.shape[1]):
            key = 0 if rotary else p
            if key not in candidates:
                candidates[key] = _lone_tokens(section, runner, traffic.head_layers, key)
            cols.append((x[:, p] @ candidates[key].T).argmax(-1))  # (B,)
        preds.append(torch.stack(cols, dim=1))  # (B, T)
    return preds


def learned_inversion(traffic: Traffic, base: nn.Module, public_ids: torch.Tensor, steps: int = 200,
                      hidden: int = 256, seed: int = 0) -> list[torch.Tensor]:  # fmt: skip
    """Predicted token ids (B, T) per step from a 1-hidden-layer MLP the attacker trains (Adam,
    ``steps`` full-batch steps, seeded) on ITS OWN public text ``public_ids`` run through the
    public head blocks: activation -> token. ``public_ids``: a 1-D token stream (cut into rows
    as long as the recorded sequences) or rows (N, T); never the victim's text."""
    recorded = traffic.complete()
    if not recorded:
        return []
    section, runner = _client_section(base, traffic.head_layers)
    rows = _rows(public_ids, recorded[0].received.shape[1])  # (N, T)
    feats = _head(section, runner, rows, traffic.head_layers).reshape(-1, recorded[0].received.shape[-1])  # (N*T, H)
    targets = rows.reshape(-1)  # (N*T,)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)  # the attacker's own statistics, from public text
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(feats.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, base.config.vocab_size))
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        x = (feats - mean) / std
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), targets).backward()
            opt.step()
    with torch.no_grad():
        return [net((s.received.float() - mean) / std).argmax(-1) for s in recorded]  # (B, T) each


def _rows(ids: torch.Tensor, t: int) -> torch.Tensor:
    """(N, T) rows of the public token stream (a stream shorter than T is repeated)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2:
        return ids
    while ids.numel() < t:
        ids = torch.cat([ids, ids])
    return ids[: ids.numel() // t * t].reshape(-1, t)


def label_recovery(traffic: Traffic, base: nn.Module) -> list[torch.Tensor]:
    """Predicted labels (B, T-1) per step, for positions 0..T-2 (position t's label is the
    token at t+1: compare with ``input_ids[:, 1:]``).

    With no tail blocks, the client's gradient for the server's output h at a position is
    c * J(h)^T (softmax(z) - e_y), z = the public final norm and head's logits, c > 0 unknown
    (1 / label count). The server computed h itself, so it predicts that direction for every
    candidate label y and takes the y whose direction is nearest (cosine, positive scale).

    With tail blocks the client's own blocks stand between h and the loss. The attacker
    stands the public blocks in for them (the client's adapter starts as the identity) and
    scores at their output, taking the gradient through them as their residual path (the
    identity): what the attention and MLP branches add, and what crosses positions, is left
    out, so this is a lower bound on what the exact gradient gives away."""
    layers = base.config.num_hidden_layers
    tail = range(layers - traffic.tail_layers, layers)
    section = build_section(base.config, base.state_dict(), tail, True, next(base.parameters()).dtype)
    runner = BlockRunner(section)
    preds = []
    for step in traffic.complete():
        if step.sent is None or step.gradient is None:
            continue
        with torch.no_grad():
            out = runner.run(step.sent.to(next(base.parameters()).dtype), tail).float()  # (B, T, H)
        h = out[:, :-1]  # (B, T-1, H): the last position has no label
        g = step.gradient.float()[:, :-1]  # (B, T-1, H)
        b, t, d = h.shape
        h, g = h.reshape(-1, d), g.reshape(-1, d)  # (N, H)
        scores = torch.cat([_label_scores(section, h[i : i + 64], g[i : i + 64])
                            for i in range(0, h.shape[0], 64)])  # (N, V); chunks bound the Jacobians' memory
        preds.append(scores.argmax(-1).reshape(b, t))  # (B, T-1)
    return preds


def _label_scores(section: nn.Module, h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Cosine between each received gradient g (N, H) and the predicted direction for each label (N, V)."""
    from torch.func import jacrev, vmap

    def one(hi):  # (H,) -> logits (V,)
        return logits(section, hi.view(1, 1, -1)).view(-1).float()

    with torch.no_grad():
        z = logits(section, h.unsqueeze(0)).squeeze(0).float()  # (N, V)
    jac = vmap(jacrev(one))(h)  # (N, V, H): d logit_v / d h
    p = z.softmax(-1)  # (N, V)
    mean = torch.einsum("nv,nvh->nh", p, jac)  # (N, H): J^T p
    directions = mean.unsqueeze(1) - jac  # (N, V, H): J^T (p - e_y) for each y
    return nn.functional.cosine_similarity(directions, g.unsqueeze(1), dim=-1)  # (N, V)
