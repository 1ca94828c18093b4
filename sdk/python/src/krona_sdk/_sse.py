"""A server-sent events decoder (the subset the API sends: ``event:``, ``data:`` and ``:`` comment lines)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["SSEDecoder", "ServerSentEvent"]


@dataclass
class ServerSentEvent:
    event: str
    data: str


@dataclass
class SSEDecoder:
    """Feed it lines without their line ending; it returns an event at each blank line that ends one."""

    _event: str = "message"
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> ServerSentEvent | None:
        line = line.rstrip("\r")
        if not line:
            if not self._data:
                self._event = "message"
                return None
            event = ServerSentEvent(self._event, "\n".join(self._data))
            self._event, self._data = "message", []
            return event
        if line.startswith(":"):  # a comment: the server's keep-alive ping
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None

    def flush(self) -> ServerSentEvent | None:
        """The event left when the stream ended without a final blank line."""
        return self.feed("")
