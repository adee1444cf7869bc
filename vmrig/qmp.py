"""QMP over qemu.qmp's asyncio ``QMPClient``, with every failure a typed RigError.

Timeouts (``QmpTimeout``), QEMU going away (``QemuGone``), and error replies
(``QmpCommandError``) are one-line errors naming the command, so CLI
handlers can print them as-is (vmrig/errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Any

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    Runstate,
    StateError,
)

from vmrig.errors import QemuGone, QmpCommandError, QmpConnectError, QmpTimeout

LIFECYCLE_EVENTS = ("SHUTDOWN", "RESET", "STOP", "GUEST_PANICKED", "GUEST_CRASHLOADED")


class Qmp:
    """A connected QMP session to one QEMU."""

    def __init__(self, name: str = "slotscope-rig", timeout: float = 10.0) -> None:
        self.client = QMPClient(name)
        self.timeout = timeout
        self.version: dict[str, Any] = {}
        # Registered for the whole session, never drained (these are rare):
        # what QEMU said about the VM's run state, for errors that need a cause.
        self.lifecycle = EventListener(LIFECYCLE_EVENTS)
        self.client.register_listener(self.lifecycle)

    async def connect(self, address: str | socket.socket,
                      timeout: float | None = None) -> None:
        """Connect to the QMP socket at path ``address``, or over a socket
        already connected to QEMU (one end of a socket pair)."""
        # A socket object would print as its fds and addresses: say what it is.
        where = address if isinstance(address, str) else "a socket pair"
        try:
            async with asyncio.timeout(timeout if timeout is not None else self.timeout):
                await self.client.connect(address)
        except TimeoutError:
            raise QmpConnectError(where, "timed out") from None
        except (ConnectError, OSError) as e:
            raise QmpConnectError(where, str(e)) from None
        greeting = self.client.greeting
        self.version = dict(greeting.QMP.version["qemu"]) if greeting else {}

    @property
    def connected(self) -> bool:
        return self.client.runstate == Runstate.RUNNING

    async def execute(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> Any:
        """Run ``cmd``; its reply's ``return`` value, or QmpCommandError,
        QmpTimeout, QemuGone."""
        limit = self.timeout if timeout is None else timeout
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
            # cancel (Ctrl-C) that lands as the reply arrives.
            async with asyncio.timeout(limit):
                return await self.client.execute(cmd, args)
        except ExecuteError as e:
            raise QmpCommandError(cmd, e.error.error.desc) from None
        except TimeoutError:
            raise QmpTimeout(cmd, "reply", limit) from None
        except (StateError, ExecInterruptedError, EOFError, ConnectionError) as e:
            raise QemuGone(cmd, type(e).__name__) from None

    def last_lifecycle_event(self) -> dict[str, Any] | None:
        """The newest run-state event that says why, e.g. SHUTDOWN with
        reason guest-reset rather than the STOP that follows it."""
        if not self.lifecycle.history:
            return None
        return dict(next((e for e in reversed(self.lifecycle.history) if e["event"] != "STOP"),
                         self.lifecycle.history[-1]))

    def vm_stopped(self) -> bool:
        """Whether an event said the VM stopped running: SHUTDOWN (the rig's
        guest reset too: -action reboot=shutdown), STOP, GUEST_PANICKED...
        (a RESET alone does not stop it).  No round trip: cheap to poll."""
        return any(e["event"] != "RESET" for e in self.lifecycle.history)

    def last_lifecycle(self) -> str:
        """``last_lifecycle_event`` for a message, e.g. 'SHUTDOWN
        (guest-reset)'; '' if none."""
        ev = self.last_lifecycle_event()
        if ev is None:
            return ""
        data = ev.get("data", {})
        why = data.get("reason") or data.get("action") or ""
        return f"{ev['event']} ({why})" if why else str(ev["event"])

    def listener(self, *names: str) -> contextlib.AbstractContextManager[EventListener]:
        """``with qmp.listener('DEVICE_DELETED') as l: ... await qmp.wait(l, ...)``."""
        return self.client.listener(names)

    async def wait(self, listener: EventListener, what: str, timeout: float,
                   match: dict[str, Any] | Callable[[dict[str, Any]], bool] | None = None,
                   ) -> dict[str, Any]:
        """The next event on ``listener`` whose data contains ``match`` (a dict
        of data items, or a predicate on the whole event)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise QmpTimeout(what, "event", timeout)
            get = asyncio.ensure_future(listener.get())
            # A disconnect does not wake listeners: watch the runstate too.
            done, _ = await asyncio.wait({get}, timeout=min(left, 0.2))
            if not done:
                get.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await get
                if not self.connected:
                    raise QemuGone(what)
                continue
            event = get.result()
            data = event.get("data", {})
            if match is None or (match(dict(event)) if callable(match)
                                 else all(data.get(k) == v for k, v in match.items())):
                return dict(event)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await self.client.disconnect()

