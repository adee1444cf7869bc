"""Struct member offsets from the running kernel's BTF (/sys/kernel/btf/*).

The kprobe/kfunc backends read kernel structs with offsets found here at
load time, never from the (possibly mismatched) header tree bcc compiles
against.  A small reader of the BTF format: enough to find a named struct's
members, including members of anonymous nested structs/unions, in vmlinux
and in split module BTF (/sys/kernel/btf/kvm), a function's BTF id (what
an fentry/fexit program is loaded against), and a tracepoint's prototype
(what a raw tracepoint program gets as its arguments).
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path

from . import TracerError

BTF_DIR = Path("/sys/kernel/btf")
MAGIC = 0xEB9F
KIND_ARRAY, KIND_STRUCT, KIND_UNION = 3, 4, 5
KIND_INT, KIND_PTR, KIND_TYPEDEF, KIND_FUNC, KIND_FUNC_PROTO = 1, 2, 8, 12, 13
# Bytes after the 12-byte btf_type header: fixed, and per vlen entry.
_EXTRA = {1: (4, 0), 3: (12, 0), 4: (0, 12), 5: (0, 12), 6: (0, 8), 13: (0, 8),
          14: (4, 0), 15: (0, 12), 17: (4, 0), 19: (0, 12)}


@dataclass
class _Type:
    kind: int
    name_off: int
    size: int
    members: list[tuple[int, int, int]]  # (name_off, type id, bit offset); a
                                         # FUNC_PROTO's parameters: (name_off, type id, 0)
    nelems: int = 0                      # arrays: element count
    vlen: int = 0                        # e.g. a FUNC_PROTO's parameter count


_HEADER = struct.Struct("<III")  # btf_type: name_off, info, size/type


class BTF:
    """One BTF blob; ``base`` is vmlinux for split (module) BTF.

    Types are decoded when asked for.  At load only each type's position is
    found (a walk over the 12-byte headers): a module's ids start after the
    last vmlinux id, and a full decode of vmlinux's ~126k types took 14 s in
    a TCG-nested L1, on the probe thread before the compile (0.45 s against
    0.05 s for the walk on this host).  Names are found by their string
    offsets, so a search compares integers, not decoded strings."""

    def __init__(self, data: bytes, base: BTF | None = None) -> None:
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("<HBBIIIII", data)
        if magic != MAGIC:
            raise TracerError("not a BTF blob (bad magic)")
        self.base = base
        self.module: str | None = None  # set by load() for module BTF
        self.data = data
        self.first_id = (base.first_id + base.count) if base else 1
        self.str_base = (base.str_base + len(base.strings)) if base else 0
        self.strings = data[hdr_len + str_off:hdr_len + str_off + str_len]
        self._pos: list[int] = []   # type id - first_id -> offset of its header
        self._kinds = bytearray()   # and its kind
        self._decoded: dict[int, _Type] = {}
        self._by_name: dict[int, dict[int, list[int]]] = {}  # kind -> name_off -> ids
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        unpack, extra, add_pos, add_kind = _HEADER.unpack_from, _EXTRA, self._pos.append, \
            self._kinds.append
        while pos < end:
            _, info, _ = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            add_pos(pos)
            add_kind(kind)
            fixed, per = extra.get(kind, (0, 0))
            pos += 12 + fixed + per * (info & 0xFFFF)

    @property
    def count(self) -> int:
        """How many types this blob holds (not its base's)."""
        return len(self._pos)

    def _decode(self, index: int) -> _Type:
        data, pos = self.data, self._pos[index]
        name_off, info, size = _HEADER.unpack_from(data, pos)
        pos += 12
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        members = []
        if kind in (KIND_STRUCT, KIND_UNION):
            for i in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", data, pos + 12 * i)
                members.append((m_name, m_type, m_off & 0xFFFFFF if kflag else m_off))
        elif kind == KIND_FUNC_PROTO:
            for i in range(vlen):
                p_name, p_type = struct.unpack_from("<II", data, pos + 8 * i)
                members.append((p_name, p_type, 0))
        nelems = struct.unpack_from("<I", data, pos + 8)[0] if kind == KIND_ARRAY else 0
        return _Type(kind, name_off, size, members, nelems, vlen)

    def _name_offsets(self, name: str) -> set[int]:
        """The string offsets (base's included) that hold ``name``."""
        needle, out = b"\0" + name.encode() + b"\0", set()
        blob: BTF | None = self
        while blob is not None:
            at = blob.strings.find(needle)
            while at >= 0:
                out.add(blob.str_base + at + 1)
                at = blob.strings.find(needle, at + 1)
            blob = blob.base
        return out

    def _find(self, kind: int, name: str) -> list[int]:
        """Ids of this blob's own types of ``kind`` named ``name``."""
        index = self._by_name.get(kind)
        if index is None:  # one pass per kind asked for, then lookups
            index = self._by_name[kind] = {}
            data, kinds, mark, at = self.data, self._kinds, bytes([kind]), 0
            while (at := kinds.find(mark, at)) >= 0:
                index.setdefault(_HEADER.unpack_from(data, self._pos[at])[0], []).append(
                    self.first_id + at)
                at += 1
        return [tid for off in self._name_offsets(name) for tid in index.get(off, ())]

    def name(self, off: int) -> str:
        if off < self.str_base:
            assert self.base is not None
            return self.base.name(off)
        s = self.strings
        start = off - self.str_base
        return s[start:s.index(b"\0", start)].decode()

    def type(self, tid: int) -> _Type:
        if tid < self.first_id:
            assert self.base is not None
            return self.base.type(tid)
        t = self._decoded.get(tid)
        if t is None:
            t = self._decoded[tid] = self._decode(tid - self.first_id)
        return t

    def find_struct(self, name: str) -> _Type | None:
        for tid in self._find(KIND_STRUCT, name):
            t = self.type(tid)
            if t.size:  # not a forward declaration
                return t
        return self.base.find_struct(name) if self.base else None

    def member_offset(self, t: _Type, member: str) -> int | None:
        """Byte offset of ``member``, looking into anonymous structs/unions."""
        for m_name, m_type, bit_off in t.members:
            n = self.name(m_name)
            if n == member:
                return bit_off // 8
            if not n:
                inner = self._resolve(m_type)
                if inner and inner.kind in (KIND_STRUCT, KIND_UNION):
                    off = self.member_offset(inner, member)
                    if off is not None:
                        return bit_off // 8 + off
        return None

    def member_array_len(self, t: _Type, member: str) -> int | None:
        """Element count of array member ``member`` (top level), else None."""
        for m_name, m_type, _ in t.members:
            if self.name(m_name) == member:
                inner = self._resolve(m_type)
                return inner.nelems if inner and inner.kind == KIND_ARRAY else None
        return None

    def func(self, name: str) -> tuple[int, int] | None:
        """(BTF id, parameter count) of function ``name`` among this blob's own
        types: a module's function is attached through the module's BTF
        object, so the base is not searched."""
        for tid in self._find(KIND_FUNC, name):
            return tid, self.type(self.type(tid).size).vlen  # size slot: proto id
        return None

    def find_typedef(self, name: str) -> _Type | None:
        for tid in self._find(KIND_TYPEDEF, name):
            return self.type(tid)
        return self.base.find_typedef(name) if self.base else None

    def param_kinds(self, proto: _Type) -> list[str]:
        """A FUNC_PROTO's parameters as "ptr" or "int<bytes>" (typedefs
        resolved), else the BTF kind number: what a raw tracepoint program
        reads from its u64 arguments."""
        out = []
        for _, tid, _ in proto.members:
            t = self._resolve(tid)
            if t is None:
                out.append("void")
            elif t.kind == KIND_PTR:
                out.append("ptr")
            elif t.kind == KIND_INT:
                out.append(f"int{t.size}")
            else:
                out.append(f"kind{t.kind}")
        return out

    def _resolve(self, tid: int) -> _Type | None:
        for _ in range(16):  # skip typedef/const/volatile chains
            if tid == 0:
                return None
            t = self.type(tid)
            if t.kind in (8, 9, 10, 11, 18):
                tid = t.size  # 'type' shares the size slot
                continue
            return t
        return None


@functools.cache
def load(module: str | None = None) -> BTF:
    """vmlinux BTF, or ``module``'s split BTF on top of it when it has one.

    Read once per process: the tracer asks three times (the raw tracepoint's
    prototype, struct offsets, the address-space count)."""
    try:
        base = BTF((BTF_DIR / "vmlinux").read_bytes())
    except FileNotFoundError:
        raise TracerError("no /sys/kernel/btf/vmlinux (kernel built without "
                          "CONFIG_DEBUG_INFO_BTF): cannot resolve struct offsets") from None
    if module and (BTF_DIR / module).exists():
        btf = BTF((BTF_DIR / module).read_bytes(), base)
        btf.module = module
        return btf
    return base


def find_func(name: str, btf: BTF | None = None, module: str = "kvm"
              ) -> tuple[int, int, str | None]:
    """(BTF id, parameter count, module or None for vmlinux) of kernel function
    ``name``, looked up in ``module``'s BTF, then in vmlinux (a built-in kvm);
    TracerError saying why it is in neither."""
    btf = btf or load(module)
    hit = btf.func(name)
    if hit:
        return hit[0], hit[1], btf.module
    if btf.base is not None:
        hit = btf.base.func(name)
        if hit:
            return hit[0], hit[1], None
        why = f"neither in the {btf.module} module's BTF nor in vmlinux"
    elif Path("/sys/module", module, "initstate").exists():  # loadable, but no BTF
        why = f"the {module} module has no BTF (no {BTF_DIR / module})"
    else:
        why = f"not in vmlinux BTF ({module} not loaded?)"
    raise TracerError(f"{name} not in BTF: {why}")


def tracepoint_params(name: str, btf: BTF | None = None) -> list[str] | None:
    """Tracepoint ``name``'s TP_PROTO as a raw tracepoint program sees it
    (``BTF.param_kinds``, without the leading ``void *__data``), from the
    kernel's ``btf_trace_<name>`` typedef; None when BTF has no such typedef
    (kernels before 5.5 or without BTF, or the tracepoint's module unloaded)."""
    try:
        btf = btf or load("kvm")
    except TracerError:
        return None
    t = btf.find_typedef(f"btf_trace_{name}")
    ptr = btf._resolve(t.size) if t else None  # typedef -> pointer -> FUNC_PROTO
    proto = btf.type(ptr.size) if ptr and ptr.kind == KIND_PTR else None
    if proto is None or proto.kind != KIND_FUNC_PROTO:
        return None
    return btf.param_kinds(proto)[1:]


# What the kprobe/kfunc backends read: define name -> (struct, member).
NEEDED = {
    "OFF_SLOT_BASE_GFN": ("kvm_memory_slot", "base_gfn"),
    "OFF_SLOT_NPAGES": ("kvm_memory_slot", "npages"),
    "OFF_SLOT_FLAGS": ("kvm_memory_slot", "flags"),
    "OFF_SLOT_ID": ("kvm_memory_slot", "id"),
    "OFF_SLOT_AS_ID": ("kvm_memory_slot", "as_id"),
    "OFF_SLOT_UADDR": ("kvm_memory_slot", "userspace_addr"),
    "OFF_KVM_MEMSLOTS": ("kvm", "memslots"),
    "OFF_MEMSLOTS_GEN": ("kvm_memslots", "generation"),
}
OPTIONAL = {"OFF_SLOT_AS_ID"}  # older kernels: as_id absent -> address space 0


def kvm_offsets(btf: BTF | None = None) -> dict[str, int]:
    """The OFF_* defines for memslot_fn.bpf.c; TracerError naming what is missing."""
    btf = btf or load("kvm")
    out: dict[str, int] = {}
    for define, (sname, member) in NEEDED.items():
        t = btf.find_struct(sname)
        if t is None:
            raise TracerError(f"BTF has no struct {sname} (kvm module BTF missing?)")
        off = btf.member_offset(t, member)
        if off is None:
            if define in OPTIONAL:
                off = -1
            else:
                raise TracerError(f"BTF struct {sname} has no member {member}")
        out[define] = off
    return out


def _struct(btf: BTF, name: str) -> _Type:
    t = btf.find_struct(name)
    if t is None:
        raise TracerError(f"BTF has no struct {name}")
    return t


def _member(btf: BTF, t: _Type, sname: str, member: str) -> int:
    off = btf.member_offset(t, member)
    if off is None:
        raise TracerError(f"BTF struct {sname} has no member {member}")
    return off


def exit_offsets(vendor: str, btf: BTF | None = None) -> dict[str, int]:
    """The OFF_* defines a raw kvm_exit program reads to rebuild the classic
    record's fields from its ``struct kvm_vcpu *``: the vCPU id, and the exit
    reason where the vendor's get_exit_info reads it (SVM: the current VMCB's
    exit_code, and exit_info_2, the nested page fault's address; VMX:
    vcpu_vmx.exit_reason).  ``vendor``: kvm_amd or kvm_intel, whose BTF has
    its vCPU struct; TracerError naming what is missing."""
    btf = btf or load(vendor)
    vcpu = _struct(btf, "kvm_vcpu")
    # and the vCPU's struct kvm, which a thread's VM is found by (IOCTL_FREE)
    out = {"OFF_VCPU_ID": _member(btf, vcpu, "kvm_vcpu", "vcpu_id"),
           "OFF_VCPU_KVM": _member(btf, vcpu, "kvm_vcpu", "kvm")}
    if vendor == "kvm_amd":
        svm = _struct(btf, "vcpu_svm")
        out["OFF_VENDOR_VCPU"] = _member(btf, svm, "vcpu_svm", "vcpu")
        out["OFF_SVM_VMCB"] = _member(btf, svm, "vcpu_svm", "vmcb")
        control = _member(btf, _struct(btf, "vmcb"), "vmcb", "control")
        area = _struct(btf, "vmcb_control_area")
        out["OFF_VMCB_EXIT_CODE"] = control + _member(btf, area, "vmcb_control_area",
                                                      "exit_code")
        out["OFF_VMCB_EXIT_INFO2"] = control + _member(btf, area, "vmcb_control_area",
                                                       "exit_info_2")
    elif vendor == "kvm_intel":
        vmx = _struct(btf, "vcpu_vmx")
        out["OFF_VENDOR_VCPU"] = _member(btf, vmx, "vcpu_vmx", "vcpu")
        out["OFF_VMX_EXIT_REASON"] = _member(btf, vmx, "vcpu_vmx", "exit_reason")
    else:
        raise TracerError(f"where {vendor} keeps a vCPU's exit reason is not known")
    return out


def address_spaces(btf: BTF | None = None) -> int | None:
    """KVM_ADDRESS_SPACE_NUM: the length of ``struct kvm.memslots[]`` (one
    generation step per memslot swap), or None when BTF has no struct kvm."""
    try:
        btf = btf or load("kvm")
    except TracerError:
        return None
    t = btf.find_struct("kvm")
    return btf.member_array_len(t, "memslots") if t else None
