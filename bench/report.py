"""Turn the harness's results (a plain dict, also written as JSON) into the
printed table, and check them against the targets. Pure: no I/O.

Result shapes (all times in seconds, memory in KiB)::

    {"meta": {...},
     "load": [{"side": "msa"|"postfix", "conc": 10, "round": 0, "n": 2000,
               "accept_s": 2.1, "e2e_s": 2.4 | None, "error": ""}],
     "rss": {"msa": {"tree_peak_kb": .., "hwm_kb": ..}, "postfix": {"tree_peak_kb": ..}},
     "big": {"msa": {...}, "postfix": {...}}, "idle": {...}, "backlog": {...}}
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

# The CEO's targets: msa/Postfix ratio at a concurrency, or an absolute bound.
# Issue 10: with the spools on a disk (flush cost), and on tmpfs (CPU only:
# the commit protocol must not cost CPU).
ACCEPT_TARGETS = {1: 1.2, 10: 2.0, 50: 3.0}
E2E_TARGETS = {10: 2.0}
TMPFS_TARGETS = {1: 1.1, 10: 1.1, 50: 1.1}


def on_tmpfs(meta: dict) -> bool:
    """The run's work dir (both spools) was on tmpfs."""
    return "tmpfs" in str((meta.get("disk") or {}).get("protocol", ""))
BIG_RSS_GROWTH_MB = 64
IDLE_RSS_MB = 200
BACKLOG_FIRST_S = 5.0
BACKLOG_RSS_MB = 300


@dataclass
class Row:
    metric: str        # "accept" or "e2e"
    conc: int
    msa: float | None  # messages/s, median over rounds
    postfix: float | None
    target: float | None

    @property
    def ratio(self) -> float | None:
        if self.msa is None or not self.postfix:
            return None
        return self.msa / self.postfix

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        if self.ratio is None:
            return "n/a"
        return "ok" if self.ratio >= self.target else "MISS"


def rate(run: dict, key: str) -> float | None:
    seconds = run.get(key)
    if run.get("error") or not seconds:
        return None
    return run["n"] / seconds


def median_rate(runs: list[dict], key: str) -> float | None:
    rates = [rate(r, key) for r in runs]
    if not rates or any(r is None for r in rates):
        return None   # one failed round fails the cell: no cherry-picking
    return statistics.median(rates)


def load_rows(load: list[dict], metrics=("accept", "e2e"), tmpfs: bool = False) -> list[Row]:
    concs = sorted({r["conc"] for r in load})
    rows = []
    for metric in metrics:
        targets = (TMPFS_TARGETS if tmpfs else
                   ACCEPT_TARGETS if metric == "accept" else E2E_TARGETS)
        for conc in concs:
            cell = {}
            for side in ("msa", "postfix"):
                runs = [r for r in load if r["side"] == side and r["conc"] == conc]
                cell[side] = median_rate(runs, f"{metric}_s") if runs else None
            rows.append(Row(metric, conc, cell["msa"], cell["postfix"], targets.get(conc)))
    return rows


def cpu_ms(load: list[dict], side: str, conc: int) -> float | None:
    per = [1000 * r["cpu_s"] / r["n"] for r in load
           if r["side"] == side and r["conc"] == conc and r.get("cpu_s") is not None]
    return statistics.median(per) if per else None


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _mb(kb: float | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f} MB"


def _check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("ok" if ok else "MISS")


def format_load(results: dict, metrics=("accept", "e2e")) -> list[str]:
    load = results.get("load") or []
    if not load:
        return []
    meta = results.get("meta", {})
    out = [f"load: smtp-source -s CONC -m {meta.get('n')} -l {meta.get('size')} "
           f"-f s@x -t r@y; {meta.get('rounds')} rounds interleaved msa/postfix; "
           "median msg/s",
           f"{'metric':<8}{'conc':>5}{'msa':>11}{'postfix':>11}{'msa/pfx':>10}"
           f"{'target':>9}  verdict"]
    for row in load_rows(load, metrics, on_tmpfs(meta)):
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        target = "" if row.target is None else f">={row.target:.1f}x"
        out.append(f"{row.metric:<8}{row.conc:>5}{_num(row.msa):>11}{_num(row.postfix):>11}"
                   f"{ratio:>10}{target:>9}  {row.verdict}")
    out.append("CPU per message, end to end (median ms; all processes of the side): " + ", ".join(
        f"c={conc} msa {_num(cpu_ms(load, 'msa', conc))} / postfix "
        f"{_num(cpu_ms(load, 'postfix', conc))}" for conc in sorted({r['conc'] for r in load})))
    errors = [r for r in load if r.get("error")]
    for r in errors:
        out.append(f"  error: {r['side']} c={r['conc']} round {r['round']}: {r['error']}")
    rss = results.get("rss", {})
    m, p = rss.get("msa", {}), rss.get("postfix", {})
    out.append(f"peak memory during load: msa RSS {_mb(m.get('tree_peak_kb'))} "
               f"(daemon VmHWM {_mb(m.get('hwm_kb'))}, PSS {_mb(m.get('tree_peak_pss_kb'))}); "
               f"postfix RSS sum {_mb(p.get('tree_peak_kb'))} over up to "
               f"{p.get('max_procs', '-')} processes (PSS sum {_mb(p.get('tree_peak_pss_kb'))})")
    return out


def big_ok(big: dict) -> bool | None:
    m = big.get("msa") or {}
    if m.get("error") or "rss_growth_kb" not in m:
        return None
    return m["rss_growth_kb"] < BIG_RSS_GROWTH_MB * 1024


