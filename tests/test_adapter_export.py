"""The whole model's adapter, exported in PEFT's format, loads onto the full local model."""

import pytest
import torch
from peft import PeftModel

import menos
from menos.messages import ErrorCode, LoraSpec
from menos.models import load_base

CLIENT = dict(batch_size=2, seq_len=16, lr=2e-2, head_layers=1, tail_layers=1,
              adapter=LoraSpec(r=4, alpha=8, target_modules=("q_proj", "k_proj", "v_proj")))  # fmt: skip


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_exported_adapter_reproduces_the_split_model(name, checkpoints, shared_manager, tmp_path):
    path = checkpoints(name)
    mgr = shared_manager(name)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with menos.connect(mgr.endpoint, **CLIENT) as c:
        for _ in range(3):
            c.train_step(ids)
        split_loss = c.eval_step(ids)
        out = c.save_adapter(str(tmp_path / "adapter"))
    _, full = load_base(path, torch.float32)
    with torch.no_grad():
        base_loss = full(ids, labels=ids).loss.item()
        peft_model = PeftModel.from_pretrained(full, out).eval()
        peft_loss = peft_model(ids, labels=ids).loss.item()
    print(f"\n{name}: base {base_loss:.6f}, split {split_loss:.6f}, exported adapter {peft_loss:.6f}")
    assert peft_loss == pytest.approx(split_loss, abs=1e-5)
    assert abs(peft_loss - base_loss) > 1e-3  # the adapter is really there, trained


def test_export_can_be_forbidden(checkpoints, start_manager, tmp_path):
    mgr = start_manager("--model", checkpoints("llama"), "--no-adapter-export")
    with menos.connect(mgr.endpoint, **CLIENT) as c:
        with pytest.raises(menos.MenosError) as exc:
            c.save_adapter(str(tmp_path / "adapter"))
        assert exc.value.code == ErrorCode.FORBIDDEN
        assert c.train_step(torch.randint(0, 128, (2, 16))) > 0  # the session goes on
