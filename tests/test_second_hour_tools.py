"""A new user's second hour with the tools and the data helpers: each mistake is one line
that names the argument and the fix, answered before torch is imported, and data that
would train nothing is refused where it is made (issue 29: 3, 5, 10, 14)."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import menos
from menos.data import ByteTokenizer, rows_batches, sft_batches
from tests.test_first_hour import _Clock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = dict(batch_size=2, seq_len=16)
QUICK_S = 3.0  # an answer before the imports (torch alone takes 4 s here); the fake torch below proves the order


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory):
    """An environment in which importing torch or transformers fails: a tool that answers
    in it checked its arguments before those imports."""
    root = tmp_path_factory.mktemp("no-torch")
    for name in ("torch", "transformers"):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} was imported before the checks')\n")
    return dict(os.environ, PYTHONPATH=str(root))


def _tool(module, *args, env):
    with _Clock() as t:
        out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                             timeout=60, env=env)  # fmt: skip
    return out, t.s


def _one_line(out, words, code=2):
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert words in out.stderr, out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- menos-estimate


@pytest.mark.parametrize("args, words", [
    (["--method", "prefix", "--num-virtual-tokens", "5000"], "--seq-len 128 + --num-virtual-tokens 5000 = 5128 positions"),
    (["--seq-len", "600"], "--seq-len 600 exceeds the model's max_position_embeddings (512)"),
    (["--batch-size", "0"], "--batch-size 0: must be positive"),
    (["--head-layers", "3", "--tail-layers", "3"], "leave no block of the model's 6 for the server"),
    (["--capacity", "lots"], "--capacity: not a size"),
    (["--model", "no-such-dir"], "--model no-such-dir: not a checkpoint directory"),
    (["--batch-size", "four"], "argument --batch-size: invalid int value"),
])  # fmt: skip
def test_estimate_refuses_a_mistake_in_one_line_before_the_imports(no_torch, args, words):
    out, s = _tool("tools.estimate", *args, env=no_torch)
    _one_line(out, words)
    assert s < QUICK_S


def test_estimate_checks_a_checkpoints_config_before_the_imports(no_torch, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 64, "num_hidden_layers": 2}))
    out, _ = _tool("tools.estimate", "--model", str(tmp_path), "--seq-len", "65", env=no_torch)
    _one_line(out, "--seq-len 65 exceeds the model's max_position_embeddings (64)")
    (tmp_path / "config.json").write_text("{not json")
    out, _ = _tool("tools.estimate", "--model", str(tmp_path), env=no_torch)
    _one_line(out, "config.json does not read as JSON")


def test_the_estimates_builtin_shape_is_the_builtin_models():
    from menos.models import builtin_config
    from tools.cli_args import BUILTIN_SHAPE

    cfg = builtin_config()
    assert BUILTIN_SHAPE == {k: getattr(cfg, k) for k in BUILTIN_SHAPE}


@pytest.mark.parametrize("method, header", [
    ("lora", "LoRA r=8 on q_proj,v_proj;"),
    ("dora", "DoRA r=8 on q_proj,v_proj;"),
    ("rslora", "rsLoRA r=8 on q_proj,v_proj;"),
    ("ia3", "IA3 on k_proj,v_proj,down_proj (PEFT's defaults for llama);"),
    ("prefix", "prefix tuning, 20 virtual tokens;"),
])  # fmt: skip
def test_estimate_names_the_method_it_estimated(capsys, method, header):
    from tools.estimate import main

    assert main(["--method", method]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith(header), lines[3]
    assert main(["--method", method, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["method"] == method and (r["lora_r"] == 8) == (method in ("lora", "dora", "rslora"))
    assert r["target_modules"] == {"ia3": ["k_proj", "v_proj", "down_proj"], "prefix": []}.get(method, ["q_proj", "v_proj"])


# --------------------------------------------------------------------------- menos-generate


def test_generate_says_at_once_that_nothing_answers_at_connect(no_torch):
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    out, s = _tool("tools.generate", "--connect", endpoint, "--prompt-ids", "1 2", env=no_torch)
    _one_line(out, f"--connect {endpoint}: nothing answered", code=1)
    assert "is a manager running there?" in out.stderr and s < QUICK_S


@pytest.mark.parametrize("args, words", [
    (["--connect", "127.0.0.1:5555", "--prompt-ids", "1"], "--connect: endpoint '127.0.0.1:5555'"),
    (["--prompt-ids", "one two"], "--prompt-ids 'one two': space-separated integers"),
    (["--prompt-ids", "1", "--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    (["--prompt-ids", "1", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--prompt-ids", "1", "--adapter", "no-such-adapter"], "--adapter no-such-adapter: no such directory"),
    (["--prompt-ids", "1", "--client-key", "a.key_secret"], "CURVE needs both --client-key"),
    (["--prompt", "hello"], "no tokenizer found for --prompt"),
    (["--max-new-tokens", "3"], "one of the arguments --prompt --prompt-ids is required"),
])  # fmt: skip
def test_generate_refuses_a_mistake_in_one_line_before_the_imports(no_torch, args, words):
    out, s = _tool("tools.generate", *args, env=no_torch)
    _one_line(out, words)
    assert s < QUICK_S


def test_generate_names_a_broken_adapter_directory(no_torch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out, _ = _tool("tools.generate", "--adapter", str(empty), "--prompt-ids", "1", env=no_torch)
    _one_line(out, "no adapter_config.json there")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{")
    out, _ = _tool("tools.generate", "--adapter", str(broken), "--prompt-ids", "1", env=no_torch)
    _one_line(out, f"{broken / 'adapter_config.json'} does not read as JSON")
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA"}')  # a config, but no weights
    out, _ = _tool("tools.generate", "--adapter", str(broken), "--prompt-ids", "1", env=no_torch)
    _one_line(out, f"--adapter {broken}: adapter_config.json is there but not the adapter's weights")
    (broken / "adapter_model.safetensors").write_bytes(b"\x40" + b"\0" * 7 + b'{"a": ')  # a header cut short
    out, _ = _tool("tools.generate", "--adapter", str(broken), "--prompt-ids", "1", env=no_torch)
    _one_line(out, "adapter_model.safetensors is not a readable safetensors file")


@pytest.mark.parametrize("error, code", [(ValueError("init_adapter: another base"), 2),
                                         (menos.MenosError("bad_request", "seq_len too long"), 1)])  # fmt: skip
def test_generate_prints_what_connect_raises_as_one_line(monkeypatch, capsys, error, code):
    from tools import generate

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(generate, "check_reachable", lambda *a: None)
    monkeypatch.setattr(menos, "connect", refuse, raising=False)
    assert generate.main(["--prompt-ids", "1 2"]) == code
    err = capsys.readouterr().err
    assert err.startswith("menos-generate: ") and len(err.strip().splitlines()) == 1 and error.args[-1] in err


# --------------------------------------------------------------------------- menos-demo


@pytest.mark.parametrize("args, words", [
    (["--seq-len", "600"], "--seq-len 600: the built-in model takes 2 to 496 here"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--steps", "5"], "--steps 5: lr_schedule='cosine' needs total_steps > warmup_steps"),
    (["--steps", "0"], "--steps 0: too few; use --steps 8 or more"),
    (["--device", "tpu"], "--device 'tpu': use cpu, cuda or cuda:N"),
])  # fmt: skip
def test_demo_refuses_a_mistake_before_starting_anything(no_torch, tmp_path, args, words):
    out, s = _tool("tools.demo", *args, env=dict(no_torch, TMPDIR=str(tmp_path)))
    _one_line(out, words)
    assert s < QUICK_S and not os.listdir(tmp_path)  # no manager, no state dir
    if args[0] == "--steps":
        assert "use --steps 8 or more" in out.stderr


def test_one_failed_client_does_not_leave_the_others_waiting_on_the_barrier():
    from tools.harness import run_clients

    def client(i, barrier):
        if i == 1:
            raise ValueError("client 1 gave up")
        barrier.wait()
        return i

    with _Clock() as t, pytest.raises(ValueError, match="client 1 gave up"):
        run_clients(client, [(0,), (1,), (2,)], timeout_s=60, threads=True)
    assert t.s < QUICK_S
    assert run_clients(lambda i, barrier: (barrier.wait(), i)[1], [(0,), (1,)], threads=True) == [0, 1]


# --------------------------------------------------------------------------- data that trains nothing


def test_sft_batches_refuse_a_prompt_that_leaves_no_response_token():
    tok = ByteTokenizer()
    pairs = [("Q: ok? A: ", "yes."), ("x" * 40, "y"), ("Q: ", "")]
    with pytest.raises(ValueError, match=r"example 1: its prompt is 40 tokens and seq_len is 32: no response token"):
        sft_batches(pairs, tok, batch_size=2, seq_len=32)
    with pytest.raises(ValueError, match=r"example 1: its response '' gives no token to learn from"):
        sft_batches([pairs[0], pairs[2]], tok, batch_size=2, seq_len=32)
    with pytest.raises(ValueError, match=r"example 0: expected a \(prompt, response\) pair"):
        sft_batches(["just a prompt"], tok, batch_size=2, seq_len=32)
    with pytest.raises(ValueError, match="batch_size=0: an int of at least 1"):
        sft_batches(pairs[:1], tok, batch_size=0, seq_len=32)
    assert len(sft_batches([("x" * 31, "y")], tok, batch_size=2, seq_len=32)) == 1  # one response token fits
    with pytest.raises(ValueError, match=r"row 1: its labels are all -100 within seq_len=4"):
        list(rows_batches([{"input_ids": [1, 2, 3]}, {"input_ids": [1] * 8, "labels": [-100] * 6 + [1, 1]}], 2, 4))


def test_fit_refuses_data_that_trains_nothing_and_goes_round_a_list(shared_manager):
    mgr = shared_manager("llama")
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(2)]
    with menos.connect(mgr.endpoint, identity="second-hour-fit", **CLIENT) as c:
        for data, steps, words in [([], None, "batches holds no batch"), (iter([]), 3, "batches holds no batch"),
                                   (batches, 0, "steps=0: a positive number"), (batches, -1, "steps=-1"),
                                   (batches, 2.5, "steps=2.5")]:  # fmt: skip
            with pytest.raises(ValueError, match=words):
                c.fit(data, steps=steps, progress=False)
        with pytest.raises(TypeError, match="batches is one array"):
            c.fit(batches[0], progress=False)
        with pytest.raises(ValueError, match="eval_batches is empty"):
            c.fit(batches, eval_batches=[], progress=False)
        assert len(c.fit(batches, steps=5, progress=False)) == 5  # another epoch, as the Trainer's max_steps
        rows = [{"input_ids": list(range(1, 9))}] * 2  # records go round too
        assert len(c.fit(rows, steps=3, progress=False)) == 3
        one_shot = iter(batches + batches[:1])
        with pytest.warns(UserWarning, match=r"steps=5, but the batches ended after 3"):
            assert len(c.fit(one_shot, steps=5, progress=False)) == 3
        kept = iter(batches)
        assert len(c.fit(kept, steps=1, progress=False)) == 1
        assert next(kept) is batches[1]  # a one-shot iterator keeps what was not trained on
