"""Local aliases: ``/etc/aliases`` in the traditional format, compiled by
``newaliases`` (or ``sendmail -bi``), applied by the forward stage.

The source (``[policies] aliases``)::

    # comment
    postmaster: root
    root:       alice@example.net, bob
    staff:      :include:/etc/mail/staff.list
    long:       one,
                two              (a line starting with white space continues)

A key is a local part (compared without case) of the local domain
(``[server] domain``); a target is an address, or a bare name, which gets
the local domain and is looked up again (at most :data:`MAX_DEPTH` deep; a
name met again on its own path is delivered as it is, so ``root: root,
alice`` keeps root too and a loop ends). ``:include:FILE`` takes the
addresses of FILE (commas or lines), read when compiling. Programs
(``|cmd``) and files (``/path``) are refused: msa delivers by SMTP only.

``newaliases`` checks the whole file (every problem with its line) and
writes the table as JSON beside it (``aliases.json``, atomically), which
the daemon reads at start and on SIGHUP, as Postfix's ``aliases.db``. With
``[server] admin`` set, ``root`` and ``postmaster`` go there when the file
does not say otherwise, so they work out of the box.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile

log = logging.getLogger("msa.watcher")

MAX_DEPTH = 10
_KEY = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")


class AliasError(ValueError):
    """Problems of an aliases file, each ``file:line: what``."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def compiled_path(source: str) -> str:
    return source + ".json"


def parse(text: str, where: str = "aliases", read=None) -> dict[str, list[str]]:
    """The table of an aliases file (pure but for ``read``, which reads an
    ``:include:`` file: default ``open``); :class:`AliasError` lists every
    problem."""
    read = read or (lambda path: open(path, encoding="utf-8").read())
    entries: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t" and entries:
            entries[-1] = (entries[-1][0], entries[-1][1] + " " + line.strip())
        else:
            entries.append((n, line))
    table: dict[str, list[str]] = {}
    problems: list[str] = []
    for n, entry in entries:
        key, colon, value = entry.partition(":")
        key = key.strip().lower()
        if not colon or not _KEY.match(key):
            problems.append(f"{where}:{n}: not 'name: address, ...'")
            continue
        if key in table:
            problems.append(f"{where}:{n}: {key} is defined twice")
            continue
        targets: list[str] = []
        reported = len(problems)
        for item in (t.strip() for t in value.split(",")):
            if not item:
                continue
            if item.startswith(":include:"):
                path = item[len(":include:"):].strip()
                try:
                    included = read(path)
                except OSError as exc:
                    problems.append(f"{where}:{n}: cannot read {path}: {exc.strerror}")
                    continue
                targets += [t.strip() for t in re.split(r"[,\n]", included)
                            if t.strip() and not t.strip().startswith("#")]
            else:
                targets.append(item)
        for t in targets:
            if t.startswith(("|", "/")) or t.startswith('"|'):
                problems.append(f"{where}:{n}: {key}: {t[:40]!r}: programs and files are not "
                                "supported (msa delivers by SMTP)")
            elif any(c in t for c in " <>\"\r\n\0") or t.count("@") > 1 or len(t) > 254:
                problems.append(f"{where}:{n}: {key}: bad address {t[:60]!r}")
        if not targets and len(problems) == reported:
            problems.append(f"{where}:{n}: {key} has no address")
        table[key] = targets
    if problems:
        raise AliasError(problems)
    return table


def compile_file(source: str) -> tuple[str, int]:
    """newaliases: check ``source``, write its table beside it; (the
    compiled file, number of aliases)."""
    with open(source, encoding="utf-8") as f:
        table = parse(f.read(), source)
    dest = compiled_path(source)
    fd, tmp = tempfile.mkstemp(prefix=".aliases.", dir=os.path.dirname(dest) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"source": source, "aliases": table}, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest, len(table)


def load(source: str) -> dict[str, list[str]]:
    """The compiled table of ``source`` ({} with a warning when there is
    none, or it is older than the source: run newaliases)."""
    if not source:
        return {}
    dest = compiled_path(source)
    try:
        with open(dest, encoding="utf-8") as f:
            table = json.load(f)["aliases"]
    except FileNotFoundError:
        if os.path.exists(source):
            log.warning("aliases: %s is not compiled: run newaliases", source)
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.error("aliases: cannot read %s: %s", dest, exc)
        return {}
    try:
        if os.stat(source).st_mtime > os.stat(dest).st_mtime:
            log.warning("aliases: %s changed after it was compiled: run newaliases", source)
    except OSError:
        pass
    return {str(k): [str(t) for t in v] for k, v in table.items()}


class AliasTable:
    """Expansion of local addresses (pure)."""

    def __init__(self, table: dict[str, list[str]], domain: str, admin: str = ""):
        self.table = dict(table)
        self.domain = domain.lower()
        if admin:
            for name in ("root", "postmaster"):
                self.table.setdefault(name, [admin])

    def local_key(self, address: str) -> str | None:
        local, at, domain = address.rpartition("@")
        if not at:
            return address.lower()
        return local.lower() if domain.lower() == self.domain and self.domain else None

    def expand(self, address: str) -> list[str]:
        out: list[str] = []
        self._expand(address, [], out)
        seen, unique = set(), []
        for a in out:
            if a.lower() not in seen:
                seen.add(a.lower())
                unique.append(a)
        return unique

    def _expand(self, address: str, path: list[str], out: list[str]) -> None:
        if "@" not in address and self.domain:
            address = f"{address}@{self.domain}"
        key = self.local_key(address)
        if key is None or key not in self.table or key in path or len(path) >= MAX_DEPTH:
            out.append(address)
            return
        for target in self.table[key]:
            self._expand(target, [*path, key], out)


def newaliases_main(cfg, prog: str = "newaliases") -> int:
    """``newaliases`` / ``sendmail -bi``: exit 0, 65 bad file, 78 none."""
    from msa import sysexits
    source = cfg.policies.aliases
    if not source:
        print(f"{prog}: no aliases file: set [policies] aliases", file=sys.stderr)
        return sysexits.EX_CONFIG
    try:
        dest, n = compile_file(source)
    except AliasError as exc:
        for problem in exc.problems:
            print(f"{prog}: {problem}", file=sys.stderr)
        return sysexits.EX_DATAERR
    except OSError as exc:
        print(f"{prog}: {source}: {exc.strerror or exc}", file=sys.stderr)
        return sysexits.EX_NOINPUT if isinstance(exc, FileNotFoundError) \
            else sysexits.EX_CANTCREAT
    print(f"{prog}: {dest}: {n} aliases", file=sys.stderr)
    return sysexits.EX_OK
