"""The PROXY protocol header parser (msa.protocol.proxy): the spec's
examples, every split of them, what must be refused, and fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from msa.protocol.proxy import V1_MAX, V2_SIGNATURE, ProxyError, ProxyHeader, parse

SMTP = b"EHLO client.example\r\n"


def v2(command: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, fam]) + struct.pack(">H", len(body)) + body


V4 = v2(1, 0x11, bytes([192, 0, 2, 7, 198, 51, 100, 1]) + struct.pack(">HH", 40000, 587))
V6 = v2(1, 0x21, bytes.fromhex("20010db8" + "0" * 23 + "1") + bytes(15) + b"\x02"
        + struct.pack(">HH", 1234, 465))
CASES = [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 587\r\n",
     ProxyHeader(1, False, ("192.0.2.7", 40000), ("198.51.100.1", 587))),
    (b"PROXY TCP6 2001:db8::1 ::2 1234 465\r\n",
     ProxyHeader(1, False, ("2001:db8::1", 1234), ("::2", 465))),
    (b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n", ProxyHeader(1, True)),
    (b"PROXY UNKNOWN\r\n", ProxyHeader(1, True)),
    (V4, ProxyHeader(2, False, ("192.0.2.7", 40000), ("198.51.100.1", 587))),
    (V6, ProxyHeader(2, False, ("2001:db8::1", 1234), ("::2", 465))),
    (v2(0, 0x00, b""), ProxyHeader(2, True)),                 # LOCAL (health check)
    (v2(1, 0x11, V4[16:] + b"\x04\x00\x02ab"), ProxyHeader(    # with a TLV after
        2, False, ("192.0.2.7", 40000), ("198.51.100.1", 587))),
]


@pytest.mark.parametrize("header, expected", CASES)
def test_every_split_gives_need_more_then_the_header(header, expected):
    data = header + SMTP
    for cut in range(len(header)):
        assert parse(data[:cut]) is None, cut
    for cut in range(len(header), len(data) + 1):
        assert parse(data[:cut]) == (expected, len(header))


@pytest.mark.parametrize("data", [
    b"EHLO x\r\n",                                   # no header on a proxy listener
    b"\x16\x03\x01",                                 # a TLS ClientHello
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 587\n",  # LF only
    b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n",    # a field missing
    b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",   # v6 address in TCP4
    b"PROXY TCP6 192.0.2.7 ::1 1 2\r\n",
    b"PROXY TCP4 192.0.2.07 198.51.100.1 1 2\r\n",    # leading zero
    b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n",
    b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 2\r\n",
    b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n",    # two spaces
    b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
    b"PROXY " + b"1" * V1_MAX,                         # never ends
    b"PROXY TCP4 \xc3\xa9 1 2 3\r\n",
    V2_SIGNATURE + b"\x10\x11\x00\x0c" + bytes(12),   # version 1 in a v2 header
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),   # command 2
    V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),    # addresses cut short
    V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),   # UDP
    V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),   # family 4
    V2_SIGNATURE + b"\x21\x11\xff\xff",               # 65535 bytes announced
    b"\r\n\r\nX",                                      # not the signature
])
def test_refused(data):
    with pytest.raises(ProxyError):
        parse(data)


@given(st.binary(max_size=300))
def test_any_bytes_give_none_a_header_or_proxy_error(data):
    try:
        result = parse(data)
    except ProxyError:
        return
    if result is not None:
        header, length = result
        assert 0 < length <= len(data)
        assert parse(data[:length]) == result      # the header alone is enough


@given(st.ip_addresses(v=4), st.ip_addresses(v=4), st.integers(0, 65535),
       st.integers(0, 65535), st.binary(max_size=40))
def test_v1_round_trip(src, dst, sport, dport, rest):
    line = f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()
    assert parse(line + rest) == (ProxyHeader(1, False, (str(src), sport),
                                              (str(dst), dport)), len(line))


@given(st.ip_addresses(v=6), st.ip_addresses(v=6), st.integers(0, 65535),
       st.integers(0, 65535), st.binary(max_size=40))
def test_v2_round_trip(src, dst, sport, dport, tlvs):
    header = v2(1, 0x21, src.packed + dst.packed + struct.pack(">HH", sport, dport) + tlvs)
    assert parse(header + SMTP) == (ProxyHeader(2, False, (str(src), sport),
                                                (str(dst), dport)), len(header))
