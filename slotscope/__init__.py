"""slotscope: what KVM memslot updates cost guest MMIO.

This package holds only the command line and the composition of the three
layers (tracer, vmrig, analysis); it is the one place that imports them all.
"""

__version__ = "0.1.0"
