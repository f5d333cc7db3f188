"""Pure command-line, path and ESMTP parameter parsing (msa.protocol.smtpcmd)."""

from __future__ import annotations

import pytest

from msa.protocol.errors import MsaError
from msa.protocol.smtpcmd import (
    parse_mail_params,
    parse_params,
    parse_path,
    parse_rcpt_params,
    split_command,
)


def code(fn, *args, **kw) -> str:
    with pytest.raises(MsaError) as info:
        fn(*args, **kw)
    return f"{info.value.code} {info.value.status}"


def test_split_command():
    assert split_command(b"mail FROM:<a@b.c> SIZE=1\r\n") == ("MAIL", "FROM:<a@b.c> SIZE=1")
    assert split_command(b"QUIT\r\n") == ("QUIT", "")
    assert code(split_command, b"NOOP\n") == "500 5.5.2"
    assert code(split_command, b"NO\rOP\r\n") == "500 5.5.2"
    assert code(split_command, b"NOOP \x00\r\n") == "500 5.5.2"
    assert code(split_command, b"NOOP " + b"x" * 506 + b"\r\n") == "500 5.5.2"
    assert split_command(b"NOOP " + b"x" * 505 + b"\r\n")[0] == "NOOP"        # 512 exactly
    assert split_command(b"RCPT " + b"x" * 1000 + b"\r\n")[0] == "RCPT"
    assert split_command(b"AUTH PLAIN " + b"x" * 12000 + b"\r\n")[0] == "AUTH"
    assert code(split_command, b"MAIL \xff\r\n") == "500 5.5.2"


@pytest.mark.parametrize("text,want", [
    ("<a@b.c>", ("a@b.c", "")),
    ("<a@b.c> SIZE=10 BODY=8BITMIME", ("a@b.c", "SIZE=10 BODY=8BITMIME")),
    (" <a.b+c@sub.example.org>", ("a.b+c@sub.example.org", "")),
    ("a@b.c", ("a@b.c", "")),
    ('<"x y"@b.c>', ('"x y"@b.c', "")),
    ("<@relay.test,@r2.test:a@b.c>", ("a@b.c", "")),
    ("<a@[127.0.0.1]>", ("a@[127.0.0.1]", "")),
    ("<a@[IPv6:::1]>", ("a@[IPv6:::1]", "")),
    ("<j\u00f6rg@b\u00fccher.example>", ("j\u00f6rg@b\u00fccher.example", "")),
])
def test_parse_path_ok(text, want):
    assert parse_path(text) == want


@pytest.mark.parametrize("text", ["<a b@c.d>", "<a@b.c", "<@b.c>", "<a@>", "<a..b@c.d>",
                                  "<a@b..c>", "<a@-b.c>", "<a@[300.1.1.1]>", "<a@b.c>x",
                                  "<" + "x" * 65 + "@b.c>", "<a@" + "b." * 130 + "c>", ""])
def test_parse_path_bad(text):
    assert code(parse_path, text)[0] in "5"


def test_null_path_only_for_mail():
    assert parse_path("<>", null_ok=True) == ("", "")
    assert parse_path("<> SIZE=1", null_ok=True) == ("", "SIZE=1")
    assert code(parse_path, "<>") == "501 5.1.3"
    assert code(parse_path, "<\u00e9@b.c>", utf8=False) == "553 5.6.7"


def test_params():
    assert parse_params("SIZE=10 smtputf8 Body=8bitmime") == {
        "SIZE": "10", "SMTPUTF8": None, "BODY": "8bitmime"}
    assert code(parse_params, "SIZE=1 size=2") == "501 5.5.4"
    assert code(parse_params, "=x") == "501 5.5.4"
    assert code(parse_params, "SIZE=") == "501 5.5.4"


def test_mail_params():
    p = parse_mail_params("SIZE=100 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=a+2Bb AUTH=<>")
    assert (p.size, p.body, p.smtputf8, p.ret, p.envid) == (100, "8BITMIME", True, "HDRS", "a+2Bb")
    for bad in ("SIZE=x", "SIZE", "BODY=BINARYMIME", "SMTPUTF8=1", "RET=ALL", "ENVID=a=b"):
        assert code(parse_mail_params, bad) == "501 5.5.4", bad
    assert code(parse_mail_params, "FOO=1") == "555 5.5.4"


def test_rcpt_params():
    p = parse_rcpt_params("NOTIFY=failure,delay ORCPT=rfc822;a+40b@c.d")
    assert (p.notify, p.orcpt) == ("FAILURE,DELAY", "rfc822;a+40b@c.d")
    assert parse_rcpt_params("NOTIFY=NEVER").notify == "NEVER"
    for bad in ("NOTIFY=NEVER,SUCCESS", "NOTIFY=", "NOTIFY=SUCCESS,SUCCESS", "NOTIFY=SOON",
                "ORCPT=nosemicolon", "ORCPT=rfc822;a b"):
        assert code(parse_rcpt_params, bad)[0] == "5", bad
    assert parse_rcpt_params("ORCPT=utf-8;j\u00f6rg@x.y", utf8=True).orcpt == "utf-8;j\u00f6rg@x.y"
    assert code(parse_rcpt_params, "ORCPT=utf-8;j\u00f6rg@x.y") == "501 5.5.4"
    assert code(parse_rcpt_params, "FOO") == "555 5.5.4"


def test_path_that_is_not_utf8_is_refused_not_raised():
    """Bytes that are not UTF-8 reach parse_path as lone surrogates; they
    got UnicodeEncodeError (an internal error) instead of a reply."""
    for text in ("*@\udc80", "<a\udc80@x.org>", "<j\u00f6rg@\udcff.example>"):
        assert code(parse_path, text, utf8=True) == "553 5.6.7", text
