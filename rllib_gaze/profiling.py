"""Counting what a piece of torch code asks of the device, machine-independently: the tensor
operations it dispatches and the points where it makes the host wait for the device.

``OpCounter`` sees every aten operation (forward and backward, on the calling thread) through a
``TorchDispatchMode``, and the host reads of tensors that dispatch nothing on a CPU (``tolist``,
``numpy``) through a ``TorchFunctionMode``. A host sync is an operation whose result the host must
have before it can go on, on a GPU a device-to-host wait: a tensor read as a Python number
(``.item()``, ``float``, ``int``, ``bool``, ``if tensor``: ``aten._local_scalar_dense``), an output
whose shape depends on the data (``nonzero``, ``masked_select``, boolean-mask indexing, ``unique``),
a copy to the host and ``tolist``/``numpy``. On a CPU none of these waits for anything, but the same
code on a GPU would, so the counts say on a CPU machine what a GPU run will pay.

Counts go to the innermost open ``section`` (``"other"`` outside any), so a caller can tell apart
the pieces of one update; sections also add up their wall time, exclusive of nested sections
(with the counting modes closed, to time without their overhead). Used by
``benchmarks/bench.py profile`` and the learner's tests.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten operations that always make the host wait (their result or its shape is read there)
SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique_dim",
    "aten._unique", "aten._unique2", "aten.unique_consecutive", "aten.bincount", "aten.equal",
    "aten.is_nonzero", "aten.repeat_interleave",
})
# operations that index with a tensor: a host sync when an index is a boolean mask
_INDEX_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})
# tensor methods that read the data on the host without dispatching anything on a CPU
_HOST_READS = frozenset({"tolist", "numpy", "__array__"})


def _is_host_sync(name: str, args: tuple) -> bool:
    if name in SYNC_OPS:
        return True
    if name in _INDEX_OPS and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())
    if name in ("aten._to_copy", "aten.copy_"):   # device -> host copies
        source = args[1] if name == "aten.copy_" else args[0]
        target = args[0] if name == "aten.copy_" else None
        return (isinstance(source, torch.Tensor) and source.device.type != "cpu"
                and (target is None or target.device.type == "cpu"))
    return False


class OpCounter:
    """Context manager counting, per section, the aten operations dispatched (``ops``) and the host
    syncs (``syncs``, by operation name) while it is open::

        counter = OpCounter()
        with counter:
            with counter.section("loss"):
                ...
        counter.ops["loss"], counter.syncs["loss"]  # int, Counter of operation names
        counter.seconds["loss"]                     # wall time inside, nested sections excluded

    ``synchronize``: called at each section boundary before the clock is read (a GPU's
    ``torch.cuda.synchronize`` for times that include the device's work).
    """

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.ops: Counter[str] = Counter()
        self.syncs: dict[str, Counter[str]] = {}
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self._sections = ["other"]
        self._stack = contextlib.ExitStack()
        self._synchronize = synchronize
        self._last: float | None = None

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Count and time what runs inside under ``name`` (nested sections: the innermost)."""
        self._lap()
        self._sections.append(name)
        self.calls[name] += 1
        try:
            yield
        finally:
            self._lap()
            self._sections.pop()

    def _lap(self) -> None:
        if self._synchronize is not None:
            self._synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.seconds[self._sections[-1]] += now - self._last
        self._last = now

    def sync_count(self, section: str | None = None) -> int:
        """Host syncs in ``section`` (``None``: in all)."""
        if section is None:
            return sum(sum(c.values()) for c in self.syncs.values())
        return sum(self.syncs.get(section, Counter()).values())

    def _record(self, name: str, sync: bool) -> None:
        section = self._sections[-1]
        self.ops[section] += 1
        if sync:
            self.syncs.setdefault(section, Counter())[name] += 1

    def __enter__(self) -> OpCounter:
        self._stack.enter_context(_Dispatch(self))
        self._stack.enter_context(_Function(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"aten.{func._schema.name.split('::')[-1]}"
        self.counter._record(name, _is_host_sync(name, args))
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.counter.syncs.setdefault(self.counter._sections[-1], Counter())[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


class HostCopies:
    """Context manager counting the host copies of a block of data (a rollout's observations) that the
    code inside makes, for ``nbytes`` the block's size::

        with HostCopies(obs.nbytes) as copies:
            ...
        copies.torch, copies.numpy   # int each

    ``torch``: aten operations whose output is a new CPU tensor storage of at least ``nbytes`` of
    ``dtype`` (default uint8, the observations' own: the encoder's float input is its work, not a
    copy of them; a view, or a result in a storage an input already had, is no copy). ``numpy``: the largest number
    of such blocks numpy held at once beyond what it held on entry (``tracemalloc``'s peak of the
    allocations numpy reports to it, over ``nbytes``, rounded down): a chain of copies, each made
    from the one before, counts every link; copies made and freed one after the other count once.
    """

    def __init__(self, nbytes: int, dtype: torch.dtype = torch.uint8) -> None:
        self.nbytes, self.dtype = nbytes, dtype
        self.torch = 0
        self.numpy = 0
        self._stack = contextlib.ExitStack()
        self._was_tracing = False
        self._start = 0

    def __enter__(self) -> HostCopies:
        import tracemalloc

        self._was_tracing = tracemalloc.is_tracing()
        if not self._was_tracing:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self._start = tracemalloc.get_traced_memory()[0]
        self._stack.enter_context(_Allocations(self))
        return self

    def __exit__(self, *exc) -> None:
        import tracemalloc

        self._stack.close()
        peak = tracemalloc.get_traced_memory()[1]
        if not self._was_tracing:
            tracemalloc.stop()
        self.numpy = int((peak - self._start) // self.nbytes)


class _Allocations(TorchDispatchMode):
    def __init__(self, copies: HostCopies):
        super().__init__()
        self.copies = copies

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        self.copies.torch += sum(1 for t in _tensors(out) if t.device.type == "cpu" and t.dtype == self.copies.dtype
                                 and t.untyped_storage().nbytes() >= self.copies.nbytes
                                 and t.untyped_storage().data_ptr() not in inputs)
        return out


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in _tensors(item)]
    return []
