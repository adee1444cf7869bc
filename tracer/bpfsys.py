"""The few bpf(2) commands slotscope issues itself, without bpftool or libbpf.

- which BPF programs are loaded: the ids of the tracer's programs go to the
  manifest, and tests check that none stays loaded after the tracer exits
  (even by SIGKILL);
- fentry/fexit: load a BPF_PROG_TYPE_TRACING program against a kernel
  function's BTF id and attach it.  bcc 0.26 (Debian 12) attaches kfuncs
  to vmlinux functions only; kvm_set_memslot lives in kvm.ko, whose BTF is
  a separate kernel object (attach_btf_obj_fd);
- a trial raw tracepoint (capabilities: whether kvm_mmio can be attached
  raw here) without a bcc compile;
- the first values of an array map in one call (aggregate mode's counters).

Struct layouts are union bpf_attr / struct bpf_btf_info of
include/uapi/linux/bpf.h; offsets checked with offsetof() on 6.1's header.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_BPF = 321  # x86-64
BPF_PROG_LOAD, BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID = 5, 11, 13
BPF_OBJ_GET_INFO_BY_FD, BPF_RAW_TRACEPOINT_OPEN = 15, 17
BPF_BTF_GET_FD_BY_ID, BPF_BTF_GET_NEXT_ID, BPF_MAP_LOOKUP_BATCH = 19, 23, 24
BPF_PROG_TYPE_RAW_TRACEPOINT, BPF_PROG_TYPE_TRACING = 17, 26
ATTACH_TYPES = {"fentry": 24, "fexit": 25}  # BPF_TRACE_FENTRY, BPF_TRACE_FEXIT
INFO_SIZE = 80  # struct bpf_prog_info through name[16]
BTF_INFO_SIZE = 32  # struct bpf_btf_info (btf, btf_size, id, name, name_len, kernel_btf)
# union bpf_attr for BPF_PROG_LOAD through attach_btf_obj_fd (offset 112) and
# core_relo_cnt; the kernel takes a shorter attr and zero-fills the rest.
PROG_LOAD_SIZE = 120
LOG_SIZE = 1 << 22  # verifier log on a failed load (6.1 fails with ENOSPC when it fills)
# Lines the verifier appends after the error (print_verification_stats)
VERIFIER_STATS = ("processed ", "verification time", "stack depth")
# r0 = 0; exit: a program that only proves load + attach work.
RETURN_ZERO = struct.pack("<BBhiBBhi", 0xB7, 0, 0, 0, 0x95, 0, 0, 0)


def _bpf(cmd: int, attr: bytearray) -> int:
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    ret = _libc.syscall(SYS_BPF, cmd, buf, len(attr))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def prog_info(fd: int) -> tuple[int, int, str]:
    """(id, type, name) of the program behind ``fd``."""
    info = bytearray(INFO_SIZE)
    info_buf = (ctypes.c_char * INFO_SIZE).from_buffer(info)
    attr = bytearray(struct.pack("<IIQ", fd, INFO_SIZE, ctypes.addressof(info_buf)))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    ptype, pid = struct.unpack_from("<II", info)
    name = bytes(info[64:80]).split(b"\0")[0].decode(errors="replace")
    return pid, ptype, name


# struct bpf_prog_info through run_cnt: run_time_ns at 192, run_cnt at 200
# (counted only while kernel.bpf_stats_enabled is 1)
STATS_INFO_SIZE = 208


def prog_stats(prog_id: int) -> tuple[str, int, int] | None:
    """(name, run count, total run time in ns) of a loaded program; None
    once it is gone.  The counts grow only while kernel.bpf_stats_enabled=1."""
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, bytearray(struct.pack("<III", prog_id, 0, 0)))
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    try:
        info = bytearray(STATS_INFO_SIZE)
        buf = (ctypes.c_char * STATS_INFO_SIZE).from_buffer(info)
        _bpf(BPF_OBJ_GET_INFO_BY_FD,
             bytearray(struct.pack("<IIQ", fd, STATS_INFO_SIZE, ctypes.addressof(buf))))
    finally:
        os.close(fd)
    name = bytes(info[64:80]).split(b"\0")[0].decode(errors="replace")
    run_ns, runs = struct.unpack_from("<QQ", info, 192)
    return name, runs, run_ns


def array_values(map_fd: int, count: int, value_size: int) -> bytes:
    """The first ``count`` values of an array map, packed, in one
    BPF_MAP_LOOKUP_BATCH (5.6)."""
    keys = ctypes.create_string_buffer(4 * count)
    values = ctypes.create_string_buffer(value_size * count)
    out_batch = ctypes.c_uint32()
    # union bpf_attr.batch: in_batch (none: from key 0), out_batch, keys,
    # values, count, map_fd, elem_flags, flags
    attr = bytearray(struct.pack(
        "<QQQQIIQQ", 0, ctypes.addressof(out_batch), ctypes.addressof(keys),
        ctypes.addressof(values), count, map_fd, 0, 0))
    try:
        _bpf(BPF_MAP_LOOKUP_BATCH, attr)
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: the map's end reached
            raise
    got = struct.unpack_from("<I", attr, 32)[0]
    if got != count:
        raise OSError(errno.ERANGE, f"array batch: {got} of {count} values")
    return values.raw


def prog_ids() -> list[int]:
    """Ids of all loaded BPF programs."""
    return _ids(BPF_PROG_GET_NEXT_ID)


def prog_loaded(prog_id: int) -> bool:
    attr = bytearray(struct.pack("<III", prog_id, 0, 0))
    try:
        fd = _bpf(BPF_PROG_GET_FD_BY_ID, attr)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    os.close(fd)
    return True


def _ids(cmd: int) -> list[int]:
    """All ids a *_GET_NEXT_ID command walks (programs, BTF objects)."""
    ids, start = [], 0
    while True:
        attr = bytearray(struct.pack("<III", start, 0, 0))
        try:
            _bpf(cmd, attr)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return ids
            raise
        start = struct.unpack_from("<I", attr, 4)[0]
        ids.append(start)


def btf_obj_fd(name: str) -> int | None:
    """An fd of the kernel BTF object called ``name`` (a module's: "kvm"), or
    None when no such object is loaded.  The caller closes it."""
    for btf_id in _ids(BPF_BTF_GET_NEXT_ID):
        try:
            fd = _bpf(BPF_BTF_GET_FD_BY_ID, bytearray(struct.pack("<III", btf_id, 0, 0)))
        except OSError as e:
            if e.errno == errno.ENOENT:  # unloaded since the walk saw it
                continue
            raise
        try:
            if _btf_name(fd) == name:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    return None


def _btf_name(fd: int) -> str:
    name = ctypes.create_string_buffer(64)
    info = bytearray(BTF_INFO_SIZE)
    struct.pack_into("<QI", info, 16, ctypes.addressof(name), len(name))
    info_buf = (ctypes.c_char * BTF_INFO_SIZE).from_buffer(info)
    _bpf(BPF_OBJ_GET_INFO_BY_FD,
         bytearray(struct.pack("<IIQ", fd, BTF_INFO_SIZE, ctypes.addressof(info_buf))))
    return name.value.decode(errors="replace")


def load_tracing(insns: bytes, attach: str, btf_id: int, btf_obj_fd: int = 0,
                 name: str = "") -> int:
    """Load ``insns`` as an fentry/fexit (``attach``) program on the function
    with BTF id ``btf_id`` of the BTF object ``btf_obj_fd`` (0: vmlinux), or
    as a raw tracepoint program (``attach`` "raw_tracepoint", no BTF id).

    Returns the program fd.  OSError on refusal; when the verifier rejected
    the program, its strerror ends with the verifier's error line."""
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")  # bpf_probe_read_kernel & co are GPL-only

    def attempt(log: ctypes.Array[ctypes.c_char] | None) -> int:
        attr = bytearray(PROG_LOAD_SIZE)
        raw = attach == "raw_tracepoint"
        struct.pack_into("<IIQQ", attr, 0,
                         BPF_PROG_TYPE_RAW_TRACEPOINT if raw else BPF_PROG_TYPE_TRACING,
                         len(insns) // 8, ctypes.addressof(code), ctypes.addressof(lic))
        if log is not None:
            struct.pack_into("<IIQ", attr, 24, 1, len(log), ctypes.addressof(log))
        prog_name = name.encode()[:15]  # BPF_OBJ_NAME_LEN 16, NUL-terminated
        attr[48:48 + len(prog_name)] = prog_name
        if not raw:
            struct.pack_into("<I", attr, 68, ATTACH_TYPES[attach])
            struct.pack_into("<II", attr, 108, btf_id, btf_obj_fd)
        return _bpf(BPF_PROG_LOAD, attr)

    try:
        return attempt(None)  # no log: a verbose log of a good program can overflow
    except OSError as e:
        if e.errno == errno.EPERM:  # refused before the verifier ran: no log to show
            raise
    log = ctypes.create_string_buffer(LOG_SIZE)
    try:
        return attempt(log)
    except OSError as e:
        lines = [ln.strip() for ln in log.value.decode(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith(VERIFIER_STATS)]
        if not lines:
            raise
        raise OSError(e.errno, f"{e.strerror}: {lines[-1]}") from None


def attach_tracing(prog_fd: int, tracepoint: str | None = None) -> int:
    """Attach a loaded fentry/fexit program, or a raw tracepoint program to
    ``tracepoint``; the returned link fd detaches it when closed (or when
    the process dies)."""
    # raw_tracepoint: name (NULL: a tracing program knows its target), prog_fd
    name = ctypes.create_string_buffer(tracepoint.encode()) if tracepoint else None
    return _bpf(BPF_RAW_TRACEPOINT_OPEN, bytearray(struct.pack(
        "<QI4x", ctypes.addressof(name) if name is not None else 0, prog_fd)))


def fentry(insns: bytes, attach: str, btf_id: int, btf_obj_fd: int = 0,
           name: str = "") -> tuple[int, int]:
    """Load and attach: (program fd, link fd).  Nothing stays open on failure."""
    prog = load_tracing(insns, attach, btf_id, btf_obj_fd, name)
    try:
        return prog, attach_tracing(prog)
    except BaseException:
        os.close(prog)
        raise


def raw_tracepoint(insns: bytes, tracepoint: str, name: str = "") -> tuple[int, int]:
    """Load ``insns`` as a raw tracepoint program and attach it to
    ``tracepoint`` (e.g. "kvm_mmio"): (program fd, link fd), as ``fentry``."""
    prog = load_tracing(insns, "raw_tracepoint", 0, 0, name)
    try:
        return prog, attach_tracing(prog, tracepoint)
    except BaseException:
        os.close(prog)
        raise
