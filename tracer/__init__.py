"""eBPF (bcc) probes on KVM's memslot and MMIO fault paths.

Modules: ``capabilities`` (what this host allows, backend choice), ``btf``
(struct offsets from /sys/kernel/btf), ``probes`` (build/load/attach the
tracer/bpf/*.bpf.c programs, drain the ring buffer), ``decode`` (records to
schema tables), ``recorder`` (Recorder: the in-process API), ``sinks``
(JSON lines, live view), ``cli`` (record / stream / live), ``bpfsys``
(loaded-program ids, to check nothing stays attached).

In-process use::

    from tracer.recorder import Recorder
    with Recorder("runs/x", pids=[vmm_pid], backend=None) as rec:
        ...  # workload; rec.add_pid(pid) for VMMs started later
    rec.counts, rec.lost      # rows per event type, lost records per kind
"""


class TracerError(Exception):
    """A tracing request that cannot be met; the message is one line for the user."""
