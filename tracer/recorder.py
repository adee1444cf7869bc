"""Recorder: probes attached, events drained in batches, rows to sinks.

The in-process API (the lab job and tests use it)::

    with Recorder("runs/x", pids=[qemu_pid]) as rec:   # attaches, starts a thread
        ...workload...
    # detached; run directory compacted and complete

or drive it yourself: ``rec.start(); rec.run(duration=5); rec.close()``.
One session can record several runs, one directory each, compiling and
attaching the probes once (the lab's batch in one L1 boot)::

    rec = Recorder(None, pids=[os.getpid()]).start()
    for d in run_dirs:
        rec.begin_run(d, pids=[os.getpid()]); ...; rec.end_run(scenario=...)
    rec.close()
Sinks receive ``write(event, columns)`` for every decoded batch; a run
directory (recording.writer.RunWriter, written on its Flusher thread) is
flushed every ``flush_interval`` seconds with the tracer's manifest keys
(recording.manifest.TracerFields: backend, probes, filters, lost counts)
current.

One class of ~460 lines on purpose: the session (attach, drain thread,
detach on every exit path) and the run being written share their state
(pid filter, counts, lost baselines, the writer), and keeping them in one
place is what lets every exit path detach the probes and close the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from recording.errors import RecordingError
from recording.manifest import Manifest
from recording.schema import MMIO_GEN_BITS_DEFAULT, SCHEMAS, monotonic_ns
from recording.writer import RunWriter

from . import TracerError
from .decode import Decoder, exit_hist_table, hist_delta, mmio_hist_table, table

if TYPE_CHECKING:
    from .loader import Loaded

# The drain interval's bounds and start, and the ring fills that move it (run()).
POLL_MIN_MS, POLL_MS, POLL_MAX_MS = 10, 50, 250
FILL_LOW, FILL_HIGH = 0.02, 0.10
MMIO_FAULT_INTERVAL = (
    "kvm_exit to kvm_entry of the vCPU thread; where kvm_exit never fires (e.g. "
    "kvm_pvm) from the exiting kvm_mmio to the thread's next KVM_RUN, exit_reason null")


class Sink(Protocol):
    def write(self, event: str, rows: pa.Table) -> None: ...


class Recorder:
    def __init__(self, run_dir: str | os.PathLike[str] | None = None,
                 pids: Sequence[int] = (), backend: str | None = None, *,
                 emit_mmio: bool = True, flush_interval: float = 1.0,
                 sinks: Sequence[Sink] = (), caps: Any = None,
                 stop_when_pids_exit: bool = False, aggregate: bool = False) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.requested_pids = list(pids)
        self.requested_backend = backend
        # Aggregation: MMIO intervals as in-kernel histograms (mmio_hist), no
        # per-access rows either; memslot/generation/zap rows still stream.
        self.aggregate = aggregate
        self.emit_mmio = emit_mmio
        self.flush_interval = flush_interval
        self.sinks = list(sinks)
        self.caps = caps
        self.stop_when_pids_exit = stop_when_pids_exit
        self.writer: RunWriter | None = None
        self.probes: Any = None
        self.decoder = Decoder()
        self.counts: dict[str, int] = {}
        self.lost: dict[str, int] = {}
        self._hist: dict[tuple[int, ...], tuple[int, int]] = {}
        self._mmio_hist: dict[tuple[int, ...], tuple[int, int]] = {}
        self.aggregated_faults = 0  # MMIO intervals counted in mmio_hist
        self._next_flush = 0.0
        self._thread: threading.Thread | None = None
        # A plain flag, not a threading.Event: a signal handler sets it, and
        # Event.set() takes a lock the interrupted main thread may hold.
        self._stop = False
        self._error: BaseException | None = None
        self._cpu0 = 0.0
        self._lost0: dict[str, int] = {}  # lost counts when this run began
        self._runs = 0                    # runs begun in this session
        self.load_s = 0.0                 # compile + attach, seconds
        self.thread_cpu_s = 0.0  # CPU of the background drain thread, when used
        self.flush_cpu_s = 0.0   # CPU of the thread writing the run directory
        self.manifest: Manifest = {}  # the tracer's keys: TracerFields

    # -- lifecycle -------------------------------------------------------
    def start(self, loaded: Loaded | None = None) -> Recorder:
        """Attach (or take ``loaded``, from tracer.loader.preload with this
        recorder's pids, backend, emit_mmio and aggregate) and begin."""
        from .capabilities import choose_backend
        from .loader import load, mmio_rows, pick_backend
        from .procfs import resolve_pids
        _warm_up()
        if loaded is not None:
            if (loaded.aggregate, loaded.emit_mmio) != (self.aggregate, self.emit_mmio):
                loaded.probes.close()
                raise TracerError("preloaded probes do not match this recorder's mode")
            pids, caps, choice = loaded.pids, loaded.caps, loaded.choice
        else:
            pids = resolve_pids(self.requested_pids)
            if self.caps is not None:
                caps, choice = self.caps, choose_backend(self.caps, self.requested_backend)
            else:
                caps, choice = pick_backend(self.requested_backend)
        self.pids = pids
        self.manifest = {
            "backend": choice.name, "backend_reason": choice.reason,
            "missing_data": choice.missing, "filters": {"pids": pids},
            "kernel": caps.kernel, "kvm_module": caps.kvm_module,
            "kvm_params": caps.kvm_params,
            "emit_mmio_access": mmio_rows(self.emit_mmio, self.aggregate),
            "mode": "aggregate" if self.aggregate else "stream",
            "mmio_fault_interval": MMIO_FAULT_INTERVAL,
            **_generation_facts(),
        }
        if self.run_dir is not None:  # fail on bad output before attaching anything
            try:
                self.writer = RunWriter(self.run_dir, self.manifest, background=True)
            except RecordingError as e:
                if loaded is not None:
                    loaded.probes.close()
                raise TracerError(str(e)) from None
        if loaded is not None:
            self.probes, self.load_s = loaded.probes, loaded.load_s
        else:
            t_load = time.monotonic()
            try:
                self.probes = load(choice.name, caps, pids, self.emit_mmio,
                                   aggregate=self.aggregate)
            except BaseException:
                if self.writer is not None:
                    writer, self.writer = self.writer, None
                    writer.close(error="probes failed to load")
                raise
            self.load_s = round(time.monotonic() - t_load, 3)
        self._cpu0 = time.process_time()  # user + system CPU, all threads
        from .probes import seed_vcpus
        seeded = seed_vcpus(self.probes, pids, self.decoder.sole_vm)
        self.manifest.update({
            "vcpu_fds_seeded": seeded,
            "buffer": self.probes.buffer, "probes_attached": self.probes.attached,
            "probes_missing": self.probes.missing, "btf_offsets": self.probes.offsets,
            "bpf_prog_ids": self._prog_ids(), "tracer_pid": os.getpid(),
            "attach_ns": monotonic_ns(),
        })
        self.lost = {k: 0 for k in self.probes.lost_counts()}
        self._lost0 = dict(self.lost)
        self.manifest["lost"] = dict(self.lost)
        if self.writer is not None:  # on disk once start() returns
            self._write(lambda w: w.flush(self.manifest, wait=True))
        self._next_flush = time.monotonic() + self.flush_interval
        return self

    def add_pid(self, pid: int) -> None:
        """Also trace ``pid`` (e.g. a VMM started after the recorder), all threads.

        Only for a recorder started with a pid filter: with none it traces
        every process already."""
        import ctypes

        from .procfs import resolve_pids
        if not self.pids:
            raise TracerError("this recorder traces every process; no pid filter to extend")
        from .probes import seed_vcpus
        for tgid in resolve_pids([pid]):
            if tgid not in self.pids:
                seed_vcpus(self.probes, [tgid], self.decoder.sole_vm)
                self.probes.bpf[b"pids"][ctypes.c_uint(tgid)] = ctypes.c_ubyte(1)
                self.pids.append(tgid)
        self.manifest["filters"] = {"pids": list(self.pids)}

    def _prog_ids(self) -> list[int]:
        from .bpfsys import prog_info
        ids = []
        for fn in getattr(self.probes.bpf, "funcs", {}).values():
            try:
                ids.append(prog_info(fn.fd)[0])
            except OSError:
                continue
        return sorted(ids)

    def poll(self, timeout_ms: int = 50) -> int:
        """One round: wait for events, decode, hand to sinks; flush when due."""
        n = self._dispatch(self.probes.poll(timeout_ms))
        if time.monotonic() >= self._next_flush:
            self.flush()
        return n

    def _dispatch(self, raw: Any) -> int:
        if not len(raw):
            return 0
        for event, rows in self.decoder.decode(raw).items():
            self._emit(event, rows)
        return len(raw)

    def _intervals(self) -> None:
        """Per-interval lost counts and exit histogram deltas."""
        now = monotonic_ns()
        lost = self.probes.lost_counts()
        delta = {k: v - self.lost.get(k, 0) for k, v in lost.items()}
        self.lost = lost
        rows = {k: v for k, v in delta.items() if v}
        if rows:
            self._emit("lost", pa.table({"ns": [now] * len(rows), "event": list(rows),
                                         "count": list(rows.values())},
                                        schema=SCHEMAS["lost"]))
        exits, mmio = self.probes.histograms()
        for event, cur, prev, build in (
                ("exit_hist", exits, self._hist, exit_hist_table),
                ("mmio_hist", mmio, self._mmio_hist, mmio_hist_table)):
            rows = hist_delta(cur, prev)
            if rows:
                self._emit(event, build(now, rows))
                if event == "mmio_hist":
                    self.aggregated_faults += sum(n for _, n, _ in rows)
            prev.clear()
            prev.update(cur)

    def _emit(self, event: str, rows: pa.Table) -> None:
        self.counts[event] = self.counts.get(event, 0) + rows.num_rows
        if self.writer is not None:
            self.writer[event].add(rows)
        for sink in self.sinks:
            sink.write(event, rows)

    def flush(self) -> None:
        self._intervals()
        self.manifest["lost"] = {k: v - self._lost0.get(k, 0) for k, v in self.lost.items()}
        self.manifest["tracer_cpu_s"] = round(time.process_time() - self._cpu0, 4)
        self.manifest["events"] = dict(self.counts)
        if self.aggregate:
            self.manifest["mmio_faults_aggregated"] = self.aggregated_faults
        self.manifest["drain"] = self.probes.drain_stats()
        if self.writer is not None:
            self._write(lambda w: w.flush(self.manifest))
        for sink in self.sinks:
            flush = getattr(sink, "flush", None)
            if flush:
                flush()
        self._next_flush = time.monotonic() + self.flush_interval

    def _write(self, step: Callable[[RunWriter], None]) -> None:
        """A step of the run directory; a write that failed (now or on the
        Flusher thread) is the tracer's one-line error."""
        assert self.writer is not None
        try:
            step(self.writer)
        except RecordingError as e:
            raise TracerError(str(e)) from None

    def targets_alive(self) -> bool:
        from .procfs import is_alive
        return not self.pids or any(is_alive(p) for p in self.pids)

    def run(self, duration: float | None = None,
            until: Callable[[], bool] | None = None) -> None:
        """Poll until ``duration`` s pass, ``until()`` is true, stop() or targets exit.

        The drain interval follows the ring buffer's fill: halved while a
        drain finds more than FILL_HIGH of it in use, doubled (up to
        POLL_MAX_MS) while less than FILL_LOW.  Each drain has a fixed cost
        (decoding into Arrow columns: ~1 ms a column in the TCG L1, where the
        tracer's CPU is taken from the traced VMM's vCPUs): a quiet or
        aggregated run drains 5x less often, a busy one keeps the ring far
        from full (at 1M events/s, POLL_MAX_MS fills 3/4 of it)."""
        end = time.monotonic() + duration if duration else float("inf")
        interval = POLL_MS
        while not self._stop and time.monotonic() < end:
            left_ms = (end - time.monotonic()) * 1000
            self.poll(interval if left_ms > interval else max(1, int(left_ms)))
            fill = self.probes.last_fill()
            if fill is not None:
                if fill > FILL_HIGH:
                    interval = max(POLL_MIN_MS, interval // 2)
                elif fill < FILL_LOW:
                    interval = min(POLL_MAX_MS, interval * 2)
            if until is not None and until():
                break
            if self.stop_when_pids_exit and not self.targets_alive():
                break

    def close(self, **final: Any) -> None:
        """Drain what is left, detach every probe, finalize the run directory."""
        if self.probes is not None:
            try:
                self._drain_targets()
            finally:
                self.probes.close()
                self.probes = None
        self._finish_run(final)

    def _drain_targets(self) -> None:
        if self.pids:  # stop new events, then take what is buffered
            self.probes.bpf[b"pids"].clear()
            self.probes.forget_threads()
        self._dispatch(self.probes.drain())
        self.flush()

    def _finish_run(self, final: dict[str, Any]) -> None:
        if self.writer is not None:
            self.manifest["detach_ns"] = monotonic_ns()
            fields = self.manifest.copy()
            fields.update(final)  # stop_reason (tracer.cli), scenario (slotscope.labrun)
            try:
                self._write(lambda w: w.close(fields))
            finally:
                self.flush_cpu_s = self.writer.flush_cpu_s
                self.writer = None

    # -- one session, several runs (the lab's batch) --------------------------
    def begin_run(self, run_dir: str | os.PathLike[str], pids: Sequence[int]) -> None:
        """Record into a fresh ``run_dir`` from now on, tracing ``pids``
        (more with add_pid), probes still attached: no second compile.  The
        run's counts start at zero; its manifest names the session."""
        import ctypes

        from .probes import seed_vcpus
        from .procfs import resolve_pids
        if self.probes is None or not self.pids:
            raise TracerError("begin_run needs a started recorder with a pid filter")
        if self.writer is not None:
            raise TracerError(f"a run is being recorded into {self.writer.dir}: end_run first")
        self._drain_targets()  # whatever came between runs belongs to none
        tgids = resolve_pids(pids)
        self._runs += 1
        self.counts = {}
        self.aggregated_faults = 0
        self._lost0 = dict(self.lost)
        self._cpu0 = time.process_time()
        self.decoder = Decoder()  # the last run's VM and vCPUs are gone
        self.manifest["filters"] = {"pids": tgids}
        self.manifest["session"] = {"run": self._runs, "attach_ns": self.manifest["attach_ns"],
                                    "load_s": self.load_s}
        for key in ("events", "lost", "detach_ns", "mmio_faults_aggregated"):
            self.manifest.pop(key, None)
        self.manifest["lost"] = {k: 0 for k in self.lost}
        try:
            self.writer = RunWriter(run_dir, self.manifest, background=True)
        except RecordingError as e:
            raise TracerError(str(e)) from None
        seed_vcpus(self.probes, tgids, self.decoder.sole_vm)
        for tgid in tgids:
            self.probes.bpf[b"pids"][ctypes.c_uint(tgid)] = ctypes.c_ubyte(1)
        self.pids = list(tgids)
        self._write(lambda w: w.flush(self.manifest, wait=True))

    def end_run(self, **final: Any) -> None:
        """Stop tracing this run's processes, write everything buffered into
        its directory and finalize it; the probes stay attached."""
        if self.probes is not None:
            self._drain_targets()
        self._finish_run(final)

    # -- background thread (in-process use) ---------------------------------
    def start_thread(self) -> Recorder:
        if self.probes is None:
            self.start()
        self._stop = False
        self._thread = threading.Thread(target=self._thread_main, name="slotscope-recorder",
                                        daemon=True)
        self._thread.start()
        return self

    def _thread_main(self) -> None:
        t0 = time.thread_time()
        try:
            self.run()
        except BaseException as e:  # surfaced by stop()
            self._error = e
        finally:
            self.thread_cpu_s = time.thread_time() - t0

    def request_stop(self) -> None:
        """Make run() return after its current poll (safe in a signal handler)."""
        self._stop = True

    @property
    def stop_requested(self) -> bool:
        return self._stop

    @contextlib.contextmanager
    def stopped_by_signals(self) -> Iterator[None]:
        """Within this block (main thread), Ctrl-C and SIGTERM request a stop
        rather than raise KeyboardInterrupt: an exception landing between
        taking a batch off the ring buffer and writing it would lose that
        batch.  run() returns after its current poll and close() drains the
        rest; close() inside the block cannot be cut short by a second signal.
        The caller reads ``stop_requested`` to tell an interrupted run.  Enter
        it after start(), so that Ctrl-C still aborts a long compile."""
        def handler(signum: int, frame: object) -> None:
            self.request_stop()
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)

    def stop_thread(self) -> None:
        """Stop the background thread (if any); probes stay attached.  An
        error the thread met is raised."""
        requested = self._stop  # by a signal (stopped_by_signals): keep it
        self.request_stop()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stop = requested
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def stop(self) -> None:
        """Stop the background thread (if any) and close."""
        try:
            self.stop_thread()
        finally:
            self.close()

    def __enter__(self) -> Recorder:
        return self.start_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _generation_facts() -> dict[str, Any]:
    """How far one memslot swap moves the generation, and the masked width
    the MMIO SPTEs keep (for the analysis' wrap forecast)."""
    from .btf import address_spaces
    n = address_spaces()
    return {
        "address_spaces": n,
        "address_spaces_source": "BTF: length of struct kvm.memslots[]" if n else "unknown",
        # MMIO_SPTE_GEN_MASK is a macro, invisible to BTF: x86 keeps 19 bits
        # since 5.5 (spte.h).  Recorded so a reader need not assume.
        "mmio_gen_bits": MMIO_GEN_BITS_DEFAULT,
        "mmio_gen_bits_source": "x86 MMIO_SPTE_GEN_MASK (19 bits since 5.5; not in BTF)",
    }


def _warm_up() -> None:
    """pyarrow imports pandas on its first numpy conversion (~1.5 s here): pay
    that before attaching, not while the ring buffer fills."""
    import numpy as np
    z = np.zeros(1, np.uint64)
    table("zap_all", {"ns": z.astype(np.int64), "pid": z, "tid": z, "vm": z, "gen": (z, z > 0)})
