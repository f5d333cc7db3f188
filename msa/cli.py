"""``msa COMMAND``: the administrator's entry point.

Each command lives in its own module and exposes ``main(argv) -> int``;
this file only dispatches, so commands can be added without touching each
other. Exit codes are sysexits (``msa.sysexits``).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "daemon": ("msa.process.daemon", "run edge, watcher and runner together"),
    "edge": ("msa.process.daemon", "run the SMTP submission listeners only"),
    "watch": ("msa.process.daemon", "run the policy-stage watcher only"),
    "deliver": ("msa.process.daemon", "run the delivery runner only"),
    "check": ("msa.admin.check", "check the configuration and the files it names"),
    "config": ("msa.admin.check", "print the configuration (-n: what differs from the defaults)"),
    "queue": ("msa.admin.queuecmd", "list, show, delete, hold, release, flush"),
    "user": ("msa.admin.usercmd", "add, remove, list users; set a password"),
    "set-permissions": ("msa.admin.permissions", "create the spool, repair owners and modes"),
    "route": ("msa.admin.route", "where mail to an address would go (aliases, rules, relay)"),
    "demo": ("msa.admin.demo", "set up and run a working loopback instance"),
}


def usage() -> str:
    lines = ["usage: msa COMMAND [options]  (msa COMMAND --help)", ""]
    lines += [f"  {name:<15} {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"], ["-V"]):
        from importlib.metadata import PackageNotFoundError, version
        try:
            print(f"msa {version('msa')}")
        except PackageNotFoundError:
            print("msa (not installed: run from a checkout)")
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 64
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"msa: unknown command {name!r}\n{usage()}", file=sys.stderr)
        return 64
    module = importlib.import_module(COMMANDS[name][0])
    takes_name = module.__name__ in ("msa.process.daemon", "msa.admin.check")
    return module.main([name, *rest]) if takes_name else module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
