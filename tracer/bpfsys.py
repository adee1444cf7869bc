"""The few bpf(2) commands needed to see which BPF programs are loaded.

Used to record the ids of the tracer's programs in the manifest and to
check that none stays loaded after the tracer exits (even by SIGKILL),
without depending on bpftool.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_BPF = 321  # x86-64
BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 11, 13, 15
INFO_SIZE = 80  # struct bpf_prog_info through name[16]


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


def prog_ids() -> list[int]:
    """Ids of all loaded BPF programs."""
    ids, start = [], 0
    while True:
        attr = bytearray(struct.pack("<III", start, 0, 0))
        try:
            _bpf(BPF_PROG_GET_NEXT_ID, attr)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return ids
            raise
        start = struct.unpack_from("<I", attr, 4)[0]
        ids.append(start)


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
