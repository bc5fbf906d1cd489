"""Packing the base for serving: what the loader process does (``worker.launcher`` forks
it; ``manager.base.publish`` adopts what it packed). Shared code of the two server
processes, so it lives here rather than in either of them."""

from __future__ import annotations

import os

from menos.messages import BaseLoaded, LoadBase
from menos.models import load_base, tensor_digest
from menos.quantization import Quantization, quantize
from menos.sharing import SharedWeights
from menos.surgery import config_to_json, section_keys
from menos.weight_files import FileWeights
from menos.wire import dtype_from_name


def pack(req: LoadBase) -> BaseLoaded:
    """Load the base and lay it out for serving: the served blocks into a shared-memory
    segment named after the manager (vanilla: the whole model into a file), the rest into
    the ends' file. With a quantization, the served block Linears are stored quantized
    (``menos.quantization``) and the ends' file holds the whole model as loaded: the clients'
    sections, tail blocks included, come unquantized. Runs in a loader process the launcher
    forks, so that what loading touches (transformers' modelling code, the model's objects,
    the C heap) leaves with it; in the manager itself only where there is no launcher."""
    name, m = load_base(req.model, dtype_from_name(req.dtype))
    state = m.state_dict()
    layers = m.config.num_hidden_layers
    stop = req.stop or layers
    if not 0 <= req.min_head < stop <= layers:
        raise ValueError(f"blocks {req.min_head}:{stop}: the model has {layers} blocks, and the server runs at "
                         f"least one (--blocks A:B with 0 <= A < B <= {layers})")  # fmt: skip
    digests = {k: tensor_digest(t) for k, t in state.items()}
    q = Quantization.parse(req.quantization)
    served = set(section_keys(state, m.config, range(req.min_head, stop), client_modules=False))
    # What clients get their sections from: with a quantization, all of the model as loaded; else
    # what no server range runs (vanilla: nothing, its weights file holds all).
    if q is not Quantization.NONE:
        ends_state = state
    else:
        ends_state = None if req.vanilla else {k: t for k, t in state.items() if k not in served}
    ends = None
    if req.vanilla:  # nothing shared: workers read their own copies from a file
        weights = FileWeights(quantize(state, m.config, q), os.path.join(req.run_dir, "base.weights"))
    else:
        weights = SharedWeights(quantize({k: t for k, t in state.items() if k in served}, m.config, q), "cpu",
                                owner_pid=req.owner_pid)  # fmt: skip
    try:
        if ends_state is not None:
            ends = FileWeights(ends_state, os.path.join(req.run_dir, "ends.weights"))
    except BaseException:  # a full disk, say: the block must not outlive the failed start
        weights.close()
        raise
    return BaseLoaded(name=name, config_json=config_to_json(m.config), weights=weights.handle,
                      ends=ends.handle if ends else None, digests=digests)  # fmt: skip


def pack_reply(req: LoadBase) -> BaseLoaded:
    """``pack``, with a failure as the reply's error."""
    try:
        return pack(req)
    except Exception as exc:  # noqa: BLE001  the manager reports it, whatever it is
        return BaseLoaded(error=f"{type(exc).__name__}: {exc}")
