"""QLoRA (issue #26): one quantized copy of the server's blocks for every client.

The reference is what a QLoRA user runs locally: transformers' ``from_pretrained`` with a
``BitsAndBytesConfig`` that skips the client's modules (``menos.quantization.skip_modules``),
with the same adapter. In process: the split (client sections + the worker's engine) against
it over 20 optimizer steps; through real processes: a manager started with --quantization,
the exported adapter and generation against the same reference, the start-up refusals."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("bitsandbytes")

import menos  # noqa: E402
from manager.base import publish  # noqa: E402
from menos.adapters import inject  # noqa: E402
from menos.cut import Cut  # noqa: E402
from menos.estimator import estimate  # noqa: E402
from menos.messages import ErrorCode, Hello, IA3Spec, LoraSpec, PrefixSpec, Recipe  # noqa: E402
from menos.models import load_base, random_model, tensor_digest  # noqa: E402
from menos.quantization import Quantization, quantize, skip_modules, state_keys  # noqa: E402
from menos.surgery import BlockRunner, build_section, causal_lm_loss, embed, logits, section_keys  # noqa: E402
from tests.conftest import TINY  # noqa: E402
from worker.engine import ServerEngine  # noqa: E402

HEAD, TAIL = 1, 1


def reference(path: str, q: Quantization, head: int = HEAD, tail: int = TAIL):
    """The whole model, quantized by transformers as the split quantizes it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=q.four_bit, load_in_8bit=q is Quantization.INT8,
                             bnb_4bit_quant_type=q.value if q.four_bit else "fp4",
                             bnb_4bit_compute_dtype=torch.float32,
                             llm_int8_skip_modules=skip_modules(load_base(path, torch.float32)[1].config, head, tail))  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32, device_map="cpu")
    model.config._attn_implementation = "sdpa"  # noqa: SLF001  as menos.surgery.skeleton
    for m in model.modules():  # as menos.quantization.quantized_linear: no AVX512-BF16 repacking
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("name, q, dora", [
    ("llama", "nf4", False), ("llama", "nf4", True), ("opt", "nf4", False), ("opt", "nf4", True),
    ("llama", "int8", False), ("opt", "int8", False), ("llama", "fp4", False),
])  # fmt: skip
def test_split_training_over_a_quantized_base_matches_the_local_qlora_reference(checkpoints, name, q, dora):
    q, path = Quantization(q), checkpoints(name)
    spec = LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj"), use_dora=dora)
    cfg, base = load_base(path, torch.float32)[1].config, load_base(path, torch.float32)[1].state_dict()
    cut = Cut(cfg.num_hidden_layers, HEAD, TAIL)
    hello = Hello(head_layers=HEAD, tail_layers=TAIL, adapter=spec, batch_size=2, seq_len=16, recipe=Recipe(lr=1e-2))
    engine = ServerEngine(cfg, quantize(base, cfg, q), cut.server_layers, hello, torch.float32, "cpu", q.value)
    client = build_section(cfg, base, cut.client_blocks, True, torch.float32)
    opt = torch.optim.AdamW(inject(client, spec, seed=0), lr=1e-2, weight_decay=0.0)
    runner = BlockRunner(client)
    ref = reference(path, q)
    ref_opt = torch.optim.AdamW(inject(ref, spec, seed=0), lr=1e-2, weight_decay=0.0)
    ref.train()
    layer = engine.model.get_submodule(f"{'model.decoder' if name == 'opt' else 'model'}.layers.2.self_attn.k_proj")
    assert type(layer).__module__.startswith("bitsandbytes")  # quantized, and not adapted: the base layer itself
    gen = torch.Generator().manual_seed(0)
    split, local = [], []
    for step in range(20):
        ids = torch.randint(0, 128, (2, 16), generator=gen)
        x_c = runner.run(embed(client, ids), list(cut.head_blocks))
        x_s = engine.forward(step, x_c.detach(), train=True).requires_grad_()
        loss = causal_lm_loss(logits(client, runner.run(x_s, list(cut.tail_blocks))), ids)
        loss.backward()
        x_c.backward(engine.backward(step, x_s.grad, want_input_grad=True))
        opt.step(), opt.zero_grad()
        r = ref(ids, labels=ids).loss
        r.backward()
        ref_opt.step(), ref_opt.zero_grad()
        split.append(loss.item()), local.append(r.item())
    assert split == pytest.approx(local, abs=1e-5)
    full = load_base(path, torch.float32)[1]
    with torch.no_grad():  # and the quantization is really there: not the float32 model's losses
        assert abs(full(ids, labels=ids).loss.item() - ref.eval()(ids, labels=ids).loss.item()) > 1e-4 or dora


