"""Generation through the split against ``transformers``' ``generate`` on the whole model
(the exported PEFT adapter on the local base), and the generation's memory token under
the scheduler, through real processes."""

from __future__ import annotations

import peft
import pytest
import torch

import menos
from menos.messages import IA3Spec, LoraSpec
from menos.models import load_base

CLIENT = dict(batch_size=3, seq_len=16, lr=1e-2, seed=3)
NEW = 12


def _batch(i, n=3):
    return torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(70 + i))


def _prompts():
    """Three prompts of 8, 5 and 7 tokens, left-padded to 8 with id 0."""
    ids = torch.randint(1, 128, (3, 8), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name, adapter, head, tail", [
    ("llama", LoraSpec(r=4, alpha=8), 1, 1),
    ("opt", IA3Spec(), 2, 0),
])  # fmt: skip
def test_greedy_and_sampled_generation_equal_the_whole_models(shared_manager, checkpoints, tmp_path, name, adapter,
                                                              head, tail):  # fmt: skip
    ids, mask = _prompts()
    with menos.connect(shared_manager(name).endpoint, adapter=adapter, head_layers=head, tail_layers=tail, **CLIENT) as c:
        greedy = dict(max_new_tokens=NEW, pad_token_id=0)
        before = c.generate(ids[:2], **greedy)
        for i in range(3):
            c.train_step(_batch(i))
        c.save_adapter(str(tmp_path / "adapter"))
        unpadded = c.generate(ids[:2], **greedy)
        padded = c.generate(ids, attention_mask=mask, **greedy)
        eos = int(padded[0, 8 + 3])  # row 0 ends at its 4th new token; the others, if they meet it
        ended = c.generate(ids, attention_mask=mask, eos_token_id=eos, **greedy)
        sample = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=NEW, pad_token_id=0)
        sampled = c.generate(ids, attention_mask=mask, seed=5, **sample)
        again = c.generate(ids, attention_mask=mask, seed=5, **sample)
        base = c.generate(ids[:2], adapter=False, **greedy)
    assert unpadded.shape == (2, 8 + NEW) and padded.shape == (3, 8 + NEW)
    assert torch.equal(unpadded[:, :8], ids[:2]) and torch.equal(padded[:, :8], ids)
    assert torch.equal(base, before)  # a fresh adapter is the base; adapter=False is the base after training
    assert not torch.equal(unpadded, before)  # training changed what the model says
    assert torch.equal(sampled, again)
    assert (ended[0, 8 + 4:] == 0).all() and ended[0, 8 + 3] == eos
    _, full = load_base(checkpoints(name), torch.float32)
    local = peft.PeftModel.from_pretrained(full, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(unpadded, local.generate(ids[:2], attention_mask=torch.ones(2, 8, dtype=torch.long), **greedy))
        assert torch.equal(padded, local.generate(ids, attention_mask=mask, **greedy))
        assert torch.equal(ended, local.generate(ids, attention_mask=mask, **{**greedy, "eos_token_id": eos}))
        torch.manual_seed(5)  # transformers draws from the global generator: the same stream as seed=5
        assert torch.equal(sampled, local.generate(ids, attention_mask=mask, **sample))
        with local.disable_adapter():
            assert torch.equal(base, local.generate(ids[:2], attention_mask=torch.ones(2, 8, dtype=torch.long), **greedy))
