"""The memory estimator: an analytic memory model of a Menos server (``menos-estimate``).

The paper's memory model, per server (GPU or host), for N clients:

    M      the base weights, one shared copy for every client
    A + O  one client's adapter on the server's blocks (LoRA, DoRA, IA3 or prefix tuning),
           plus AdamW's state: two moments per weight (2 x A) and a 4-byte step counter
           per adapter tensor
    M_f    the peak extra bytes of one no-grad forward of the server's blocks
    M_b    the peak extra bytes of one re-forward + backward + AdamW step of them

``estimate`` predicts all four from the transformers config alone: nothing is loaded
and nothing runs. M and A + O are exact parameter counts (``menos.arch``). M_f and M_b start from an
exact count of the tensors a block allocates and of those autograd saves (checked
against ``torch.autograd.graph.saved_tensors_hooks``), then apply factors calibrated
against the worker's start-up profiler (``worker.profiling.profile``) on CPU fp32,
where the measured quantity is the kernel's peak resident set: the C allocator keeps
part of the memory freed inside a step resident, so the resident peak is about twice
the peak of live tensors (see "calibration" below). tests/test_estimate.py holds M_b
to within 15% of the profile. Not calibrated: CUDA (the caching allocator's reserved
peak, which the worker measures there, lacks most of these holes: expect the
estimate to be high), and bf16/fp16 on CPU (extra fp32 temporaries in the kernels).

``with_margin`` turns a peak into a scheduler token, the same way for the worker's
profile and for the estimate the manager's admission checks at connect time.
Light: no torch or transformers import (a config is only read): menos-estimate starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from menos.arch import (DEFAULT_ADAPTER, spec_for, targeted, adapter_and_optimizer_bytes, adapter_params, arch_of,
                        block_params, model_params)  # fmt: skip
from menos.cut import Cut
from menos.messages import AdapterSpec, IA3Spec, LoraSpec, PrefixSpec

if TYPE_CHECKING:
    from transformers import PretrainedConfig


# Worker's token = measured peak * MARGIN + SLACK_BYTES (worker/profiling.py); same here.
MARGIN = 1.2
SLACK_BYTES = 1 << 20
# Parking (manager.parking), measured on this 2-core CPU with OPT-350M's blocks (6 of them, fp32,
# LoRA r8 q,v, batch 1 x 32): the server's PSS grows by 105 MiB per live worker, 2.3 of it its
# A + O (status before and after 4 sessions); and by 0.2 MiB per parked session, its park file
# aside (benchmarks/tenants.py, 256 sessions).
WORKER_PROCESS_BYTES = 100 << 20
PARKED_RECORD_BYTES = 256 << 10


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class BlockActivations:
    """Byte counts of one decoder block at (batch, seq), exact at the tensor level.

    ``saved``: what autograd keeps per block for the backward; a grad-mode forward holds
    it for every block at once. ``shared``: tensors saved once for all blocks (the mask,
    the rotary tables). ``allocated``: every tensor one block's forward allocates, saved
    or freed soon after (norm arithmetic, projections, LoRA products, RoPE pieces, MLP
    products); with no grad, all of it is temporary. ``terms``: ``saved``'s breakdown.
    """

    saved: int
    shared: int
    allocated: int
    terms: dict


def block_activations(
    config: PretrainedConfig, batch: int, seq: int, elem_bytes: int, adapter: AdapterSpec = DEFAULT_ADAPTER
) -> BlockActivations:
    """LoRA is counted exactly; DoRA, IA3 and prefix tuning add their own terms (counted
    from their forward code, not calibrated against the profiler)."""
    arch = arch_of(config)
    spec = spec_for(arch, adapter)
    lora = isinstance(spec, LoraSpec)
    hit = targeted(arch, spec.target_modules) if lora else set()
    rank = spec.r if lora else 0
    n, e, f32 = batch * seq, elem_bytes, 4
    h, a, i = arch.hidden, arch.attn, arch.inter
    saved: dict[str, int] = {}
    alloc: list[int] = []

    def linear(name: str) -> None:
        """A frozen Linear saves nothing but its weight (shared) for the input gradient.
        With LoRA, lora_A keeps its input (counted by the caller: it is a norm's output
        or an activation) and lora_B keeps A's (n, r) output. Allocated: the base output,
        and lora_A, lora_B, * scaling, + for the adapter's branch."""
        in_f, out = arch.linears[name][:2]
        alloc.append(n * out * e)
        if name in hit:
            saved[f"{name} LoRA: A's output"] = n * rank * e
            alloc.extend([n * rank * e, 3 * n * out * e])
            if spec.use_dora:
                # DoRA, per call: B @ A as a weight-sized matrix and W + scaling * (B @ A) for its
                # column norms; the magnitude's gradient keeps the base output and the LoRA
                # branch's, and two (n, out) products are temporary.
                saved[f"{name} DoRA: base and LoRA outputs"] = 2 * n * out * e
                alloc.extend([2 * in_f * out * e, 2 * n * out * e])

    if arch.family == "llama":
        # RMSNorm computes in fp32 (x.to(fp32) is a copy unless x is fp32 already) and keeps
        # that fp32 input and rsqrt. Allocated: the copy, pow, mul, the cast back, * weight.
        norm_saved = n * h * f32 + n * f32
        norm_alloc = n * h * (f32 + f32 + (f32 + e if e != f32 else 0) + e) + 3 * n * f32
        saved["input RMSNorm: fp32 input, rsqrt"] = norm_saved
        alloc.append(norm_alloc)
        if hit & {"q_proj", "k_proj", "v_proj"}:
            saved["input RMSNorm: output (lora_A's input)"] = n * h * e
        for name in ("q_proj", "k_proj", "v_proj"):
            linear(name)
        kv = arch.kv_heads * arch.head_dim
        alloc.append(int(4.5 * n * (a + kv) * e))  # RoPE on q and k: x*cos, -x2, cat, *sin, +
        if kv != a:
            alloc.append(2 * n * a * e)  # repeat_kv: with a mask, sdpa gets full-width k, v
        # sdpa's fused kernels (flash on CPU, efficient on CUDA) never keep (T, T) scores:
        # they save q, k, v, the output and a fp32 log-sum-exp per row.
        saved["attention: q, k, v, output"] = 4 * n * a * e
        saved["attention: logsumexp"] = n * arch.heads * f32
        # The output is laid out (B, T, heads, head_dim): transposing it back costs no copy,
        # and it is o_proj's input (a LoRA there keeps nothing more).
        alloc.append(n * a * e + n * arch.heads * f32)
        linear("o_proj")
        alloc.append(n * h * e)  # residual add
        saved["post-attention RMSNorm: fp32 input, rsqrt"] = norm_saved
        alloc.append(norm_alloc)
        if hit & {"gate_proj", "up_proj"}:
            saved["post-attention RMSNorm: output"] = n * h * e
        linear("gate_proj")
        linear("up_proj")
        # act(gate) * up: silu keeps gate's output, the product keeps act's output and up's.
        saved["MLP: gate, act(gate), up"] = 3 * n * i * e
        alloc.append(2 * n * i * e)  # act's output, the product
        if "down_proj" in hit:
            saved["down_proj's input"] = n * i * e
        linear("down_proj")
        alloc.append(n * h * e)  # residual add: the block's output
        # the causal mask (T, T), expanded over the batch; cos and sin (B, T, head_dim)
        shared = seq * seq * e + 2 * n * arch.head_dim * e
    else:
        # LayerNorm keeps its input and the fp32 mean and rstd.
        ln_saved = n * h * e + 2 * n * f32
        saved["attention LayerNorm: input, mean, rstd"] = ln_saved
        alloc.append(n * h * e + 2 * n * f32)
        if hit & {"q_proj", "k_proj", "v_proj"}:
            saved["attention LayerNorm: output (lora_A's input)"] = n * h * e
        for name in ("q_proj", "k_proj", "v_proj"):
            linear(name)
        alloc.append(n * h * e)  # q * scaling
        saved["attention: q, k, v, output"] = 4 * n * a * e
        saved["attention: logsumexp"] = n * arch.heads * f32
        alloc.append(n * a * e + n * arch.heads * f32)  # output (out_proj's input too, no copy)
        linear("out_proj")
        alloc.append(n * h * e)  # residual add
        saved["MLP LayerNorm: input, mean, rstd"] = ln_saved
        alloc.append(n * h * e + 2 * n * f32)
        if "fc1" in hit:
            saved["MLP LayerNorm: output"] = n * h * e
        linear("fc1")
        saved["MLP: activation"] = n * i * e  # relu keeps its output (= fc2's input), gelu its input
        alloc.append(n * i * e)
        if "fc2" in hit and not arch.act_saves_output:
            saved["fc2's input"] = n * i * e
        linear("fc2")
        alloc.append(n * h * e)  # residual add: the block's output
        shared = seq * seq * e  # the causal mask
    if isinstance(spec, IA3Spec):
        ff = set(spec.feedforward_modules)
        for name in targeted(arch, spec.target_modules):
            in_f, out = arch.linears[name][:2]
            # the vector's gradient keeps what it multiplies: the input (feed-forward) or the output
            width = in_f if name in ff else out
            saved[f"{name} IA3: scaled tensor"] = n * width * e
            alloc.append(n * width * e)
    elif isinstance(spec, PrefixSpec):
        p = batch * spec.num_virtual_tokens
        kv = arch.kv_heads * arch.head_dim
        # the attention keeps keys and values longer by the prefix (full-width); the cat makes them
        saved["prefix: attention keys and values"] = 2 * p * arch.attn * e
        alloc.append(2 * p * kv * e)
        shared += seq * spec.num_virtual_tokens * e  # the mask's prefix columns
    return BlockActivations(sum(saved.values()), shared, sum(alloc), saved)


