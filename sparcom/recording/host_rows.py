"""Per-instruction counts in host memory, filled batch by batch while the model keeps running.

Counts are never larger than their instruction's counted tokens, so they are stored in the
narrowest integer dtype that holds the largest of those (``count_dtype``): int16 for HexaInst.
"""

from __future__ import annotations

import torch


def count_dtype(largest: int, smallest: torch.dtype = torch.int16) -> torch.dtype:
    """The narrowest integer dtype, no narrower than ``smallest``, that holds ``largest``."""
    for dtype in (torch.int16, torch.int32, torch.int64):
        if dtype.itemsize >= smallest.itemsize and largest <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"{largest} counted tokens do not fit an int64 count")


class HostRows:
    """``rows[site]``: ``[N, *shape]`` counts in host memory, one row per instruction in recording
    order; ``push`` copies a batch's rows in, ``wait`` returns them once every copy has landed.

    On CUDA the copies overlap the next batches' forward: the host buffers are pinned, each batch's
    rows are narrowed on the device into one of two staging buffers, and a side stream copies them
    out after an event marks them written. A staging buffer is reused only once the device has seen
    the event of its previous copy (a stream-side wait), so nothing waits on the host until ``wait``.
    Elsewhere (CPU) a push is a plain copy.
    """

    def __init__(
        self, shapes: dict[str, tuple[int, ...]], num_rows: int, dtype: torch.dtype, max_rows: int, pin: bool
    ):
        """``max_rows``: the most rows one push brings (the batch size); ``pin``: page-locked host
        buffers, for asynchronous copies from CUDA."""
        self.dtype = dtype
        self.max_rows = max_rows
        self.rows = {
            site: torch.zeros((num_rows, *shape), dtype=dtype, pin_memory=pin)
            for site, shape in shapes.items()
        }
        self._lanes: dict[torch.device, _CopyLane] = {}

    def push(self, rows: dict[str, torch.Tensor], start: int, count: int) -> None:
        """Copy ``rows[site][:count]`` (on any device) into host rows ``start:start+count``."""
        if count == 0:
            return
        by_device: dict[torch.device, list[str]] = {}
        for site, values in rows.items():
            by_device.setdefault(values.device, []).append(site)
        for device, sites in by_device.items():
            if device.type != "cuda":
                for site in sites:
                    self.rows[site][start : start + count].copy_(rows[site][:count])
                continue
            lane = self._lanes.get(device)
            if lane is None:
                lane = self._lanes[device] = _CopyLane(device)
            lane.push({site: rows[site][:count] for site in sites}, self.rows, start, self.max_rows)

    def wait(self) -> dict[str, torch.Tensor]:
        for lane in self._lanes.values():
            lane.stream.synchronize()
        self._lanes.clear()  # frees the staging buffers
        return self.rows


class _CopyLane:
    """One CUDA device's side stream, two staging buffers per site, and an event per buffer."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)
        self.staging: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.copied = (torch.cuda.Event(), torch.cuda.Event())
        self.turn = 0

    def push(
        self, rows: dict[str, torch.Tensor], host: dict[str, torch.Tensor], start: int, max_rows: int
    ) -> None:
        buffer = self.turn % 2
        self.turn += 1
        compute = torch.cuda.current_stream(self.stream.device)
        compute.wait_event(self.copied[buffer])  # its previous copy is done (no-op before the first)
        staged = {}
        for site, values in rows.items():
            if site not in self.staging:
                shape, dtype = (max_rows, *values.shape[1:]), host[site].dtype
                self.staging[site] = tuple(
                    torch.empty(shape, dtype=dtype, device=values.device) for _ in "ab"
                )
            staged[site] = self.staging[site][buffer][: values.shape[0]]
            staged[site].copy_(values)
        written = torch.cuda.Event()
        written.record(compute)
        self.stream.wait_event(written)
        with torch.cuda.stream(self.stream):
            for site, values in staged.items():
                host[site][start : start + values.shape[0]].copy_(values, non_blocking=True)
            self.copied[buffer].record(self.stream)
