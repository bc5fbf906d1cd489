"""The vanilla baseline's task swapping: where a task's own copy of its base weights
goes while another client's task needs the memory.

Vanilla split learning keeps one model copy per client and, when the next task would
not fit, swaps tasks out after their iteration and back in at their next request
(paper, section 5.1). The base weights are frozen, so swapping out writes nothing: the
slower tier already holds them.

- ``FileSwap`` (CPU): the tier is the manager's weights file under the state dir. Out:
  the tensors are freed. In: they are read back, and their pages are dropped from the
  page cache (which is memory too), so every swap-in reads from the disk.
- ``HostSwap`` (CUDA): the tier is host memory. The first swap-out copies the weights
  to (pinned) host memory once; out frees the device copies, in copies them back.

Adapters and optimizer states stay resident, as they do under Menos: they are small,
per client in both systems, and outside the scheduler's capacity in both.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from menos.weight_files import FileTensors


class TaskSwap:
    def __init__(self, params: Mapping[str, nn.Parameter], int8_layers: Sequence[nn.Module] = ()):
        self.params = dict(params)  # base tensor name -> the module's frozen parameter
        # bitsandbytes' int8 layers keep their weight in state.CB too, after their first forward:
        # it follows the weight here, or a swapped-out task would keep its copy
        self.int8_layers = list(int8_layers)
        self.nbytes = sum(p.numel() * p.element_size() for p in self.params.values())
        self.resident = True
        self.swaps = 0

    def swap_out(self) -> None:
        if self.resident:
            self._out()
            self.resident = False

    def swap_in(self) -> None:
        if not self.resident:
            try:
                self._in()
                self._follow()
            except BaseException:
                self._free()  # nothing half-loaded stays behind a released grant
                raise
            self.resident = True
            self.swaps += 1

    def _free(self) -> None:
        for p in self.params.values():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self._follow()

    def _follow(self) -> None:
        for layer in self.int8_layers:
            if layer.state.CB is not None:  # None: no forward yet, bnb reads the weight itself
                layer.state.CB = layer.weight.data


class FileSwap(TaskSwap):
    def __init__(self, params: Mapping[str, nn.Parameter], source: FileTensors, int8_layers: Sequence[nn.Module] = ()):
        super().__init__(params, int8_layers)
        self.source = source

    def _out(self) -> None:
        self._free()

    def _in(self) -> None:
        for name, p in self.params.items():
            p.data = self.source[name].to(p.device)
        self.source.evict(self.params)


class HostSwap(TaskSwap):
    def __init__(self, params: Mapping[str, nn.Parameter], int8_layers: Sequence[nn.Module] = ()):
        super().__init__(params, int8_layers)
        self.host: dict[str, torch.Tensor] = {}

    def _out(self) -> None:
        if not self.host:  # frozen: one host copy serves every swap
            self.host = {n: p.data.to("cpu").pin_memory() for n, p in self.params.items()}
        device = next(iter(self.params.values())).device
        self._free()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the memory back to the driver for other workers

    def _in(self) -> None:
        for name, p in self.params.items():
            p.data = self.host[name].to(p.device, non_blocking=True)
        torch.cuda.synchronize(next(iter(self.params.values())).device)


def task_swap(params: Mapping[str, nn.Parameter], source, device: torch.device,
              int8_layers: Sequence[nn.Module] = ()) -> TaskSwap:  # fmt: skip
    """The swap for ``device``: host memory under CUDA, the weights file on CPU."""
    if device.type == "cuda":
        return HostSwap(params, int8_layers)
    return FileSwap(params, source, int8_layers)
