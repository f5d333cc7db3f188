"""The one reader of a queue file's envelope (msa.message.queuefile):
envelope_of, which the runner and the watcher use on a file's first read,
gives exactly what the careful streaming reader gives (envelope and offset,
or the same error), on whole files and on prefixes, also around the
envelope size limit; maildrop's untrusted files go through the same
block reader."""

from __future__ import annotations

import io

import pytest

from msa.message import queuefile

ENVELOPE_CASES = [
    b"MSA-Queue-File: 1\nSender: <a@b>\nSize: 3\nRecipient: pending <c@d>\n\nabc",
    b"MSA-Queue-File: 1\nSender: <a@b>\nSize: 4\n\n\n\nab",       # empty lines in the message
    b"MSA-Queue-File: 1\n\nabc",                                     # no Sender: error
    b"MSA-Queue-File: 1\nSender: <a@b>\nSize: 3\n",                  # no end
    b"MSA-Queue-File: 1\nSender: <a@b>\nSize: 3",                    # truncated line
    b"MSA-Queue-File: 2\nSender: <a@b>\n\nabc",                      # other magic
    b"From: x\n\nabc",
    b"",
    b"MSA-Queue-File: 1\nSender: <a@b>\nBogus line\n\nabc",
    b"MSA-Queue-File: 1\nSender: <a@b>\nSize: 3\r\n\nabc",
    b"MSA-Queue-File: 1\nSender: <a@b>\nX-" + b"y" * 60 + b": z\n\nabc",  # long: see limit below
]




def outcome(fn):
    try:
        env, offset = fn()
    except queuefile.QueueFileError as exc:
        return "error", str(exc)
    return repr(env), offset


@pytest.mark.parametrize("limit", [4 * 1024 * 1024, 40, 47, 48, 49, 90])
@pytest.mark.parametrize("data", ENVELOPE_CASES)
def test_envelope_of_is_read_envelope(data, limit, monkeypatch):
    monkeypatch.setattr(queuefile, "MAX_ENVELOPE", limit)
    expected = outcome(lambda: queuefile.read_envelope(io.BytesIO(data)))
    assert outcome(lambda: queuefile.envelope_of(data)) == expected
    for cut in range(len(data)):  # only a prefix read: the rest from the file
        f = io.BytesIO(data)
        assert outcome(lambda: queuefile.envelope_of(data[:cut], f)) == expected, cut


def test_check_size():
    data = b"MSA-Queue-File: 1\nSender: <a@b>\nSize: 3\nRecipient: pending <c@d>\n\nabc"
    import tempfile
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.seek(0)
        env, offset = queuefile.envelope_of(f.read(), f)
        queuefile.check_size(f, env, offset)
        f.truncate(len(data) - 1)
        with pytest.raises(queuefile.QueueFileError, match="message is 2 bytes, Size says 3"):
            queuefile.check_size(f, env, offset)