def test_the_block_holds_the_served_range_quantized_and_clients_get_the_base_dtype(checkpoints, tmp_path):
    path = checkpoints("llama")
    _, full = load_base(path, torch.bfloat16)
    state, cfg, layers = full.state_dict(), full.config, full.config.num_hidden_layers
    base = publish(path, torch.bfloat16, torch.device("cpu"), str(tmp_path), vanilla=False, min_head=1,
                   quantization=Quantization.NF4)  # fmt: skip
    try:
        served = section_keys(state, cfg, range(1, layers), client_modules=False)
        assert set(base.weights.tensors) == set(quantize({k: state[k] for k in served}, cfg, Quantization.NF4))
        q_proj = "model.layers.1.self_attn.q_proj.weight"
        data, absmax, levels = (base.weights.tensors[k] for k in state_keys(q_proj, Quantization.NF4))
        assert data.dtype == torch.uint8 and data.numel() == state[q_proj].numel() // 2
        assert absmax.numel() == state[q_proj].numel() // 64 and levels.numel() == 16
        assert base.weights.tensors["model.layers.1.input_layernorm.weight"].dtype == torch.bfloat16  # norms: as loaded
        # the bound: 4 bits and one float32 absmax per 64 weights (0.28 of bf16), norms beside
        assert base.weights.size <= 0.30 * sum(state[k].nbytes for k in served)
        # and what menos-estimate --quantization nf4 predicts for the blocks (it leaves out alignment)
        est = estimate(cfg, 1, 0, 1, 8, 2, LoraSpec(), "nf4")
        assert est.server_weights == pytest.approx(base.weights.size, rel=0.02)
        # a client's sections, its tail block included, come in the base's dtype, as the checkpoint has them
        blocks = [0, layers - 1]
        tensors, aliases, _ = base.client_sections(blocks, send=True)
        got = {n: t for t, names in zip(tensors, aliases) for n in names}
        assert set(got) == set(section_keys(state, cfg, blocks, client_modules=True))
        assert all(tensor_digest(got[n].read_rows(0, 1 << 30).reshape(state[n].shape)) == tensor_digest(state[n])
                   for n in got)  # fmt: skip
    finally:
        base.close()
    assert not os.listdir(tmp_path) and not glob.glob(f"/dev/shm/menos_{os.getpid()}_*")


@pytest.fixture(scope="module")
def nf4_manager(tmp_path_factory, checkpoints):
    from tools.harness import ManagerProcess

    with ManagerProcess(str(tmp_path_factory.mktemp("qlora")), "--model", checkpoints("llama"),
                        "--quantization", "nf4") as m:  # fmt: skip
        yield m


