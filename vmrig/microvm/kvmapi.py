"""The part of KVM's user-space API (<linux/kvm.h>, x86-64) the micro-VMM speaks.

ioctl numbers, capability and flag bits, exit reasons, and the byte layout
of every struct it reads or writes, as ``struct`` formats and offsets.
Nothing here does I/O.
"""

from __future__ import annotations

import struct

API_VERSION = 12  # what KVM_GET_API_VERSION has returned since Linux 2.6.22

# ioctls on /dev/kvm, the VM fd and the vCPU fds.
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_SET_TSS_ADDR = 0xAE47
KVM_REGISTER_COALESCED_MMIO = 0x4010AE67
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
# KVM_CHECK_EXTENSION answers with the ring's page offset in the vCPU mmap.
KVM_CAP_COALESCED_MMIO = 15
# On a VM fd: its memslot address spaces (0 where there is only one).
KVM_CAP_MULTI_ADDRESS_SPACE = 118
# VMX needs a TSS for real mode; below 2 GiB because the ioctl takes a C int.
TSS_ADDR = 0x7FFFD000

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTERNAL_ERROR = 17
# Names of the exits a guest loop should never take (others by number).
EXIT_NAMES = {KVM_EXIT_HLT: "hlt", KVM_EXIT_SHUTDOWN: "shutdown",
              KVM_EXIT_FAIL_ENTRY: "fail_entry", KVM_EXIT_INTERNAL_ERROR: "internal_error"}
KVM_EXIT_IO_IN = 0

# struct kvm_run: exit_reason, then the exit's union at 32.
RUN_EXIT_REASON = struct.Struct("<I")
RUN_EXIT_REASON_OFF = 8
RUN_UNION_OFF = 32
# union member mmio: phys_addr u64, data[8], len u32, is_write u8
RUN_MMIO = struct.Struct("<Q8xIB")
# union member io: direction u8, size u8, port u16, count u32, data_offset u64
RUN_IO = struct.Struct("<BBHIQ")
# the data an "in" gets, at data_offset in the vCPU mmap: the guest's
# coalesced batch request (rounds, entry IP)
IN_BATCH = struct.Struct("<HH")

# struct kvm_userspace_memory_region: slot, flags, guest_phys_addr,
# memory_size, userspace_addr.
MEMORY_REGION = struct.Struct("<IIQQQ")
# struct kvm_coalesced_mmio_zone: addr, size, pad (0: MMIO, not PIO).
COALESCED_ZONE = struct.Struct("<QII")

# struct kvm_coalesced_mmio_ring: first (user space owns it), last (KVM's),
# then entries of {phys_addr u64, len u32, pad u32, data[8]} filling the
# rest of the page.  The micro-VMM reads data[0] only: the byte written.
RING_HEADER = struct.Struct("<II")
RING_ENTRY = struct.Struct("<QI4xB7x")
RING_MAX = (0x1000 - RING_HEADER.size) // RING_ENTRY.size  # KVM_COALESCED_MMIO_MAX: 170

# struct kvm_sregs starts with cs, ds, es: struct kvm_segment, 24 bytes
# each (base u64, limit u32, selector u16, then attributes left as KVM has them).
SREGS_SIZE = 312
SEGMENT = struct.Struct("<QIH")
SREGS_CS, SREGS_DS, SREGS_ES = 0, 24, 48
# struct kvm_regs: rax, rbx, ... (u64 each), rip at 128 then rflags.
REGS_SIZE = 144
REG = struct.Struct("<Q")
REGS_RBX = 8
REGS_RIP_RFLAGS = struct.Struct("<QQ")
REGS_RIP = 128
RFLAGS_FIXED = 2  # bit 1 always reads as one