def format_big(big: dict) -> list[str]:
    if not big:
        return []
    out = [f"{big.get('size', 0) // (1024 * 1024)} MB message (smtp-source -s 1 -m 1 -l "
           f"{big.get('size')}):"]
    for side in ("msa", "postfix"):
        r = big.get(side)
        if not r:
            continue
        if r.get("error"):
            out.append(f"  {side}: error: {r['error']}")
            continue
        line = (f"  {side:<8} accept {_num(r.get('accept_s'), '{:.2f}')} s, "
                f"end to end {_num(r.get('e2e_s'), '{:.2f}')} s, "
                f"RSS growth {_mb(r.get('rss_growth_kb'))}")
        if side == "msa":
            line += f" (target < {BIG_RSS_GROWTH_MB} MB: {_check(big_ok(big))})"
        out.append(line)
    return out


def idle_ok(idle: dict) -> bool | None:
    if idle.get("error") or "rss_kb" not in idle:
        return None
    return idle["rss_kb"] < IDLE_RSS_MB * 1024 and idle.get("greeted") == idle.get("count")


def _phase(r: dict, title: str, body) -> list[str]:
    """One line for a phase: its error, or ``body(r)``."""
    if not r:
        return []
    if r.get("error"):
        return [f"{title}: error: {r['error']}"]
    return [f"{title}: {body(r)}"]


def format_idle(idle: dict) -> list[str]:
    return _phase(idle, f"{idle.get('count')} idle connections to msa", lambda r: (
        f"{r['greeted']} greeted, RSS {_mb(r['rss_kb'])} (was {_mb(r['baseline_kb'])}), "
        f"a message during them: {r.get('message_ok')} "
        f"(target < {IDLE_RSS_MB} MB: {_check(idle_ok(r))})"))


def backlog_ok(b: dict) -> bool | None:
    if b.get("error") or b.get("first_s") is None:
        return None if b.get("error") else False
    return b["first_s"] <= BACKLOG_FIRST_S and b["rss_peak_kb"] < BACKLOG_RSS_MB * 1024


def format_backlog(b: dict) -> list[str]:
    return _phase(b, f"backlog of {b.get('count')} queued messages, `msa deliver` started",
                  lambda r: (
        f"first delivery after {_num(r.get('first_s'), '{:.2f}')} s, {r['delivered']} "
        f"delivered in {r['window_s']:.0f} s after it, peak RSS {_mb(r['rss_peak_kb'])} "
        f"(targets <= {BACKLOG_FIRST_S:.0f} s, < {BACKLOG_RSS_MB} MB: "
        f"{_check(backlog_ok(r))})"))


def format_stages(st: dict) -> list[str]:
    if not st:
        return []
    if st.get("error"):
        return [f"components alone: error: {st['error']}"]
    n = st["n"]
    out = [f"msa components alone, each its own process ({n} messages of the load size):"]
    for name, what in (("edge", "edge (smtp-source c=10 -> incoming/)"),
                       ("watch", "watcher (incoming/ -> active/)"),
                       ("deliver", "runner (active/ -> sink)")):
        r = st.get(name)
        if not r:
            continue
        out.append(f"  {what:<38} {n / r['seconds']:8.1f} msg/s "
                   f"{1000 * r['cpu_s'] / n:6.2f} ms CPU/msg {r.get('error', '')}")
    return out


def format_sendmail(sm: dict) -> list[str]:
    """sendmail calls per second, msa against Postfix (target 1.0x)."""
    if not sm:
        return []
    out = ["sendmail -t, one message per call:"]
    for name in ("msa", "postfix"):
        r = sm.get(name)
        if r:
            out.append(f"  {name:<8} " + (f"{r['per_s']:7.1f} calls/s" if "per_s" in r
                                          else f"error: {r.get('error')}"))
    m, p = sm.get("msa", {}).get("per_s"), sm.get("postfix", {}).get("per_s")
    if m and p:
        out.append(f"  ratio {m / p:.2f}x (target 1.0x)")
    return out


def format_meta(meta: dict) -> list[str]:
    out = [f"msa {meta.get('msa_rev', '?')} vs Postfix {meta.get('postfix_version', '?')}; "
           f"{meta.get('cpus')} CPUs; Python {meta.get('python')}; {meta.get('kernel')}"]
    d = meta.get("disk")
    if d:
        out.append(f"disk, one thread, 2 KB files: {d['creates_per_s']:.0f} fsynced creates/s; "
                   f"{d['commits_per_s']:.0f} create+fsync+rename+dir fsync/s (strict)")
        if "journal_c1_per_s" in d:
            out.append("disk, write+rename+fsync (journal): "
                       + "; ".join(f"{d[f'journal_c{c}_per_s']:.0f}/s with {c} writers"
                                   for c in (1, 10, 50)))
        if d.get("protocol"):
            out.append(f"msa's spool: {d['protocol']}")
    for note in meta.get("notes", []):
        out.append(f"note: {note}")
    return out


def format_all(results: dict, metrics=("accept", "e2e")) -> str:
    parts = [format_meta(results.get("meta", {})), format_load(results, metrics),
             format_sendmail(results.get("sendmail") or {}),
             format_stages(results.get("stages") or {}),
             format_big(results.get("big") or {}), format_idle(results.get("idle") or {}),
             format_backlog(results.get("backlog") or {})]
    return "\n\n".join("\n".join(p) for p in parts if p)