def test_train_export_generate_and_resume_over_an_nf4_manager(nf4_manager, checkpoints, tmp_path):
    """Through real processes: the exported adapter, loaded with PEFT on the local QLoRA
    reference, gives the split's eval loss and greedy generation; a resume continues."""
    from peft import PeftModel

    path, ids = checkpoints("llama"), torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    opts = dict(batch_size=2, seq_len=16, lr=2e-2, head_layers=HEAD, tail_layers=TAIL, identity="qlora-a",
                state_dir=str(tmp_path / "client"), adapter=LoraSpec(r=4, alpha=8, use_dora=True))  # fmt: skip
    with menos.connect(nf4_manager.endpoint, **opts) as c:
        for _ in range(3):
            c.train_step(ids)
        split_loss = c.eval_step(ids)
        generated = c.generate(ids[:, :6], max_new_tokens=5, pad_token_id=0)
        c.save_adapter(str(tmp_path / "adapter"))
        scores = c.logprobs(ids)
    with menos.connect(nf4_manager.endpoint, **opts, resume=True) as again:
        assert again.steps == 3 and again.eval_step(ids) == split_loss
        assert again.train_step(ids) > 0
    # a new session from the exported adapter starts where this one ended; an own loss trains over nf4 too
    fresh = {k: v for k, v in opts.items() if k not in ("identity", "state_dir", "adapter")}
    with menos.connect(nf4_manager.endpoint, **fresh, seed=9, init_adapter=str(tmp_path / "adapter")) as loaded:
        assert loaded.eval_step(ids) == pytest.approx(split_loss, abs=1e-6)
        mse = lambda logits, labels: logits.float().pow(2).mean()  # noqa: E731
        own = [loaded.train_step(ids, loss_fn=mse) for _ in range(3)]
        assert own[-1] < own[0]
    st = menos.status(nf4_manager.endpoint)
    assert st.quantization == "nf4"
    local = PeftModel.from_pretrained(reference(path, Quantization.NF4), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert local(ids, labels=ids).loss.item() == pytest.approx(split_loss, abs=1e-5)
        assert torch.equal(generated, local.generate(ids[:, :6], attention_mask=torch.ones(2, 6, dtype=torch.long),
                                                     max_new_tokens=5, do_sample=False, pad_token_id=0))  # fmt: skip
        want = torch.log_softmax(local(ids).logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("adapter", [IA3Spec(), PrefixSpec(num_virtual_tokens=4), LoraSpec(r=4, use_rslora=True)])
def test_every_other_method_trains_over_nf4(nf4_manager, adapter):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with menos.connect(nf4_manager.endpoint, batch_size=2, seq_len=16, lr=3e-2, adapter=adapter) as c:
        losses = [c.train_step(ids) for _ in range(4)]
    assert losses[-1] < losses[0]


def test_the_vanilla_baseline_holds_its_own_nf4_copy_and_trains_as_menos(nf4_manager, start_manager, checkpoints):
    """A fair baseline: each vanilla task its own quantized blocks, the same losses as Menos over nf4."""
    vanilla = start_manager("--model", checkpoints("llama"), "--quantization", "nf4", "--baseline", "vanilla")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    runs = []
    for mgr in (nf4_manager, vanilla):
        with menos.connect(mgr.endpoint, batch_size=2, seq_len=16, lr=2e-2, seed=4) as c:
            runs.append([c.train_step(ids) for _ in range(3)])
    assert runs[1] == pytest.approx(runs[0], abs=1e-6)
    st = menos.status(vanilla.endpoint)
    assert st.quantization == "nf4" and st.policy.value == "vanilla"
    full = sum(t.nbytes for t in load_base(checkpoints("llama"), torch.float32)[1].state_dict().values())
    assert st.shared_bytes < 0.5 * full  # the file the tasks read their copies from: nf4 blocks too


def test_a_method_peft_cannot_put_on_the_quantized_layers_is_refused_at_connect(start_manager, checkpoints):
    mgr = start_manager("--model", checkpoints("opt"), "--quantization", "int8")
    with pytest.raises(menos.MenosError) as exc:
        menos.connect(mgr.endpoint, batch_size=2, seq_len=16, adapter=LoraSpec(r=4, use_dora=True))
    assert exc.value.code == ErrorCode.BAD_REQUEST and "DoRA" in str(exc.value) and "int8" in str(exc.value)
    with menos.connect(mgr.endpoint, batch_size=2, seq_len=16, adapter=LoraSpec(r=4, use_rslora=True)) as c:
        assert c.train_step(torch.randint(0, 128, (2, 16))) > 0  # and the manager serves on


def _start(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "manager.cli", "start", "--state-dir", str(tmp_path / "state"),
                           "--listen", "tcp://127.0.0.1:*", *args], capture_output=True, text=True, timeout=120, env=env)  # fmt: skip


def test_start_up_mistakes_are_one_line(tmp_path, checkpoints):
    quantized = tmp_path / "quantized"
    shutil.copytree(checkpoints("llama"), quantized)
    with open(quantized / "config.json") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with open(quantized / "config.json", "w") as f:
        json.dump(cfg, f)
    for args, says in [(["--quantization", "nf5"], "invalid choice: 'nf5'"),
                       (["--model", str(quantized)], "quantized already (bitsandbytes)")]:  # fmt: skip
        out = _start(tmp_path, *args)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], out.stderr
        assert not glob.glob(f"{tmp_path}/state/run-*")  # nothing loaded, nothing left


def test_a_quantization_without_bitsandbytes_is_named(monkeypatch):
    import importlib.util

    from manager.preflight import StartupError, check_quantization

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find(name, *a))
    with pytest.raises(StartupError, match=r"--quantization int8: needs bitsandbytes; pip install 'menos\[qlora\]'"):
        check_quantization("int8", None)
    check_quantization("none", None)  # no quantization: no need of it