# --------------------------------------------------------------------------- calibration
#
# The counts above are exact at the tensor level. What the profiler measures on CPU is
# the process's peak resident set, and the C allocator inflates it: a freed heap chunk
# stays resident until malloc_trim (which the profiler runs before the step, not
# during it), and the temporaries each block frees leave holes between the tensors
# autograd keeps that later, differently sized tensors only partly fill. Fitted by
# least squares (relative error) on CPU fp32 against worker.profiling.profile's raw
# m_b and m_f: 78 runs of Llama and OPT blocks (hidden 128-384, MLP 1.5-8 x hidden,
# GQA, LoRA r 8-16 on 2 to all Linears, 1 and 4 blocks, 256-512 tokens), each
# architecture in a fresh process; mean error 6%, worst 17% (a single block;
# 13% with 4 blocks). In bf16 fewer of a block's bytes are left as holes (its norms and
# softmax work in fp32, so its temporaries are of more sizes than in fp32, and fit one
# another's holes): refitted on 21 bf16 runs (12 further shapes from 1 to 4 blocks and
# 64 to 512 tokens, LoRA r 8-16 on q, v or every Linear, plus the estimator test's 9);
# M_b mean error 6%, worst 17% (DoRA); M_f mean 9%, worst 19%.


@dataclass(frozen=True)
class _Calibration:
    holes: float  # resident bytes per byte of a block's temporaries, while all blocks' activations are held
    backward: float  # the backward's own peak, in (tokens x MLP width) tensors
    forward_live: float  # a no-grad forward's live peak, in (tokens x MLP width) tensors ...
    forward_alloc: float  # ... plus resident holes: per byte one block allocates ...
    forward_more: float  # ... and per byte each further block allocates


