#!/usr/bin/env python3
"""Power cuts during a submission load: does msa keep every message it
acknowledged? (On demand, as root; not part of CI: minutes per cut.)

    python3 bench/powercut.py --fs ext4 --cuts 20
    python3 bench/powercut.py --fs xfs --cuts 20 --json out.json

kill -9 does not test durability: the kernel's page cache survives it. Here
msa runs inside a qemu VM (TCG; Debian's ``linux-image-amd64`` and a
busybox initramfs made here; the host's root filesystem shared read-only
over 9p, so the VM runs this checkout and its venv) whose spool is a
virtual disk with a volatile write cache: an NBD server in this process
(``bench/nbdcache.py``) that makes a write durable only at a FLUSH (or
FUA), as a disk's cache does. At a random moment during the load the
VM's power is cut: qemu is killed with SIGKILL and the disk keeps what was
flushed plus a random subset of the rest, torn at 4 KiB. The image is
then mounted here (the journal replayed), every queue id that got a 250
on the VM's console so far is looked for in every stage and checked whole
(Size, body digest), and the next boot runs msa on the same, recovered
spool.

Needs: qemu-system-x86, linux-image-amd64, busybox-static, mkfs.ext4 and
mkfs.xfs (xfsprogs) and loop mounts (root).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import disk as disk_mod  # noqa: E402
from bench.nbdcache import CachedDisk, NbdServer  # noqa: E402
from msa.message import queuefile  # noqa: E402
from spool import durable  # noqa: E402

MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "xfs", "9pnet_virtio", "9p")
PORT = 2525
QID_LEN = 22
BUSYBOX = "/bin/busybox"

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /host /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m || echo "@@INSMOD $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host \
    || { echo "@@FAILED 9p"; poweroff -f; }
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mount -t tmpfs tmp /host/tmp
mount -t tmpfs run /host/run
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mount -t "$fstype" /dev/vda "/host$mnt" || { echo "@@FAILED mount /dev/vda"; poweroff -f; }
ifconfig lo 127.0.0.1 up
echo "@@BOOTED"
exec chroot /host "$python" "$guest" "$config" "$port"
"""


def kernel() -> tuple[str, str]:
    """(vmlinuz, its modules directory) of the newest installed kernel."""
    for path in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        release = path.split("vmlinuz-", 1)[1]
        if os.path.isdir(f"/lib/modules/{release}"):
            return path, f"/lib/modules/{release}"
    raise SystemExit("powercut: no /boot/vmlinuz-* with modules (apt-get install "
                     "linux-image-amd64)")


def module_order(moddir: str) -> list[str]:
    """The .ko files to insmod, dependencies first (modules.dep)."""
    deps: dict[str, list[str]] = {}
    for line in Path(moddir, "modules.dep").read_text().splitlines():
        name, _, rest = line.partition(":")
        deps[name] = rest.split()
    by_name = {os.path.basename(k).split(".ko")[0].replace("-", "_"): k for k in deps}
    order: list[str] = []

    def add(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps.get(path, [])):
            add(dep)
        order.append(path)
    for name in MODULES:
        if name in by_name:
            add(by_name[name])
    return order


def cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data); directories have no data."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], 1):
        raw = name.encode() + b"\0"
        header = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0))
        out += header.encode() + raw
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def initramfs(moddir: str, dest: Path) -> None:
    order = module_order(moddir)
    entries = [("bin", 0o40755, b""), ("modules", 0o40755, b""),
               ("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes()),
               ("init", 0o100755, INIT.encode())]
    names = []
    for path in order:
        base = os.path.basename(path)
        entries.append((f"modules/{base}", 0o100644, Path(moddir, path).read_bytes()))
        names.append(base)
    entries.append(("modules.order", 0o100644, ("\n".join(names) + "\n").encode()))
    dest.write_bytes(cpio(entries))


def write_config(cfg_dir: Path, mnt: str, sync: str = "auto") -> Path:
    """msa.toml for the VM: plain SMTP on 127.0.0.1 without AUTH (trusted),
    relay to a closed port (so messages are deferred, rewritten, kept)."""
    cfg_dir.mkdir(parents=True, exist_ok=True)
    key, cert = cfg_dir / "key.pem", cfg_dir / "cert.pem"
    if not cert.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "30", "-subj", "/CN=powercut.test", "-keyout", str(key), "-out",
                        str(cert)], check=True, capture_output=True, timeout=120)
    (cfg_dir / "passwd").touch()
    path = cfg_dir / "msa.toml"
    path.write_text(f"""\
[spool]
root = "{mnt}/spool"
sync = "{sync}"

[server]
hostname = "powercut.test"
domain = "bench.test"

[edge]
submission = ["127.0.0.1:{PORT}"]
submissions = []
trusted_networks = ["127.0.0.1/32"]
client_dns = false
certfile = "{cert}"
keyfile = "{key}"

[auth]
passwd_file = "{cfg_dir / 'passwd'}"

[relay]
smarthost = "127.0.0.1:1"
smarthost_tls = "none"
tls = "none"
connect_timeout = 2.0

[daemon]
log = "stderr"
log_level = "warning"
""")
    for p in (cfg_dir, key, cert, path, cfg_dir / "passwd"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return path


def check_spool(root: Path, acked: dict[str, str | None]) -> dict:
    """Every acknowledged id whole somewhere in the spool (any stage but
    tmp/ and corrupt/), with the digest of the body it was sent with."""
    found: dict[str, Path] = {}
    corrupt = 0
    for dirpath, _dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        top = rel.split(os.sep)[0]
        if top in ("tmp", "claims", "maildrop"):
            continue
        if top == "corrupt":
            corrupt += len(files)
            continue
        for name in files:
            found[name] = Path(dirpath, name)
    lost, broken = [], []
    for qid, digest in acked.items():
        path = found.get(qid)
        if path is None:
            lost.append(qid)
            continue
        try:
            with open(path, "rb") as f:
                env, offset = queuefile.read_envelope(f)
                queuefile.check_size(f, env, offset)
                f.seek(offset)
                message = f.read()
        except (OSError, queuefile.QueueFileError) as exc:
            broken.append(f"{qid}: {exc}")
            continue
        body = message.split(b"\r\n\r\n", 1)[1]
        if digest is not None and hashlib.sha256(body).hexdigest() != digest:
            broken.append(f"{qid}: body differs")
    return {"acked": len(acked), "found": len(acked) - len(lost) - len(broken),
            "lost": lost, "broken": broken, "corrupt_files": corrupt,
            "files": len(found)}


class Boot:
    """One run of the VM until its power is cut."""

    def __init__(self, args, kernel_path: str, initrd: Path, port: int, config: Path,
                 mnt: str, log: Path):
        self.acks: dict[str, str | None] = {}
        self.client_errors: list[str] = []
        self.ready = threading.Event()
        self.failed: str | None = None
        cmdline = (f"console=ttyS0 panic=-1 quiet fstype={args.fs} mnt={mnt} "
                   f"python={ROOT}/.venv/bin/python3 guest={ROOT}/bench/powercut_guest.py "
                   f"config={config} port={PORT}")
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "2048", "-smp", str(args.smp),
                "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
                "-kernel", kernel_path, "-initrd", str(initrd), "-append", cmdline,
                "-drive", f"file=nbd://127.0.0.1:{port},format=raw,if=virtio,cache=writeback",
                "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                "multidevs=remap"]
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.log.write(raw)
            line = raw.decode(errors="replace").strip()
            if line.startswith("@@ACK "):
                # The cut can end the console mid-line: a line without its
                # whole queue id names nothing; one without its whole digest
                # is an acknowledgement whose body cannot be compared.
                parts = line.split()
                if len(parts) >= 2 and len(parts[1]) == QID_LEN:
                    digest = parts[2] if len(parts) == 3 and len(parts[2]) == 64 else None
                    self.acks[parts[1]] = digest
            elif line.startswith("@@CLIENT"):
                self.client_errors.append(line)
            elif line.startswith("@@READY"):
                self.ready.set()
            elif line.startswith("@@FAILED"):
                self.failed = line
                self.ready.set()

    def cut(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.reader.join(30)
        self.log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fs", choices=("ext4", "xfs"), default="ext4")
    p.add_argument("--cuts", type=int, default=20)
    p.add_argument("--sync", choices=("auto", "strict"), default="auto",
                   help="msa's [spool] sync in the VM (auto: journal on ext4 and xfs)")
    p.add_argument("--size-mb", type=int, default=1024,
                   help="the spool disk (about 20 KB a message; 20 cuts queue ~15,000)")
    p.add_argument("--smp", type=int, default=2, help="the VM's CPUs")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-wait", type=float, default=60.0,
                   help="cut at a random moment up to this many seconds after the load starts")
    p.add_argument("--lying-disk", action="store_true",
                   help="negative control: the disk ignores FLUSH and FUA, so acknowledged "
                   "messages must be reported lost (exit 0 only if some are)")
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--json")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("powercut: needs root (loop mounts)", file=sys.stderr)
        return 77
    for tool in ("qemu-system-x86_64", f"mkfs.{args.fs}", "openssl"):
        if not shutil.which(tool):
            print(f"powercut: {tool} missing (apt-get install qemu-system-x86 "
                  "linux-image-amd64 busybox-static xfsprogs)", file=sys.stderr)
            return 69
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    kernel_path, moddir = kernel()
    work = Path(tempfile.mkdtemp(prefix=f"msa-powercut-{args.fs}-", dir=args.workdir))
    os.chmod(work, 0o755)
    mnt = work / "mnt"
    mnt.mkdir()
    initrd = work / "initrd.cpio"
    initramfs(moddir, initrd)
    config = write_config(work / "cfg", str(mnt), args.sync)
    image = work / "spool.img"
    with open(image, "wb") as f:
        f.truncate(args.size_mb * 1024 * 1024)
    subprocess.run([*disk_mod.MKFS[args.fs], str(image)], check=True, capture_output=True,
                   timeout=300)
    acked: dict[str, str | None] = {}
    report: dict = {"fs": args.fs, "sync": args.sync, "seed": seed, "kernel": kernel_path,
                    "cuts": [],
                    "lying_disk": args.lying_disk}
    print(f"powercut: {args.fs}, [spool] sync = {args.sync}, {args.cuts} cuts, seed {seed}, "
          f"work {work}", flush=True)
    try:
        for n in range(args.cuts):
            disk = CachedDisk(image.read_bytes(), lying=args.lying_disk)
            server = NbdServer(disk)
            started = time.monotonic()
            boot = Boot(args, kernel_path, initrd, server.port, config, str(mnt),
                        work / f"console-{n}.log")
            if not boot.ready.wait(900) or boot.failed:
                boot.cut()
                server.close()
                raise SystemExit(f"powercut: boot {n} did not get ready: {boot.failed} "
                                 f"(see {work}/console-{n}.log)")
            ready_s = time.monotonic() - started
            time.sleep(rng.uniform(0.5, args.max_wait))
            how = "at a random moment"
            if n % 3:
                # two cuts in three fall inside a commit: the disk loses
                # power after 1 to 8 more writes have reached it, or when
                # the 1st to 4th flush from now arrives (what was written
                # since the last flush is then in its cache, and a random
                # part of it survives)
                if n % 3 == 1:
                    armed = rng.randint(1, 8)
                    disk.arm(armed)
                    how = f"{armed} writes later"
                else:
                    armed = rng.randint(1, 4)
                    disk.arm_flush(armed)
                    how = f"at flush {armed} from then"
                if not disk.dead.wait(120):
                    how += " (no write came: cut at 120 s)"
            boot.cut()
            server.close()
            crashed, pieces, kept = disk.power_cut(rng)
            image.write_bytes(crashed)
            del crashed
            acked.update(boot.acks)
            mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)],
                                     capture_output=True, text=True, timeout=300)
            if mounted.returncode != 0:
                # the filesystem itself did not survive (only on a lying disk)
                result = {"acked": len(acked), "found": 0, "lost": list(acked),
                          "broken": [], "corrupt_files": 0, "files": 0,
                          "mount_error": mounted.stderr.strip()}
                if not args.lying_disk:
                    raise SystemExit(f"powercut: cannot mount after cut {n}: "
                                     f"{mounted.stderr.strip()}")
                report["cuts"].append(result)
                break
            try:
                result = check_spool(mnt / "spool", acked)
                if "protocol" not in report:
                    # what [spool] sync chooses on this filesystem (the
                    # guest's kernel, 5.8 or later, chooses the same)
                    report["protocol"] = durable.choose(str(mnt), args.sync).describe()
                    print(f"msa's spool: {report['protocol']}", flush=True)
            finally:
                subprocess.run(["umount", str(mnt)], check=True, capture_output=True,
                               timeout=300)
            result.update({"cut": n, "how": how, "acked_this_boot": len(boot.acks), "ready_s":
                           round(ready_s, 1), "unflushed_blocks": pieces,
                           "unflushed_kept": kept, "flushes": disk.flushes,
                           "writes": disk.writes, "fua_writes": disk.fua_writes})
            report["cuts"].append(result)
            if not boot.acks:
                # a cut with no load tests nothing: say so, and why
                print(f"  no message acknowledged in this boot: "
                      f"{boot.client_errors[-1:] or 'no client error'}", flush=True)
            result["client_errors"] = boot.client_errors[-3:]
            for line in result["lost"][:5] + result["broken"][:5]:
                print(f"  lost or broken: {line}", flush=True)
            if (result["lost"] or result["broken"]) and not (work / "first-loss.img").exists():
                shutil.copyfile(image, work / "first-loss.img")
                shutil.copyfile(work / f"console-{n}.log", work / "first-loss-console.log")
                print(f"  image kept as {work}/first-loss.img", flush=True)
            print(f"cut {n} ({how}): ready after {ready_s:.0f} s, {len(boot.acks)} acked "
                  f"this boot, "
                  f"{result['acked']} in all: found {result['found']}, lost "
                  f"{len(result['lost'])}, broken {len(result['broken'])}; "
                  f"{kept}/{pieces} unflushed blocks kept ({disk.writes} writes, "
                  f"{disk.fua_writes} FUA, {disk.flushes} flushes); "
                  f"corrupt/ {result['corrupt_files']}",
                  flush=True)
            del disk, server, boot          # two images in memory: not three
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    last = report["cuts"][-1] if report["cuts"] else {}
    lost = sum(len(c["lost"]) + len(c["broken"]) for c in report["cuts"])
    loaded = sum(1 for c in report["cuts"] if c.get("acked_this_boot"))
    print(f"powercut {args.fs}: {loaded} of {len(report['cuts'])} cuts fell during a load "
          f"that was being acknowledged")
    print(f"powercut {args.fs}: {len(report['cuts'])} cuts, {last.get('acked', 0)} "
          f"acknowledged, {last.get('found', 0)} found whole at the last check, "
          f"{lost} lost or broken over all checks (seed {seed})")
    if args.lying_disk:
        return 0 if lost else 1
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
