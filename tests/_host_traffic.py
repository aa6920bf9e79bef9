"""Count the operations that make a GPU wait for the host, on any device (the CPU included).

On CUDA, reading a value back (`.item()`, `float(t)`, `bool(t)`) waits for every queued kernel, and
building a tensor from host data (`torch.tensor(list)`, `torch.from_numpy`) then copying it to the
GPU waits too. Both pass through torch's dispatcher as `aten._local_scalar_dense` and
`aten.lift_fresh`, on the CPU as on a GPU, so counting them on a CPU shows what a GPU run would do.
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

HOST_OPS = {"aten._local_scalar_dense.default": "reads", "aten.lift_fresh.default": "host_tensors"}


class HostTraffic(TorchDispatchMode):
    """`with HostTraffic() as traffic: ...` then `traffic.reads`, `traffic.host_tensors`."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = HOST_OPS.get(str(func))
        if name:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def reads(self) -> int:
        return self.counts["reads"]

    @property
    def host_tensors(self) -> int:
        return self.counts["host_tensors"]
