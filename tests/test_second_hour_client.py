"""A new user's second hour, the client's side: an adapter for another base, a broken
adapter directory, a resume with another cut or adapter, a streamer that is no streamer.
Each gets one clear line naming the argument and the fix, nothing is lost, and the
manager serves on; saving and reading an adapter print no warning Menos could avoid."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

import menos
from menos.export import peft_adapter_spec, read_peft_adapter
from menos.messages import ErrorCode, LoraSpec, PrefixSpec

CLIENT = dict(batch_size=2, seq_len=16, lr=1e-2, seed=5, head_layers=1, tail_layers=1)
NOWHERE = "tcp://127.0.0.1:9"  # nothing listens: a refusal that names the mistake came before connecting


def _batch(i):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(40 + i))


def _serves(mgr) -> None:
    with menos.connect(mgr.endpoint, **CLIENT) as other:
        assert other.train_step(_batch(9)) > 0


# ---------------------------------------------------------------- an adapter for another base (#1)


@pytest.mark.parametrize("adapter, tensor, saved, expected", [
    (LoraSpec(r=4), "q_proj.lora_A.weight", (4, 64), (4, 256)),
    (PrefixSpec(num_virtual_tokens=3), "prompt_embeddings", (3, 256), (3, 2048)),  # layers x 2 x kv_heads x head_dim
])  # fmt: skip
def test_an_adapter_for_another_base_is_refused_naming_the_tensor_its_shape_and_the_cause(
        shared_manager, checkpoints, tmp_path, adapter, tensor, saved, expected):  # fmt: skip
    directory = str(tmp_path / "adapter")
    with menos.connect(shared_manager("llama").endpoint, adapter=adapter, **CLIENT) as c:  # hidden 64
        c.train_step(_batch(0))
        c.save_adapter(directory)
    small = shared_manager("small")  # hidden 256
    with pytest.raises(ValueError) as exc:
        menos.connect(small.endpoint, init_adapter=directory, **CLIENT)
    msg = str(exc.value)
    assert directory in msg and tensor in msg and f"has shape {saved} there" in msg and f"expects {expected}" in msg
    assert "hidden size 256" in msg and "another base model" in msg
    _serves(small)
    # menos-generate --adapter reads the same directory, with the same one line
    config = AutoConfig.from_pretrained(checkpoints("small"))
    with pytest.raises(ValueError, match=re.escape(f"expects {expected}")):
        read_peft_adapter(directory, peft_adapter_spec(directory), config, torch.float32)


# ---------------------------------------------------------------- broken adapter directories (#9)


def _adapter_dir(tmp_path, name: str) -> str:
    from peft import LoraConfig

    directory = str(tmp_path / name)
    LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM").save_pretrained(directory)
    return directory


def test_broken_adapter_directories_are_refused_before_connecting_naming_the_file(tmp_path):
    cases = []
    no_weights = _adapter_dir(tmp_path, "no-weights")  # the config alone (PEFT would ask the Hub for it)
    cases.append((no_weights, "adapter_config.json is there but not the adapter's weights"))
    broken = _adapter_dir(tmp_path, "broken-json")
    with open(os.path.join(broken, "adapter_config.json"), "w") as f:
        f.write('{"peft_type": "LORA", "r": 4,')
    cases.append((broken, "adapter_config.json is not valid JSON"))
    not_peft = _adapter_dir(tmp_path, "not-peft")
    with open(os.path.join(not_peft, "adapter_config.json"), "w") as f:
        json.dump({"r": 4}, f)
    cases.append((not_peft, "adapter_config.json names no peft_type"))
    truncated = _adapter_dir(tmp_path, "truncated")
    with open(os.path.join(truncated, "adapter_model.safetensors"), "wb") as f:
        f.write(b"\x40" + b"\0" * 7 + b'{"a": ')
    cases.append((truncated, "adapter_model.safetensors is not a readable safetensors file"))
    for directory, words in cases:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=words) as exc:
            menos.connect(NOWHERE, init_adapter=directory, **CLIENT)
        assert time.monotonic() - t0 < 2
        assert f"init_adapter={directory!r}" in str(exc.value) and "\n" not in str(exc.value)
        with pytest.raises(ValueError, match=words):
            peft_adapter_spec(directory)  # what menos-generate --adapter reads


# ---------------------------------------------------------------- resume with another cut or adapter (#4)


def test_a_resume_with_another_cut_or_adapter_is_refused_before_connecting(shared_manager, tmp_path):
    mgr = shared_manager("llama")
    state = str(tmp_path / "state")
    with menos.connect(mgr.endpoint, identity="second-hour-cut", state_dir=state, **CLIENT) as c:
        c.train_step(_batch(0))
    where = f"the checkpoint of step 1 in {state!r}"
    again = dict(CLIENT, identity="second-hour-cut", state_dir=state, resume=True)
    with pytest.raises(ValueError, match="start without resume=True") as exc:
        menos.connect(NOWHERE, **dict(again, head_layers=2))
    assert str(exc.value) == (f"resume=True: {where} was saved with head_layers=1, tail_layers=1; this connect asks "
                              "head_layers=2, tail_layers=1: connect with the saved cut, or start without resume=True")
    with pytest.raises(ValueError, match="saved with head_layers=1, tail_layers=1; this connect asks head_layers=1, "
                                         "tail_layers=0: connect with the saved cut"):  # fmt: skip
        menos.connect(NOWHERE, **dict(again, tail_layers=0))
    with pytest.raises(ValueError, match="saved with adapter lora r8 q\\+v; this connect asks adapter lora r4 "
                                         "q\\+v: connect with the saved adapter"):  # fmt: skip
        menos.connect(NOWHERE, adapter=LoraSpec(r=4), **again)
    with pytest.raises(ValueError, match="saved with head_layers=1, tail_layers=1, adapter lora r8 q\\+v; this "
                                         "connect asks head_layers=2, tail_layers=1, adapter ia3 default: connect "
                                         "with the saved cut and adapter"):  # fmt: skip
        menos.connect(NOWHERE, adapter=menos.IA3Spec(), **dict(again, head_layers=2))
    with menos.connect(mgr.endpoint, adapter=LoraSpec(alpha=32), **again) as c:  # nothing was lost; alpha may change
        assert c.steps == 1 and c.train_step(_batch(1)) > 0


def _without_layout(path: str) -> None:
    """A checkpoint as written before checkpoints recorded their layout."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["menos"])
    meta.pop("layout")
    save_file(load_file(path), path, metadata={"menos": json.dumps(meta)})