# by element size: fp32, and the 2-byte dtypes (bf16; fp16 is assumed to behave alike)
_CALIBRATION = {4: _Calibration(0.57, 3.3, 2.2, 0.35, 0.07), 2: _Calibration(0.35, 3.48, 3.0, 0.31, 0.023)}


def step_bytes(
    config: PretrainedConfig,
    n_blocks: int,
    batch: int,
    seq: int,
    elem_bytes: int,
    adapter: AdapterSpec = DEFAULT_ADAPTER,
) -> tuple[int, int]:
    """(M_f, M_b): estimated peak extra bytes of a no-grad forward, and of a re-forward +
    backward + AdamW step, of ``n_blocks`` server blocks at (batch, seq). Raw, as the
    profiler measures them (no safety margin)."""
    if n_blocks <= 0:
        raise ValueError("the server needs at least one block")
    arch = arch_of(config)
    cal = _CALIBRATION[4 if elem_bytes >= 4 else 2]
    act = block_activations(config, batch, seq, elem_bytes, adapter)
    hidden = batch * seq * arch.hidden * elem_bytes  # one (B, T, H) tensor
    temporaries = act.allocated - act.saved
    mlp = batch * seq * arch.inter * elem_bytes  # one (B, T, inter) tensor
    # M_f: under no_grad each block frees its temporaries before the next starts: the
    # peak is the output plus one block's largest live set (the MLP's intermediates),
    # plus the part of the temporaries the allocator keeps resident, growing a little
    # with every block.
    m_f = hidden + cal.forward_live * mlp + (cal.forward_alloc + cal.forward_more * (n_blocks - 1)) * act.allocated
    # M_b: the re-forward holds every block's saved activations (exact), the mask and
    # rotary tables once, and about half of each block's freed temporaries as resident
    # holes; the backward then starts from the last block, whose gradients (dominated by
    # the MLP's (B*T, inter) ones) come on top before any saved tensor is released; the
    # output, the input's gradient, and the adapter's gradients (A) last to the end.
    grads = adapter_params(arch, n_blocks, adapter) * elem_bytes
    m_b = n_blocks * (act.saved + cal.holes * temporaries) + act.shared + cal.backward * mlp + 2 * hidden + grads
    return int(m_f), int(m_b)


