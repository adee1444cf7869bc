"""eBPF (bcc) probes on KVM's memslot and MMIO fault paths."""


class TracerError(Exception):
    """A tracing request that cannot be met; the message is one line for the user."""