def test_a_quantization_bitsandbytes_cannot_run_here_is_named(monkeypatch):
    from manager.preflight import StartupError, check_quantization_runs
    from menos import quantization

    for q in ("nf4", "fp4", "int8"):
        for dtype in ("float32", "bfloat16", "float16"):
            check_quantization_runs(q, "cpu", dtype)  # each one runs on this CPU
    # what bitsandbytes raises where it has no kernel (a device or dtype it lacks), in one line
    def lacking(weight, q):
        raise NotImplementedError("no kernel for this device and dtype\n  (details)")

    monkeypatch.setattr(quantization, "quantize_weight", lacking)
    with pytest.raises(StartupError, match=r"^--quantization int8 on --device cpu with --dtype float16: bitsandbytes "
                                           r"cannot \(no kernel for this device and dtype\)$"):  # fmt: skip
        check_quantization_runs("int8", "cpu", "float16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_nf4_block_over_cuda_ipc_trains_as_on_the_cpu(nf4_manager, start_manager, checkpoints):
    """The quantized block on the device, mapped by each worker over CUDA IPC: bitsandbytes'
    CUDA kernels give the CPU's losses (the same levels and absmax; float32 matmuls)."""
    gpu = start_manager("--model", checkpoints("llama"), "--quantization", "nf4", "--device", "cuda")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    runs = []
    for mgr in (nf4_manager, gpu):
        with menos.connect(mgr.endpoint, batch_size=2, seq_len=16, lr=2e-2, seed=6) as c, \
             menos.connect(mgr.endpoint, batch_size=2, seq_len=16, lr=2e-2, seed=7) as other:  # fmt: skip
            runs.append([c.train_step(ids) for _ in range(3)] + [other.train_step(ids)])
    assert runs[1] == pytest.approx(runs[0], abs=1e-3)
    assert menos.status(gpu.endpoint).shared_bytes == pytest.approx(menos.status(nf4_manager.endpoint).shared_bytes,
                                                                    rel=0.01)  # fmt: skip


def test_a_swapped_out_int8_task_keeps_no_copy_of_its_blocks(checkpoints, tmp_path):
    """The vanilla baseline over int8: bitsandbytes keeps an int8 layer's weight in state.CB
    after a forward too; a swapped-out task must hold neither (else it keeps its copy)."""
    from menos.weight_files import FileWeights
    from worker.swap import task_swap

    _, full = load_base(checkpoints("llama"), torch.float32)
    cfg, q = full.config, Quantization.INT8
    cut = Cut(cfg.num_hidden_layers, HEAD, TAIL)
    weights = FileWeights(quantize(full.state_dict(), cfg, q), str(tmp_path / "base.weights"))
    engine = ServerEngine(cfg, weights.tensors, cut.server_layers, Hello(batch_size=2, seq_len=16), torch.float32,
                          "cpu", q.value)  # fmt: skip
    swap = task_swap(engine.base_named, weights.tensors, torch.device("cpu"), engine.kernels.layers)
    x = torch.randn(2, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    before = engine.forward(0, x, train=False)
    assert engine.kernels.layers and all(layer.state.CB is not None for layer in engine.kernels.layers)
    swap.swap_out()
    assert all(layer.state.CB.numel() == 0 and layer.weight.numel() == 0 for layer in engine.kernels.layers)
    swap.swap_in()
    assert torch.equal(engine.forward(1, x, train=False), before)
    assert all(layer.state.CB.data_ptr() == layer.weight.data_ptr() for layer in engine.kernels.layers)  # one copy


def test_an_adapter_loads_into_int8_layers_in_a_lower_compute_dtype(checkpoints):
    """PEFT keeps an adapter on int8 layers in float32 whatever the compute dtype; the client
    reads an adapter file in its own (bf16): the server takes it (init_adapter)."""
    _, full = load_base(checkpoints("llama"), torch.bfloat16)
    cfg, q = full.config, Quantization.INT8
    cut = Cut(cfg.num_hidden_layers, HEAD, TAIL)
    engine = ServerEngine(cfg, quantize(full.state_dict(), cfg, q), cut.server_layers, Hello(batch_size=2, seq_len=16),
                          torch.bfloat16, "cpu", q.value)  # fmt: skip
    state = {k: torch.full_like(v, 0.5, dtype=torch.bfloat16) for k, v in engine.adapter_state().items()}
    assert engine.load_adapter(state) == len(state)
    assert all(torch.all(v == 0.5) for v in engine.adapter_state().values())
