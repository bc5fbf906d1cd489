"""The training loop over a data set: ``Client.fit``."""

from __future__ import annotations

import warnings


def fit(client, batches, steps: int | None = None, eval_batches=None, progress: bool | None = None,
        tokenizer=None, text_column: str = "text", loss_fn=None) -> list[float]:  # fmt: skip
    """Train on ``batches`` for ``steps`` steps (default: once through them); returns the
    loss of every step (micro-batch). ``batches``: an iterable of input_ids, or of
    (input_ids, labels) with -100 where no loss is wanted (``menos.data.sft_batches`` builds
    those from prompt/response pairs); or records such as a Hugging Face ``datasets.Dataset``
    with input_ids (and labels) columns, or a ``text_column`` and a ``tokenizer``.

    More ``steps`` than batches goes over them again, epoch after epoch, as the
    transformers Trainer does with ``max_steps``, where they can be iterated again (a list,
    a Dataset, a DataLoader); a one-shot iterator (a generator) that ends first ends the
    run with a warning that says how many steps ran. No batch at all is a ValueError.

    A tqdm bar shows loss, seconds per iteration and queue time (off when not on a
    terminal, or with progress=False). With ``eval_batches``, the mean eval loss at the
    end is appended to ``client.eval_losses`` and shown."""
    from tqdm.auto import tqdm

    from menos.data import is_rows, rows_batches

    _check_steps(steps)
    if hasattr(batches, "shape") and hasattr(batches, "dtype"):  # iterating one would train on its rows
        raise TypeError("fit: batches is one array; pass an iterable of batches, e.g. [input_ids]")
    if not hasattr(batches, "__iter__"):
        raise TypeError(f"fit: batches is {type(batches).__name__}; pass an iterable of batches, e.g. [input_ids], "
                        "or a datasets.Dataset")  # fmt: skip
    if eval_batches is not None and hasattr(eval_batches, "__len__") and len(eval_batches) == 0:
        raise ValueError("eval_batches is empty: pass at least one batch, or leave it out")
    if is_rows(batches):
        rows = batches
        batches = _Again(lambda: rows_batches(rows, client.batch_size, client.seq_len, tokenizer, text_column))
    if eval_batches is not None and is_rows(eval_batches):
        eval_batches = list(rows_batches(eval_batches, client.batch_size, client.seq_len, tokenizer, text_column))
    losses: list[float] = []
    bar = tqdm(total=steps, disable=None if progress is None else not progress, unit="step", desc="menos")
    try:
        for batch in _epochs(batches, steps):
            ids, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
            losses.append(client.train_step(ids, labels, loss_fn))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", s_it=f"{client.times.total[-1]:.3f}",
                            queue=f"{client.times.server_queue[-1]:.3f}")  # fmt: skip
        if not losses:  # nothing trained: the caller's losses[0] would fail far from here
            raise ValueError("fit: batches holds no batch: nothing to train on")
        if steps is not None and len(losses) < steps:
            warnings.warn(f"fit: steps={steps}, but the batches ended after {len(losses)} (a one-shot iterator, "
                          "such as a generator, cannot start again): trained those; pass a list or a Dataset "
                          "to go over them again", stacklevel=3)  # fmt: skip
        if eval_batches is not None:
            loss = _evaluate(client, eval_batches, loss_fn)
            if loss is not None:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", eval=f"{loss:.4f}")
    finally:
        bar.close()
    return losses


def _check_steps(steps) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"fit: steps={steps!r}: a positive number of steps (train_step calls), "
                         "or None to go once through the batches")  # fmt: skip


class _Again:
    """An iterable that builds a fresh iterator each time: records can go round again."""

    def __init__(self, make):
        self.make = make

    def __iter__(self):
        return self.make()


def _epochs(batches, steps: int | None):
    """Up to ``steps`` batches (None: one pass), starting ``batches`` again while they allow
    it. Never takes a batch it will not train on: a one-shot iterator keeps the rest."""
    it = iter(batches)  # once per pass: a DataLoader starts its workers on each
    again = it is not batches
    done = 0
    while True:
        n = 0
        while steps is None or done < steps:
            try:
                batch = next(it)
            except StopIteration:
                break
            n, done = n + 1, done + 1
            yield batch
        if steps is None or done >= steps or n == 0 or not again:  # one pass asked, done, empty, or no second pass
            return
        it = iter(batches)


def _evaluate(client, eval_batches, loss_fn) -> float | None:
    """The mean eval loss, also appended to ``client.eval_losses``; None for no batch."""
    evals = [client.eval_step(*(b if isinstance(b, (tuple, list)) else (b,)), loss_fn=loss_fn) for b in eval_batches]
    if not evals:  # a generator that yielded nothing: the training stands, say so
        warnings.warn("fit: eval_batches held no batch: no eval loss", stacklevel=4)
        return None
    client.eval_losses.append(sum(evals) / len(evals))
    return client.eval_losses[-1]