def with_margin(nbytes: float) -> int:
    """A scheduler token for a measured or estimated peak: room for run-to-run noise."""
    return int(nbytes * MARGIN) + SLACK_BYTES


def vanilla_task_token(block_bytes: int, m_b_token: int) -> int:
    """The vanilla baseline's one token for a whole task: its own copy of its blocks plus
    one backward's memory (it keeps its activations from forward to backward)."""
    return block_bytes + m_b_token


def kv_cache_bytes(config: PretrainedConfig, n_blocks: int, batch: int, length: int, elem_bytes: int) -> int:
    """A generation's key/value cache for ``n_blocks`` blocks: keys and values of every
    position, batch x length (``menos.kv_cache.KVCache`` allocates exactly this)."""
    arch = arch_of(config)
    return n_blocks * 2 * batch * length * arch.kv_heads * arch.head_dim * elem_bytes


def generation_token(kv_bytes: int, m_f_token: int) -> int:
    """A generation's one token, held from its prompt to its end: the cache, plus the
    working memory of one forward (the prompt's, which bounds every later step's)."""
    return kv_bytes + m_f_token


# --------------------------------------------------------------------------- the estimate

ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Estimate:
    """One server's memory for clients that all use the same cut, adapter and shapes."""

    weights: int  # M: the whole base model, shared by every client
    server_weights: int  # the base weights of the server's blocks alone
    adapter: int  # A + O per client: LoRA weights + AdamW's state
    m_f: int  # per client: peak extra bytes of a no-grad forward
    m_b: int  # per client: peak extra bytes of a re-forward + backward + step
    server_blocks: int
    kept_input: int = 0  # per client: the forward's input x_c, kept until its backward
    adapter_weights: int = 0  # A alone (its gradients, when kept between micro-batches, weigh as much)

    @property
    def standing(self) -> int:
        """What a client's worker holds for its whole session outside any token: A + O, x_c."""
        return self.adapter + self.kept_input

    def menos(self, clients: int) -> int:
        """On-demand: one shared M, each client's A + O, and one backward at a time."""
        return self.weights + self.adapter * clients + self.m_b

    def preserve(self, clients: int) -> int:
        """Every client keeps its activations between forward and backward."""
        return self.weights + (self.adapter + self.m_b) * clients

    def vanilla(self, clients: int) -> int:
        """Vanilla split learning: each client its own copy of the server blocks, its
        adapter and optimizer, and its activations (about M_b)."""
        return (self.server_weights + self.adapter + self.m_b) * clients

    def live_workers_that_fit(self, capacity: int, worker_bytes: int = 0) -> int:
        """With parking (``--max-workers``): live workers that fit ``capacity``, each its A + O and
        ``worker_bytes`` (its process, or on a GPU its CUDA context), beside M and one M_b."""
        return max(0, (capacity - self.weights - self.m_b) // (self.adapter + worker_bytes))

    def sessions_that_fit(self, capacity: int, live_workers: int, worker_bytes: int = 0,
                          parked_bytes: int = 0) -> int:  # fmt: skip
        """Sessions in all when at most ``live_workers`` are live and the rest parked, each parked
        one holding ``parked_bytes`` of this capacity (its park file and the manager's record of
        it; 0 on a device, which a parked session does not touch: then any number fits)."""
        live = min(live_workers, self.live_workers_that_fit(capacity, worker_bytes))
        if live <= 0:
            return 0
        if parked_bytes <= 0:
            return -1  # no bound from this capacity
        left = capacity - self.weights - self.m_b - live * (self.adapter + worker_bytes)
        return live + max(0, left // parked_bytes)

    def clients_that_fit(self, capacity: int) -> dict[str, int]:
        """How many clients fit in ``capacity`` bytes under each policy."""
        per = {
            "menos": (capacity - self.weights - self.m_b, self.adapter),
            "preserve": (capacity - self.weights, self.adapter + self.m_b),
            "vanilla": (capacity, self.server_weights + self.adapter + self.m_b),
        }
        return {k: max(0, free // each) for k, (free, each) in per.items()}


def estimate(
    config: PretrainedConfig,
    head_layers: int,
    tail_layers: int,
    batch: int,
    seq: int,
    elem_bytes: int = 4,
    adapter: AdapterSpec = DEFAULT_ADAPTER,
    quantization: str = "none",
) -> Estimate:
    """The memory model of one server from ``config`` alone (see the module's docstring).
    ``quantization`` (``menos.quantization``): the blocks' Linears as stored, and each
    compute's transient dequantized weight."""
    from menos.quantization import Quantization, dequantized_bytes, stored_bytes

    q = Quantization.parse(quantization)
    arch = arch_of(config)
    n = len(Cut(arch.layers, head_layers, tail_layers).server_blocks)
    m_f, m_b = step_bytes(config, n, batch, seq, elem_bytes, adapter)
    dequantized = dequantized_bytes(config, q, elem_bytes)  # in each compute's peak
    saved = stored_bytes(config, Quantization.NONE, elem_bytes) - stored_bytes(config, q, elem_bytes)  # per block
    return Estimate(
        weights=model_params(config) * elem_bytes - arch.layers * saved,
        server_weights=n * (block_params(arch) * elem_bytes - saved),
        adapter=adapter_and_optimizer_bytes(arch, n, adapter, elem_bytes),
        adapter_weights=adapter_params(arch, n, adapter) * elem_bytes,
        m_f=m_f + dequantized,
        m_b=m_b + dequantized,
        server_blocks=n,
        kept_input=batch * seq * arch.hidden * elem_bytes,
    )
