"""uvicorn's httptools protocol, sending a response's head and body in one write.

uvicorn writes the status line and headers of a response (`http.response.start`) and
then its body in two `transport.write` calls: two send() system calls, two TCP segments
and, on the client, often two reads and wake-ups, for every small JSON answer. Here the
transport holds a response head until the next write (the body, sent right after by
the same task) and sends both together; a head that is not followed by a write in the
same event-loop step (a HEAD request, a streaming body computed later) is sent on its
own at the next step, and before the transport closes. Nothing else changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Bodies larger than this are written on their own (no copy to join them to the head).
JOIN_MAX_BYTES = 64 * 1024


class CoalescingTransport:
    """A transport whose response heads wait for the write that follows them."""

    __slots__ = ("_transport", "_loop", "_head")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._head: bytes | None = None

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if len(data) <= JOIN_MAX_BYTES:
                self._transport.write(head + data)
                return
            self._transport.write(head)
        elif data[:5] == b"HTTP/" and data[-4:] == b"\r\n\r\n":  # uvicorn's response head
            self._head = bytes(data)
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        """Send a held head now."""
        head = self._head
        if head is not None:
            self._head = None
            if not self._transport.is_closing():
                self._transport.write(head)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._head = None
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        held = self._head
        return self._transport.get_write_buffer_size() + (len(held) if held else 0)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol over a `CoalescingTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
