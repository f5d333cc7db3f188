"""A disk with a volatile write cache, for power-cut tests: an NBD server
(the protocol's fixed newstyle handshake and simple replies, as qemu's
NBD client speaks them) over an image held in memory.

A write lands in the cache; it becomes durable at the next FLUSH, or at
once when it carries FUA. :meth:`CachedDisk.power_cut` is what a disk
with a volatile cache keeps when the power goes: everything flushed, plus
any subset (chosen at random, block by block, so writes tear at 4 KiB) of
what was written since. A filesystem that is correct about flushes loses
nothing it made durable, whatever subset survives.

Protocol: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import random
import socket
import struct
import threading

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, 2**31 + 1
INFO_EXPORT = 0
TFLAG_HAS_FLAGS, TFLAG_SEND_FLUSH, TFLAG_SEND_FUA = 1, 4, 8
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
CMD_FLAG_FUA = 1
EINVAL = 22
BLOCK = 4096


class CachedDisk:
    """``lying``: a disk that acknowledges FLUSH and FUA without making
    anything durable (the harness's negative control: on it, acknowledged
    messages must be found lost)."""

    def __init__(self, image: bytes, lying: bool = False):
        self.lying = lying
        self.dead = threading.Event()   # the power is off: nothing more lands
        self._die_after: int | None = None
        self._die_at_flush: int | None = None
        self.durable = bytearray(image)    # what survives a power cut
        self.visible = bytearray(image)    # what reads return
        self.pending: list[tuple[int, bytes]] = []   # written, not flushed
        self.lock = threading.Lock()
        self.flushes = self.writes = self.fua_writes = 0

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            return bytes(self.visible[offset:offset + length])

    def arm_flush(self, flushes: int) -> None:
        """Lose power when the ``flushes``-th FLUSH from now arrives, before
        it is carried out: what was written since the last flush is in the
        cache, and a random part of it survives the cut."""
        with self.lock:
            self._die_at_flush = self.flushes + max(1, flushes)

    def arm(self, writes: int) -> None:
        """Lose power once ``writes`` more writes have landed in the cache
        (so the cut falls among a commit's writes, not after its flush)."""
        with self.lock:
            self._die_after = self.writes + max(1, writes)

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        with self.lock:
            if self.dead.is_set():
                return
            if self._die_after is not None and self.writes >= self._die_after:
                self.dead.set()
                return
            self.visible[offset:offset + len(data)] = data
            self.writes += 1
            if fua and not self.lying:
                self.fua_writes += 1
                self.durable[offset:offset + len(data)] = data
            else:
                self.pending.append((offset, data))

    def flush(self) -> None:
        with self.lock:
            if self.dead.is_set():
                return
            if self._die_at_flush is not None and self.flushes + 1 >= self._die_at_flush:
                self.dead.set()
                return
            if self.lying:
                self.flushes += 1
                return
            for offset, data in self.pending:
                self.durable[offset:offset + len(data)] = data
            self.pending.clear()
            self.flushes += 1

    def power_cut(self, rng: random.Random) -> tuple[bytearray, int, int]:
        """(the image after the cut, unflushed 4 KiB pieces, how many of
        them survived). Pieces that survive are applied in write order."""
        with self.lock:
            image = bytearray(self.durable)
            pieces = kept = 0
            for offset, data in self.pending:
                for at in range(0, len(data), BLOCK):
                    pieces += 1
                    if rng.random() < 0.5:
                        kept += 1
                        chunk = data[at:at + BLOCK]
                        image[offset + at:offset + at + len(chunk)] = chunk
            return image, pieces, kept


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


class NbdServer:
    """Serves one :class:`CachedDisk` on 127.0.0.1 to one client at a time."""

    def __init__(self, disk: CachedDisk):
        self.disk = disk
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        # shutdown wakes the thread blocked in accept(); close alone does
        # not, and that thread (holding the disk: 2 images in memory) lived on.
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        self.thread.join(10)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._handshake(conn):
                    self._transmission(conn)
        except (ConnectionError, OSError):
            pass

    def _handshake(self, conn: socket.socket) -> bool:
        size = len(self.disk.visible)
        tflags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT,
                                 FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", _recv(conn, 4))
        while True:
            magic, opt, length = struct.unpack(">QII", _recv(conn, 16))
            if magic != IHAVEOPT:
                return False
            data = _recv(conn, length)
            if opt == OPT_EXPORT_NAME:
                conn.sendall(struct.pack(">QH", size, tflags)
                             + (b"" if cflags & FLAG_NO_ZEROES else b"\0" * 124))
                return True
            if opt in (OPT_INFO, OPT_GO):
                info = struct.pack(">HQH", INFO_EXPORT, size, tflags)
                conn.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, REP_INFO, len(info)) + info)
                conn.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, REP_ACK, 0))
                if opt == OPT_GO:
                    return True
                continue
            if opt == OPT_ABORT:
                conn.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, REP_ACK, 0))
                return False
            del data
            conn.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))

    def _transmission(self, conn: socket.socket) -> None:
        disk = self.disk
        while True:
            magic, flags, kind, handle, offset, length = struct.unpack(
                ">IHHQQI", _recv(conn, 28))
            if magic != REQUEST_MAGIC:
                return
            error, payload = 0, b""
            if disk.dead.is_set():
                if kind == CMD_WRITE:
                    _recv(conn, length)
                continue            # no power: no replies, nothing stored
            if kind == CMD_READ:
                payload = disk.read(offset, length)
            elif kind == CMD_WRITE:
                data = _recv(conn, length)
                disk.write(offset, data, bool(flags & CMD_FLAG_FUA))
            elif kind == CMD_FLUSH:
                disk.flush()
            elif kind == CMD_DISC:
                return
            else:
                error = EINVAL
            if disk.dead.is_set():
                continue            # died during this request: no reply
            conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle) + payload)
