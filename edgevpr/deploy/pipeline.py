"""A streaming localization loop: decoding, the model and the decision overlap, in bounded memory (numpy only).

Three stages, each a thread, joined by bounded queues (``depth`` items each: 2 for files, so the model never
waits for the reader; 1 for live sources, so no frame waits behind another and the answer is as fresh as it can
be):

1. **read**: pulls frames from the source (decoding happens there: PIL, PyAV) and, for a file, prepares the model
   input (resize, normalise: ``Localizer.prepare``). A live source on **one core** has its frames prepared in stage
   2 instead, when the model takes them: nothing overlaps there, and a frame dropped in the queue then costs its
   decoding only (preparing costs as much as decoding a 640x480 MPEG-4 frame here, about 4 ms, and a loop behind a
   30 fps camera drops a third of them). With two cores or more, preparing ahead overlaps the model: measured
   better for the composed edge student (fewer drops at 30 fps) than preparing when taken;
2. **embed**: the model (onnxruntime and torch release the GIL while they compute, so this overlaps stage 1);
3. **decide** (the caller's thread, as the iterator is consumed): search, verification, sequence and decision.

While the loop runs, the interpreter's thread switch interval is 0.5 ms instead of 5 ms (restored after): with
the default, a stage that finished its C work (a forward, a decode) waits up to 5 ms for the GIL held by another
stage's Python code, which on this CPU cost the composed edge student 15% of its throughput with two cores free
(28.1 vs 32.6 frames/s against 33-34 isolated, `benchmarks/stream.py`).

A file, folder or list is read as fast as the model takes it (the reader blocks on a full queue: nothing is
dropped and the answers equal ``Localizer.stream``'s, tested). A **live** source (a camera or a network stream,
``Stream.live``, or ``live=True``) does not wait for us: when the reader finds the queue full it drops the *oldest*
waiting frame (the freshest is the one worth answering), and ``max_fps`` keeps at most that many frames per second
of the source's own clock (frame timestamps where the source has them, else arrival time). Every dropped frame is
counted and named in ``stats`` (the first ``NAMES_KEPT``), so a robot knows what it did not see. Latency is
measured per frame from the moment the reader had it to the moment its answer is ready.

A **replay** (``realtime=True``: a video or a recording played at its own clock) reads each frame no earlier than
its timestamp says, counted from the first frame's, and then behaves as a live source: the frames the loop cannot
keep up with are dropped as a camera's would be, so a replay shows what a live run on this machine would miss.
Frames without a timestamp (photos) are not paced.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

#: dropped frames named in the stats (their count is always exact)
NAMES_KEPT = 100
_END = object()
_SWITCH = {"loops": 0, "saved": 0.005}  # loops running (the service runs several) and the interval to restore
_SWITCH_LOCK = threading.Lock()


@dataclass
class PipelineStats:
    """What the loop did: frames read from the source, answered, dropped (full queue on a live source) and skipped
    (over ``max_fps``), the first dropped names, and the deepest each queue got."""

    read: int = 0
    answered: int = 0
    dropped: int = 0
    skipped_fps: int = 0
    dropped_names: list[str] = field(default_factory=list)
    max_queue: list[int] = field(default_factory=lambda: [0, 0])

    def to_dict(self) -> dict:
        return {"read": self.read, "answered": self.answered, "dropped": self.dropped,
                "skipped_over_max_fps": self.skipped_fps, "dropped_names": self.dropped_names,
                "max_queue_depth": self.max_queue}


class _Queue(queue.Queue):
    """A bounded queue that can drop its oldest item instead of blocking (live sources)."""

    def put_dropping(self, item) -> object | None:
        """Put ``item``; when full, first remove and return the oldest item (else None)."""
        with self.mutex:
            old = None
            if 0 < self.maxsize <= self._qsize():
                old = self._get()
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()
            return old


class Pipeline:
    """``Pipeline(localizer, frames, ...)``; iterate it for one ``Answer`` per answered frame, in order (its
    ``name``, source ``time`` and latency ``ms`` set); ``stats`` says what was read, answered and dropped. Arguments
    as ``Localizer.stream``, plus ``live``, ``max_fps``, ``realtime`` and ``depth`` (queue size)."""

    def __init__(self, localizer, frames: Iterable, k: int = 5, knobs: dict | None = None, prior=None,
                 sequence: int = 0, method: str = "seqslam", live: bool | None = None, max_fps: float | None = None,
                 depth: int | None = None, hood=None, realtime: bool = False) -> None:
        if max_fps is not None and not max_fps > 0:
            raise ValueError(f"--max-fps {max_fps}: must be > 0")
        self.loc, self.frames, self.k, self.knobs, self.prior = localizer, frames, k, knobs, prior
        self.sequence, self.method, self.max_fps, self.hood = sequence, method, max_fps, hood
        self.realtime = realtime
        self.live = realtime or (bool(getattr(frames, "live", False)) if live is None else live)
        depth = depth if depth is not None else 1 if self.live else 2
        if depth < 1:
            raise ValueError(f"queue depth {depth}: must be >= 1")
        #: prepare in the reader (overlapping the model) unless a live source runs on one core, where nothing overlaps
        #: and a frame prepared and then dropped is work lost
        self._prepare_early = not self.live or len(os.sched_getaffinity(0)) > 1
        self.stats = PipelineStats()
        self._q = [_Queue(depth), _Queue(depth)]
        self._stop = threading.Event()
        self._error: BaseException | None = None

    def _put(self, stage: int, item) -> None:
        q = self._q[stage]
        if self.live and stage == 0 and item is not _END:
            old = q.put_dropping(item)
            if old is not None and old is not _END:
                self.stats.dropped += 1
                if len(self.stats.dropped_names) < NAMES_KEPT:
                    self.stats.dropped_names.append(old[0].name)
        else:
            while not self._stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
        self.stats.max_queue[stage] = max(self.stats.max_queue[stage], q.qsize())

    def _read(self) -> None:
        last = clock = None
        try:
            for f in self.frames:
                if self._stop.is_set():
                    return
                if self.realtime and getattr(f, "time", None) is not None:  # no earlier than the source's clock
                    clock = time.perf_counter() - f.time if clock is None else clock
                    if self._stop.wait(max(0.0, clock + f.time - time.perf_counter())):  # closed while waiting
                        return
                t_in = time.perf_counter()
                self.stats.read += 1
                stamp = f.time if getattr(f, "time", None) is not None else t_in
                if self.max_fps is not None and last is not None and stamp - last < 1.0 / self.max_fps - 1e-9:
                    self.stats.skipped_fps += 1
                    continue
                last = stamp
                self._put(0, (f, self.loc.prepare(f.image) if self._prepare_early else None, t_in))
        except BaseException as e:  # handed to the consumer, which raises it in its own thread
            self._error = e
        finally:
            self._put(0, _END)

    def _embed(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    item = self._q[0].get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _END:
                    break
                f, x, t_in = item
                x = self.loc.prepare(f.image) if x is None else x
                self._put(1, (f, *self.loc.embed_local(x[None], self.knobs, [f.name]), t_in))
        except BaseException as e:
            self._error = e
        finally:
            self._put(1, _END)

    def close(self) -> None:
        """Stop reading (an endless source is left alone from here on); the threads end within 0.1 s."""
        self._stop.set()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    #: the interpreter's thread switch interval while a loop runs (seconds; see the module notes)
    SWITCH_INTERVAL = 0.0005

    def __iter__(self) -> Iterator:
        with _SWITCH_LOCK:  # the first loop to start sets it, the last to end restores it
            if _SWITCH["loops"] == 0:
                _SWITCH["saved"] = sys.getswitchinterval()
                sys.setswitchinterval(min(_SWITCH["saved"], self.SWITCH_INTERVAL))
            _SWITCH["loops"] += 1
        self._workers = workers = [threading.Thread(target=self._read, name="edgevpr-read", daemon=True),
                                   threading.Thread(target=self._embed, name="edgevpr-embed", daemon=True)]
        for w in workers:
            w.start()
        from .localize import Sequences

        tracks = Sequences(self.loc, self.sequence, self.method, self.hood)
        try:
            while True:
                item = self._q[1].get()
                if item is _END:
                    break
                f, d, feats, t_in = item
                a = tracks.push(f, d[0], self.loc.answer(d, self.k, self.prior, [f.image], self.hood, feats)[0])
                a.name, a.time, a.ms = f.name, getattr(f, "time", None), (time.perf_counter() - t_in) * 1000
                self.stats.answered += 1
                yield a
            if self._error is not None:
                raise self._error
        finally:
            self._stop.set()
            for q in self._q:  # unblock the workers, then wait for them
                while not q.empty():
                    q.get_nowait()
            for w in workers:
                w.join(timeout=5)
            with _SWITCH_LOCK:
                _SWITCH["loops"] -= 1
                if _SWITCH["loops"] == 0:
                    sys.setswitchinterval(_SWITCH["saved"])


def latency_percentiles(ms: list[float]) -> dict:
    """Per-frame latencies -> count, p50/p95/p99 and mean (ms)."""
    a = np.asarray(ms, np.float64)
    if not len(a):
        return {"frames": 0}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"frames": int(len(a)), "p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99),
            "mean_ms": float(a.mean())}