def test_the_worker_refuses_a_server_checkpoint_of_another_cut_in_one_line_and_serves_on(shared_manager, tmp_path):
    """The client's own checkpoint cannot tell (saved before checkpoints recorded their cut):
    the worker refuses, without a traceback or a death, and nothing is lost."""
    from manager.sessions import checkpoint_dir

    mgr = shared_manager("llama")
    state = str(tmp_path / "state")
    again = dict(CLIENT, identity="second-hour-worker", state_dir=state, resume=True)
    with menos.connect(mgr.endpoint, **dict(again, resume=False)) as c:
        c.train_step(_batch(0))
    _without_layout(os.path.join(state, "step-00000001.safetensors"))
    with pytest.raises(menos.MenosError) as exc:
        menos.connect(mgr.endpoint, **dict(again, head_layers=2))
    assert exc.value.code == ErrorCode.WORKER_FAILED
    assert ("resume=True: the server's checkpoint of step 1 was saved with head_layers=1, tail_layers=1; this "
            "connect asks head_layers=2, tail_layers=1: connect with the saved cut, or start without resume=True"
            in str(exc.value))  # fmt: skip
    assert "Traceback" not in str(exc.value) and "optimizer" not in str(exc.value)
    # Both sides from before layouts were recorded: the tensors themselves tell.
    server = checkpoint_dir(mgr.state_dir, "second-hour-worker")
    _without_layout(os.path.join(server, "step-00000001.safetensors"))
    with pytest.raises(menos.MenosError, match="the server's checkpoint of step 1 holds another adapter than this "
                                               "session's .*connect with the saved cut and adapter"):  # fmt: skip
        menos.connect(mgr.endpoint, **dict(again, head_layers=2))
    _serves(mgr)
    with menos.connect(mgr.endpoint, **again) as c:  # the right cut resumes where it was
        assert c.steps == 1 and c.train_step(_batch(1)) > 0


# ---------------------------------------------------------------- a streamer that is no streamer (#15)


def test_a_streamer_without_put_and_end_is_refused_before_anything_runs(shared_manager):
    with menos.connect(shared_manager("llama").endpoint, **CLIENT) as c:
        prompt = _batch(0)[:, :4]
        with pytest.raises(TypeError, match=r"streamer=<built-in function print> has no put\(\) or end\(\): pass a "
                                            r"transformers streamer such as TextStreamer\(tokenizer\)"):  # fmt: skip
            c.generate(prompt, max_new_tokens=2, streamer=print)
        assert c.generate(prompt, max_new_tokens=2, eos_token_id=[]).shape == (2, 6)  # the session is as it was
        assert c.train_step(_batch(1)) > 0


# ---------------------------------------------------------------- no warning Menos could avoid (#18)


def test_save_adapter_init_adapter_and_menos_generate_print_no_warning(shared_manager, checkpoints, tmp_path):
    mgr = shared_manager("llama")
    directory = str(tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with menos.connect(mgr.endpoint, model=checkpoints("llama"), **CLIENT) as c:
            c.train_step(_batch(0))
            c.save_adapter(directory)
        with menos.connect(mgr.endpoint, init_adapter=directory, **CLIENT) as c:
            assert c.train_step(_batch(1)) > 0
    assert [str(w.message) for w in caught] == []
    with open(os.path.join(directory, "adapter_config.json")) as f:  # the base's name is kept (it was dropped)
        assert json.load(f)["base_model_name_or_path"] == checkpoints("llama")
    run = subprocess.run([sys.executable, "-m", "tools.generate", "--connect", mgr.endpoint, "--adapter", directory,
                          "--prompt-ids", "1 2 3", "--max-new-tokens", "2"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr, run.stderr
