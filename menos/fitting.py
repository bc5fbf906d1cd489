"""The training loop over a data set: ``Client.fit``."""

from __future__ import annotations


def fit(client, batches, steps: int | None = None, eval_batches=None, progress: bool | None = None,
        tokenizer=None, text_column: str = "text", loss_fn=None) -> list[float]:  # fmt: skip
    """Train on ``batches`` for ``steps`` steps (default: until they end); returns the loss
    of every step (micro-batch). ``batches``: an iterable of input_ids, or of (input_ids,
    labels) with -100 where no loss is wanted (``menos.data.sft_batches`` builds those
    from prompt/response pairs); or records such as a Hugging Face ``datasets.Dataset``
    with input_ids (and labels) columns, or a ``text_column`` and a ``tokenizer``.

    A tqdm bar shows loss, seconds per iteration and queue time (off when not on a
    terminal, or with progress=False). With ``eval_batches``, the mean eval loss at the
    end is appended to ``client.eval_losses`` and shown."""
    from tqdm.auto import tqdm

    from menos.data import is_rows, rows_batches

    if is_rows(batches):
        batches = rows_batches(batches, client.batch_size, client.seq_len, tokenizer, text_column)
    if eval_batches is not None and is_rows(eval_batches):
        eval_batches = list(rows_batches(eval_batches, client.batch_size, client.seq_len, tokenizer, text_column))
    losses: list[float] = []
    it = iter(batches)
    bar = tqdm(total=steps, disable=None if progress is None else not progress, unit="step", desc="menos")
    try:
        while steps is None or len(losses) < steps:
            try:
                batch = next(it)
            except StopIteration:
                break
            ids, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
            losses.append(client.train_step(ids, labels, loss_fn))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", s_it=f"{client.times.total[-1]:.3f}",
                            queue=f"{client.times.server_queue[-1]:.3f}")  # fmt: skip
        if eval_batches is not None:
            evals = [client.eval_step(*(b if isinstance(b, (tuple, list)) else (b,)), loss_fn=loss_fn)
                     for b in eval_batches]  # fmt: skip
            client.eval_losses.append(sum(evals) / len(evals))
            bar.set_postfix(loss=f"{losses[-1]:.4f}" if losses else "-", eval=f"{client.eval_losses[-1]:.4f}")
    finally:
        bar.close()
    return losses
