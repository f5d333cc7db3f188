"""msa.cleanup.aliases: the traditional aliases format and its expansion."""

from __future__ import annotations

import pytest

from msa.cleanup.aliases import AliasError, AliasTable, parse

SOURCE = """# the mail system's
postmaster: root
root:       alice@example.net, Bob
bob:        bob, robert@example.com
list:       one,
            two
staff:      :include:/staff
loop1:      loop2
loop2:      loop1
"""


def test_parse_continuations_includes_and_case():
    table = parse(SOURCE, read=lambda path: {"/staff": "carol\n# x\ndave@x.test, erin\n"}[path])
    assert table["root"] == ["alice@example.net", "Bob"]
    assert table["list"] == ["one", "two"]
    assert table["staff"] == ["carol", "dave@x.test", "erin"]


def test_every_problem_with_its_line():
    with pytest.raises(AliasError) as exc:
        parse("a: b\nnot a line\na: c\np: |/bin/sh\nf: /var/mail/x\nq: a@b@c\nempty:\n"
              "i: :include:/none\n", "aliases", read=lambda path: open(path).read())
    assert exc.value.problems == [
        "aliases:2: not 'name: address, ...'",
        "aliases:3: a is defined twice",
        "aliases:4: p: '|/bin/sh': programs and files are not supported (msa delivers by SMTP)",
        "aliases:5: f: '/var/mail/x': programs and files are not supported (msa delivers by "
        "SMTP)",
        "aliases:6: q: bad address 'a@b@c'",
        "aliases:7: empty has no address",
        "aliases:8: cannot read /none: No such file or directory",
    ]


def test_expand():
    t = AliasTable(parse(SOURCE, read=lambda p: "carol"), "example.org")
    assert t.expand("postmaster@example.org") == ["alice@example.net", "bob@example.org",
                                                  "robert@example.com"]
    assert t.expand("ROOT@Example.ORG") == t.expand("root@example.org")
    assert t.expand("root@elsewhere.test") == ["root@elsewhere.test"]   # not local
    assert t.expand("nobody@example.org") == ["nobody@example.org"]
    assert t.expand("loop1@example.org") == ["loop1@example.org"]        # the loop ends
    assert t.expand("staff@example.org") == ["carol@example.org"]


def test_admin_catches_root_and_postmaster_unless_the_file_says():
    t = AliasTable({}, "example.org", admin="ops@example.net")
    assert t.expand("root@example.org") == ["ops@example.net"]
    assert t.expand("postmaster@example.org") == ["ops@example.net"]
    t = AliasTable({"root": ["alice"]}, "example.org", admin="ops@example.net")
    assert t.expand("root@example.org") == ["alice@example.org"]
