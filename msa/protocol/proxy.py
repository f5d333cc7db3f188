"""The PROXY protocol header (HAProxy's, versions 1 and 2), sans-IO: bytes
in, a header or "need more" out, no sockets.

A load balancer in front of msa opens each connection with one header that
says who the client really is; everything after it is the client's SMTP.
Spec: https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt

:func:`parse` takes the bytes received so far and returns None while they
are a proper beginning of a valid header, ``(header, length)`` once a whole
header is there (``length`` bytes of it; the rest is SMTP), and raises
:class:`ProxyError` as soon as they cannot begin one. It never reads more
than :data:`V1_MAX` bytes for version 1 or ``16 +`` :data:`V2_MAX_BODY` for
version 2, so a peer cannot make it buffer without bound.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107                 # the spec's longest line, CRLF included
V2_MAX_BODY = 4096           # addresses + TLVs; HAProxy sends well under this
_V2_ADDRESS_LEN = {1: 12, 2: 36, 3: 216}   # INET, INET6, UNIX


class ProxyError(ValueError):
    """Not a valid PROXY protocol header."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int                  # 1 or 2
    local: bool                   # v2 LOCAL / v1 UNKNOWN: use the connection's addresses
    source: tuple[str, int] | None = None        # the client, (address, port)
    destination: tuple[str, int] | None = None   # where it connected to


def parse(data: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    data = bytes(data)
    if not data:
        return None
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    raise ProxyError("no PROXY protocol header")


def _prefix_of(data: bytes, expected: bytes) -> bool:
    n = min(len(data), len(expected))
    return data[:n] == expected[:n]


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    if not _prefix_of(data, V1_PREFIX):
        raise ProxyError("no PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyError("PROXY v1 line too long or not ended by CRLF")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 line is not ASCII") from None
    parts = line.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, True), end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyError(f"bad PROXY v1 line: {line[:60]!r}")
    version = 4 if parts[1] == "TCP4" else 6
    source = (_address(parts[2], version), _port(parts[4]))
    destination = (_address(parts[3], version), _port(parts[5]))
    return ProxyHeader(1, False, source, destination), end + 2


def _address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"bad address in PROXY header: {text[:60]!r}") from None
    if address.version != version:
        raise ProxyError(f"bad address in PROXY header: {text[:60]!r}")
    return str(address)


def _port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyError(f"bad port in PROXY header: {text[:10]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"bad port in PROXY header: {text[:10]!r}")
    return port


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if not _prefix_of(data, V2_SIGNATURE):
        raise ProxyError("no PROXY protocol header")
    if len(data) < 16:
        if len(data) > 12 and data[12] >> 4 != 2:
            raise ProxyError("PROXY v2: version is not 2")
        return None
    ver_cmd, fam, length = data[12], data[13], struct.unpack(">H", data[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyError("PROXY v2: version is not 2")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise ProxyError(f"PROXY v2: unknown command {command}")
    if length > V2_MAX_BODY:
        raise ProxyError(f"PROXY v2: header of {length} bytes is too long")
    if len(data) < 16 + length:
        return None
    body = data[16:16 + length]
    total = 16 + length
    if command == 0:                     # LOCAL: health checks and the like
        return ProxyHeader(2, True), total
    family, transport = fam >> 4, fam & 0x0F
    if family == 0:                      # UNSPEC: the spec says ignore the addresses
        return ProxyHeader(2, True), total
    if family not in _V2_ADDRESS_LEN or transport not in (1, 2):
        raise ProxyError(f"PROXY v2: unknown family/transport {fam:#04x}")
    if length < _V2_ADDRESS_LEN[family]:
        raise ProxyError("PROXY v2: address block too short")
    if transport != 1:
        raise ProxyError("PROXY v2: not a stream connection")
    if family == 1:
        src, dst, sport, dport = struct.unpack(">4s4sHH", body[:12])
    elif family == 2:
        src, dst, sport, dport = struct.unpack(">16s16sHH", body[:36])
    else:                                # UNIX: no address a mail server can use
        return ProxyHeader(2, True), total
    source = (str(ipaddress.ip_address(src)), sport)
    destination = (str(ipaddress.ip_address(dst)), dport)
    return ProxyHeader(2, False, source, destination), total
