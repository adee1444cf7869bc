"""QEMU/KVM test rig: guests, QMP workloads and a micro-VMM."""


class RigError(Exception):
    """A rig request that cannot be met; the message is one line for the user."""
