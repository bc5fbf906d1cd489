"""Data as people have it: prompt/response pairs with the checkpoint's tokenizer, padded
batches with -100 labels, Hugging Face datasets; and the README's SFT example, as written."""

import os
import re

import pytest
import torch

import menos
from menos.data import pad_batch, rows_batches, sft_batches, sft_example, tokenizer_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def word_tokenizer_checkpoint(tmp_path_factory, checkpoints):
    """The tiny Llama checkpoint with a real Hugging Face tokenizer (word level, BOS/EOS/PAD)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the sky is blue grass green what color of ? .".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                 unk_token="[UNK]")  # fmt: skip
    path = str(tmp_path_factory.mktemp("tok") / "llama-tok")
    shutil.copytree(checkpoints("llama"), path)
    hf.save_pretrained(path)
    return path


def test_sft_example_puts_the_loss_on_the_response_only(word_tokenizer_checkpoint):
    tok = tokenizer_for(word_tokenizer_checkpoint)
    assert type(tok).__name__ != "ByteTokenizer"  # the checkpoint's own
    ids, labels = sft_example("what color is the sky ?", "blue .", tok, seq_len=32)
    prompt = 1 + len(tok.encode("what color is the sky ?", add_special_tokens=False))
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert labels[:prompt] == [-100] * prompt and labels[prompt:] == ids[prompt:]
    assert tok.decode(ids[prompt:-1]) == "blue ."
    short = sft_example("what color is the sky ?", "blue .", tok, seq_len=4)
    assert len(short[0]) == len(short[1]) == 4 and short[1] == [-100] * 4  # truncated: no response left


def test_batches_are_right_padded_with_no_loss_on_the_padding():
    ids, labels = pad_batch([([5, 6, 7], [-100, 6, 7]), ([8, 9], [8, 9])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert labels.tolist() == [[-100, 6, 7], [8, 9, -100]]
    batches = sft_batches([("ab", "cd")] * 5, menos.data.ByteTokenizer(), batch_size=2, seq_len=16)
    assert [tuple(b[0].shape) for b in batches] == [(2, 4), (2, 4), (1, 4)]
    with pytest.raises(ValueError, match="labels"):
        pad_batch([([1, 2, 3], [1, 2])])
    with pytest.raises(ValueError, match="neither input_ids"):
        list(rows_batches([{"prompt": "x"}], 2, 8))


def test_sft_with_the_checkpoints_tokenizer_trains_on_a_dataset(word_tokenizer_checkpoint, shared_manager):
    """A datasets.Dataset of input_ids/labels (and one of text with the tokenizer) goes
    straight into fit; padded batches of different lengths train the split model."""
    datasets = pytest.importorskip("datasets", reason="datasets is in the test extras")
    tok = tokenizer_for(word_tokenizer_checkpoint)
    pairs = [("what color is the sky ?", "blue ."), ("what color of grass ?", "green ."),
             ("the sky is", "blue ."), ("grass is", "green .")]  # fmt: skip
    rows = [dict(zip(("input_ids", "labels"), sft_example(p, r, tok, 16))) for p, r in pairs]
    data = datasets.Dataset.from_list(rows * 4)
    texts = datasets.Dataset.from_dict({"text": [p + " " + r for p, r in pairs]})
    mgr = shared_manager("llama")
    with menos.connect(mgr.endpoint, model=word_tokenizer_checkpoint, batch_size=4, seq_len=16, lr=2e-2,
                       identity="sft-dataset") as c:  # fmt: skip
        before = c.eval_step(*next(rows_batches(rows, 4, 16, tok)))
        losses = c.fit(data, progress=False) + c.fit(data, progress=False)
        after = c.eval_step(*next(rows_batches(rows, 4, 16, tok)))
        assert c.fit(texts, tokenizer=tok, progress=False)  # a text column and the tokenizer
    assert len(losses) == 8 and after < before - 0.05


def test_readme_sft_example_runs_as_written(shared_manager, tmp_path, monkeypatch):
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    code = re.search(r"<!-- sft-example -->\n```python\n(.*?)```", readme, re.S).group(1)
    mgr = shared_manager("llama")  # byte tokens of ASCII text fit its vocabulary of 128
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("tcp://127.0.0.1:5555", mgr.endpoint), "README.md", "exec"), scope)  # noqa: S102
    losses = scope["losses"]
    assert len(losses) == 16 and losses[-1] < losses[0]
    assert os.path.isfile(tmp_path / "sft-adapter" / "adapter_config.json")
    assert torch.isfinite(torch.tensor(losses)).all()
