"""vmrig.qmp at the protocol level, against a scripted QMP peer on a unix
socket (no QEMU: these pin down how replies, errors, silence, events and a
vanishing peer become results or one-line RigErrors)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from vmrig import RigError
from vmrig.errors import QemuGone, QmpCommandError, QmpConnectError, QmpTimeout
from vmrig.qmp import Qmp

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
                                "package": ""}, "capabilities": []}}

Handler = Callable[[dict[str, Any], asyncio.StreamWriter], Awaitable[None]]


async def _serve(path: Path, handler: Handler) -> asyncio.AbstractServer:
    async def conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(GREETING).encode() + b"\n")
        await writer.drain()
        decoder, buf = json.JSONDecoder(), ""
        while chunk := await reader.read(4096):  # a JSON stream, not lines
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except json.JSONDecodeError:
                    break
                buf = buf.lstrip()[end:]
                if msg["execute"] == "qmp_capabilities":
                    _send(writer, {"return": {}, "id": msg.get("id")})
                    await writer.drain()
                else:
                    await handler(msg, writer)
        writer.close()
    return await asyncio.start_unix_server(conn, path=str(path))


def _send(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    writer.write(json.dumps(obj).encode() + b"\n")


def event(name: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"event": name, "data": data, "timestamp": {"seconds": 0, "microseconds": 0}}


def run_with_peer(tmp_path: Path, handler: Handler,
                  body: Callable[[Qmp], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        sock = tmp_path / "qmp.sock"
        server = await _serve(sock, handler)
        qmp = Qmp(timeout=1.0)
        try:
            await qmp.connect(str(sock))
            return await body(qmp)
        finally:
            await qmp.close()
            server.close()
    return asyncio.run(main())


def test_reply_error_and_version(tmp_path: Path) -> None:
    async def handler(msg: dict[str, Any], w: asyncio.StreamWriter) -> None:
        if msg["execute"] == "query-status":
            _send(w, {"return": {"status": "running"}, "id": msg["id"]})
        else:
            _send(w, {"error": {"class": "GenericError", "desc": "no such thing"},
                      "id": msg["id"]})
        await w.drain()

    async def body(qmp: Qmp) -> None:
        assert qmp.version == {"major": 7, "minor": 2, "micro": 0}
        assert (await qmp.execute("query-status"))["status"] == "running"
        with pytest.raises(RigError, match=r"^object-del: no such thing$") as e:
            await qmp.execute("object-del", {"id": "x"})
        assert isinstance(e.value, QmpCommandError)
        assert (e.value.command, e.value.desc) == ("object-del", "no such thing")
    run_with_peer(tmp_path, handler, body)


def test_silence_is_a_timeout(tmp_path: Path) -> None:
    async def handler(msg: dict[str, Any], w: asyncio.StreamWriter) -> None:
        return None  # never replies

    async def body(qmp: Qmp) -> None:
        with pytest.raises(RigError, match="device_del: no reply within 0.2 s") as e:
            await qmp.execute("device_del", {"id": "d"}, timeout=0.2)
        assert isinstance(e.value, QmpTimeout) and e.value.awaited == "reply"
    run_with_peer(tmp_path, handler, body)


def test_wait_matches_events(tmp_path: Path) -> None:
    async def handler(msg: dict[str, Any], w: asyncio.StreamWriter) -> None:
        _send(w, {"return": {}, "id": msg["id"]})
        _send(w, event("DEVICE_DELETED", {"device": "other"}))
        _send(w, event("DEVICE_DELETED", {"device": "d1", "path": "/machine/peripheral/d1"}))
        await w.drain()

    async def body(qmp: Qmp) -> dict[str, Any]:
        with qmp.listener("DEVICE_DELETED") as listener:
            await qmp.execute("device_del", {"id": "d1"})
            return await qmp.wait(listener, "device_del d1", 2.0, match={"device": "d1"})
    ev = run_with_peer(tmp_path, handler, body)
    assert ev["data"]["path"] == "/machine/peripheral/d1"


def test_wait_times_out_without_event(tmp_path: Path) -> None:
    async def handler(msg: dict[str, Any], w: asyncio.StreamWriter) -> None:
        _send(w, {"return": {}, "id": msg["id"]})
        await w.drain()

    async def body(qmp: Qmp) -> None:
        with qmp.listener("DEVICE_DELETED") as listener:
            await qmp.execute("device_del", {"id": "d1"})
            with pytest.raises(RigError, match="no event within 0.3 s") as e:
                await qmp.wait(listener, "device_del d1", 0.3, match={"device": "d1"})
            assert isinstance(e.value, QmpTimeout) and e.value.awaited == "event"
            assert (e.value.what, e.value.timeout_s) == ("device_del d1", 0.3)
    run_with_peer(tmp_path, handler, body)


def test_peer_vanishing_is_qemu_gone(tmp_path: Path) -> None:
    async def handler(msg: dict[str, Any], w: asyncio.StreamWriter) -> None:
        if msg["execute"] == "device_del":
            _send(w, {"return": {}, "id": msg["id"]})
            await w.drain()
            await asyncio.sleep(0.1)
        w.close()  # QEMU died

    async def body(qmp: Qmp) -> None:
        with qmp.listener("DEVICE_DELETED") as listener:
            await qmp.execute("device_del", {"id": "d1"})
            with pytest.raises(QemuGone):
                await qmp.wait(listener, "device_del d1", 5.0)
        with pytest.raises(QemuGone):
            await qmp.execute("query-status")
    run_with_peer(tmp_path, handler, body)


def test_connect_refused(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(RigError, match="QMP connect to") as e:
            await Qmp().connect(str(tmp_path / "absent.sock"))
        assert isinstance(e.value, QmpConnectError)
        assert e.value.socket == str(tmp_path / "absent.sock")
    asyncio.run(main())
