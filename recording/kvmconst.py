"""KVM's own constants that the recording format is built on: where the
in-progress bit of a memslot generation sits and how many bits of the
generation an MMIO SPTE keeps.  Change the generation width here.

Standard library only, so that a process that drives KVM and records
nothing (the micro-VMM in the nested L1, where importing pyarrow costs
seconds of emulated time) can read them; ``schema`` re-exports both.
"""

from __future__ import annotations

GEN_IN_PROGRESS_BIT = 63  # KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS
MMIO_GEN_BITS_DEFAULT = 19  # MMIO_SPTE_GEN_LOW_BITS + HIGH_BITS on x86 since 5.5
