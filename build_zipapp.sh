#!/bin/sh
# build_zipapp.sh - build cares.pyz, one file that runs with `python3 cares.pyz`
# on any host with CPython 3.10-3.14 (no pip, no venv needed there).
#
# The archive holds cares.py + its gRPC stubs, a stdlib-only bootstrap
# (__main__.py) and the contents of the pinned wheels for every Python and
# target asked for. C extensions cannot be imported from a zip, so the
# bootstrap unpacks only what the running interpreter needs into a per-user
# cache on first run (see the bootstrap below for the details).
#
# Plain POSIX sh: it only finds a Python and hands it the real work (the
# heredoc at the end), because the downloading, merging and zip writing are
# much easier to get right and deterministic in Python.
# Run `sh build_zipapp.sh --help` for the options.
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
PYTHON=${PYTHON:-python3}
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "build_zipapp.sh: '$PYTHON' not found; set PYTHON=/path/to/python3 (3.8 or newer, with pip)" >&2
    exit 1
fi

# The Python part comes in on stdin (Python reads all of it before running
# it). -I: neither the current directory nor PYTHONPATH may shadow a stdlib
# module used here.
exec "$PYTHON" -I - "$here" "$@" <<'END_OF_PYTHON'
import sys

if sys.version_info < (3, 8):
    sys.exit("build_zipapp.sh: needs Python 3.8 or newer to build (this is %s); set PYTHON=" % sys.version.split()[0])

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import zipfile

HERE = sys.argv[1]
PROG = "build_zipapp.sh"

# What cares needs at run time; requirements.txt must pin each with ==.
# Everything is fetched with --no-deps: this list *is* the dependency closure.
RUNTIME_PACKAGES = ["asciimatics", "grpcio", "protobuf", "psutil", "typing_extensions", "wcwidth"]
# asciimatics declares Pillow and pyfiglet too, but only its renderers and
# sprites import them and cares does not use those.
APP_FILES = ["cares.py", "cluster_pb2.py", "cluster_pb2_grpc.py"]
PYTHONS = ["3.10", "3.11", "3.12", "3.13", "3.14"]  # grpcio 1.85 has no cp39

# Oldest glibc we accept wheels for: manylinux2014 (CentOS 7 era).
GLIBC_FLOOR = 17


def manylinux(arch):
    # pip only takes the exact tags it is given (plus the legacy aliases of
    # manylinux2014/2010), so spell out every glibc up to the floor.
    tags = ["manylinux_2_%d_%s" % (m, arch) for m in range(GLIBC_FLOOR, 4, -1)]
    return tags + ["manylinux2014_" + arch]


# target name -> pip --platform tags. The bootstrap computes the same names
# from sys.platform and os.uname().machine.
TARGETS = {
    "linux-x86_64": manylinux("x86_64"),
    "linux-aarch64": manylinux("aarch64"),
    # pip widens a macosx_11_0 tag to every older macOS and to universal2.
    "macos-x86_64": ["macosx_11_0_x86_64"],
    "macos-arm64": ["macosx_11_0_arm64"],
}
DEFAULT_TARGET = "linux-x86_64"

VENDOR = "_cares_vendor/"        # archive folder holding the unpackable files
SHEBANG = b"#!/usr/bin/env python3\n"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # earliest date zip can store: fixed for determinism


def die(msg):
    sys.stderr.write("%s: %s\n" % (PROG, msg))
    sys.exit(1)


def say(msg):
    sys.stderr.write(msg + "\n")


def norm(name):
    return re.sub(r"[-_.]+", "_", name).lower()


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_args():
    p = argparse.ArgumentParser(
        prog="sh " + PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build cares.pyz: cares + pinned wheels for CPython %s-%s in one "
        "file, run as `python3 cares.pyz ARGS`." % (PYTHONS[0], PYTHONS[-1]),
        epilog="""targets: %s (default: %s)

Pins come from the == lines of SRC/requirements.txt for %s.
Wheels are fetched from the package index with pip (only when not cached)
and kept in the cache dir, by default SRC/.build/pyz (git-ignore .build/).
The output is byte-for-byte reproducible from the same sources and wheels.

environment: PYTHON  interpreter that runs the build (default python3, needs pip)"""
        % (", ".join(sorted(TARGETS)), DEFAULT_TARGET, ", ".join(RUNTIME_PACKAGES)),
    )
    p.add_argument("-o", "--output", metavar="PATH",
                   help="where to write the zipapp (default: SRC/cares.pyz)")
    p.add_argument("--target", action="append", metavar="TARGET", default=[],
                   help="platform to include; repeat for several (default: %s)" % DEFAULT_TARGET)
    p.add_argument("--python", action="append", metavar="X.Y", default=[],
                   help="CPython version to include; repeat for several (default: all of %s)"
                   % " ".join(PYTHONS))
    p.add_argument("--src", metavar="DIR", default=HERE,
                   help="folder holding cares.py, the stubs and requirements.txt "
                   "(default: this script's folder)")
    p.add_argument("--requirements", metavar="FILE",
                   help="pins file (default: SRC/requirements.txt)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where downloaded wheels are kept (default: SRC/.build/pyz)")
    p.add_argument("--offline", action="store_true",
                   help="never run pip; fail if a wheel is not in the cache dir yet")
    # 9 is 2.5x slower to build for 0.3% less size.
    p.add_argument("--compresslevel", type=int, default=6, choices=range(0, 10), metavar="0-9",
                   help="deflate level (default 6)")
    a = p.parse_args(sys.argv[2:])

    a.target = sorted(set(a.target or [DEFAULT_TARGET]))
    for t in a.target:
        if t not in TARGETS:
            p.error("unknown target %r; choose from: %s" % (t, ", ".join(sorted(TARGETS))))
    a.python = sorted(set(a.python or PYTHONS), key=lambda v: tuple(map(int, v.split("."))))
    for v in a.python:
        if v not in PYTHONS:
            p.error("unsupported Python %r; choose from: %s" % (v, " ".join(PYTHONS)))
    a.src = os.path.abspath(a.src)
    a.output = os.path.abspath(a.output or os.path.join(a.src, "cares.pyz"))
    a.cache_dir = os.path.abspath(a.cache_dir or os.path.join(a.src, ".build", "pyz"))
    if a.requirements is None:
        a.requirements = os.path.join(a.src, "requirements.txt")
    return a


def read_pins(path):
    """Exact pins (name==version) of the runtime packages, from the requirements file."""
    found = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.split("#", 1)[0].split(";", 1)[0].strip()
                m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*===?\s*([A-Za-z0-9.+!_-]+)", line)
                if m and norm(m.group(1)) in RUNTIME_PACKAGES:
                    found[norm(m.group(1))] = m.group(2)
    except OSError as e:
        die("cannot read %s: %s" % (path, e.strerror or e))
    missing = [name for name in RUNTIME_PACKAGES if name not in found]
    if missing:
        die("%s must pin with == each of: %s" % (path, ", ".join(missing)))
    return found


WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<ver>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$")


def min_glibc(wheel_name):
    """Lowest glibc (2, N) any manylinux tag of this wheel asks for, None if not manylinux."""
    plat = WHEEL_RE.match(wheel_name).group("plat")
    legacy = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}
    found = []
    for tag in plat.split("."):
        m = re.match(r"manylinux_(\d+)_(\d+)_", tag)
        if m:
            found.append((int(m.group(1)), int(m.group(2))))
        for prefix, minor in legacy.items():
            if tag.startswith(prefix + "_"):
                found.append((2, minor))
    return min(found) if found else None


def ensure_wheels(args, target, py, pins):
    """Wheel paths for one target/Python, downloading them once into the cache."""
    tag = "cp" + py.replace(".", "")
    want = ["%s==%s" % kv for kv in sorted(pins.items())]
    # One folder per pin set, so switching branches does not refetch everything.
    folder = os.path.join(args.cache_dir, "wheels", target, tag, sha256(" ".join(want).encode())[:12])
    record = os.path.join(folder, "resolved.json")
    try:
        with open(record) as f:
            rec = json.load(f)
        if rec["pins"] == want and all(
                file_sha256(os.path.join(folder, w)) == h for w, h in rec["wheels"].items()):
            return [os.path.join(folder, w) for w in sorted(rec["wheels"])]
        say("cached wheels for %s %s are damaged; fetching again" % (target, tag))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if args.offline:
        die("--offline, but the wheels for %s %s (%s) are missing or damaged in %s"
            % (target, tag, " ".join(want), folder))

    say("fetching wheels for %s %s ..." % (target, tag))
    tmp = "%s.tmp-%d" % (folder, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        return fetch_into(tmp, folder, target, py, tag, pins, want)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_into(tmp, folder, target, py, tag, pins, want):
    """pip download into tmp, check that exactly the pins came, then move tmp to folder."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-input", "--disable-pip-version-check",
           "--only-binary=:all:", "--no-deps", "--implementation", "cp", "--python-version", py,
           "--abi", tag, "--abi", "abi3", "--abi", "none", "-d", tmp]
    for plat in TARGETS[target]:
        cmd += ["--platform", plat]
    res = subprocess.run(cmd + want, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, universal_newlines=True)
    if res.returncode != 0:
        say(res.stdout.rstrip())
        die("pip could not fetch the wheels for %s %s (output above)" % (target, tag))

    wheels = {}
    for fn in sorted(os.listdir(tmp)):
        m = WHEEL_RE.match(fn)
        if not m:
            die("pip left an unexpected file %s in %s" % (fn, tmp))
        name = norm(m.group("name"))
        if pins.get(name) != m.group("ver") or name in wheels:
            die("pip fetched %s, which is not one of the pins %s" % (fn, " ".join(want)))
        wheels[name] = fn
    if sorted(wheels) != sorted(pins):
        die("pip did not fetch wheels for %s (%s %s)" % (", ".join(sorted(set(pins) - set(wheels))), target, tag))
    with open(os.path.join(tmp, "resolved.json"), "w") as f:
        json.dump({"pins": want, "wheels": {fn: file_sha256(os.path.join(tmp, fn)) for fn in wheels.values()}},
                  f, indent=1, sort_keys=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return [os.path.join(folder, fn) for fn in sorted(wheels.values())]


def wheel_tree(path, tree):
    """Add the importable files of one wheel to tree (relative path -> bytes)."""
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename
            if name.endswith("/"):
                continue
            parts = name.split("/")
            if parts[0].endswith(".data"):
                # purelib/platlib install into site-packages; scripts, headers
                # and data files are never imported, so they stay out.
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
                name = "/".join(parts)
            if name.startswith("/") or "\\" in name or ".." in parts or "" in parts:
                die("%s holds a suspicious path %r" % (os.path.basename(path), name))
            data = zf.read(info)
            if name in tree and tree[name] != data:
                die("%s and another wheel both ship %s" % (os.path.basename(path), name))
            tree[name] = data


def group_name(combos, all_combos, targets):
    """A readable archive folder name for the set of target/Python pairs sharing a file."""
    if combos == all_combos:
        return "common"
    by_target = {}
    for t, py in sorted(combos):
        by_target.setdefault(t, []).append(py)
    ts = sorted(by_target)
    if all(by_target[t] == targets[t] for t in ts):
        return "+".join(ts)
    pys = {tuple(by_target[t]) for t in ts}
    if len(pys) == 1:
        return "+".join(ts) + "-" + "+".join(pys.pop())
    return "mix-" + sha256(repr(sorted(combos)).encode())[:12]


BOOTSTRAP = r'''# cares.pyz bootstrap, written by build_zipapp.sh. Standard library only.
#
# Why it exists: grpcio, protobuf (upb), psutil and wcwidth ship C extensions,
# and C extensions cannot be imported from inside a zip. So on first run the
# files this interpreter needs (shared files + this OS/arch + this cpXY) are
# unpacked into a per-user cache; every later run imports from there.
#
# Keep this file parseable by old Pythons (no f-strings, no walrus): they must
# reach the version check below and print one clear line, not a SyntaxError.
import os
import sys

# Filled in at build time. BUILD_ID hashes everything unpacked plus this
# bootstrap, so runs never need to hash the archive. LAYOUT: target -> cpXY ->
# archive groups to unpack. GROUPS: group -> [file count, bytes], to detect a
# damaged archive. MIN_GLIBC: target -> oldest glibc its wheels accept.
# TOP_LEVEL: the names we bundle, whose host copies must not win.
BUILD_ID = "@BUILD_ID@"
LAYOUT = @LAYOUT@
GROUPS = @GROUPS@
MIN_GLIBC = @MIN_GLIBC@
TOP_LEVEL = @TOP_LEVEL@

VENDOR = "_cares_vendor/"
MARKER = ".cares-entry"          # written last into a finished entry; also the lock file
GRACE = 3600                     # seconds an unused old entry or leftover temp dir is kept
_held_locks = []                 # open lock fds: keep our entry safe from other builds' pruning


class Fail(Exception):
    """Something to report on one line, without a traceback."""


class Skip(Exception):
    """This cache directory cannot be used; try the next one."""


def _version_check():
    if sys.version_info < (3, 10):
        sys.stderr.write("cares needs Python 3.10 or newer; this is %s\n" % sys.version.split()[0])
        sys.exit(1)


def host():
    """(target, cpXY) of this interpreter, checked against what the archive holds."""
    impl = sys.implementation.name
    pyver = "%d.%d" % sys.version_info[:2]
    if impl != "cpython":
        raise Fail("needs CPython; this is %s %s" % (impl, pyver))
    if "t" in getattr(sys, "abiflags", ""):
        raise Fail("cannot run on free-threaded Python %st; use a regular python3" % pyver)
    if sys.platform.startswith("linux"):
        osname = "linux"
    elif sys.platform == "darwin":
        osname = "macos"
    else:
        osname = sys.platform
    try:
        machine = os.uname().machine.lower()
    except AttributeError:  # Windows
        import platform
        machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "x64": "x86_64"}.get(machine, machine)
    if osname == "linux" and machine == "arm64":
        machine = "aarch64"
    if osname == "macos" and machine == "aarch64":
        machine = "arm64"
    target = "%s-%s" % (osname, machine)
    if sys.maxsize < 2 ** 32:
        target += "-32bit"  # 64-bit kernel, 32-bit Python: the 64-bit wheels will not load
    if target not in LAYOUT:
        raise Fail("this cares.pyz has no build for %s (it has: %s)" % (target, ", ".join(sorted(LAYOUT))))
    pytag = "cp%d%d" % sys.version_info[:2]
    if pytag not in LAYOUT[target]:
        have = sorted(LAYOUT[target], key=lambda t: int(t[3:]))
        raise Fail("this cares.pyz has no build for Python %s on %s (it has: %s)"
                   % (pyver, target, ", ".join(t[2] + "." + t[3:] for t in have)))
    need = MIN_GLIBC.get(target)
    if need:
        try:
            libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        except (AttributeError, ValueError, OSError):
            libc = ""
        if not libc.startswith("glibc "):
            raise Fail("needs Linux with glibc %d.%d or newer; this system's C library "
                       "is not glibc (musl?)" % tuple(need))
        try:
            have_glibc = tuple(int(x) for x in libc.split()[1].split(".")[:2])
        except (ValueError, IndexError):
            have_glibc = tuple(need)  # unparsable: let the loader decide
        if have_glibc < tuple(need):
            raise Fail("needs glibc %d.%d or newer; this system has %s"
                       % (need[0], need[1], libc.split()[1]))
    return target, pytag


def archive_path():
    loader = globals().get("__loader__")
    return os.path.abspath(getattr(loader, "archive", None) or os.path.dirname(__file__))


def candidates():
    """Cache roots in order of preference: (path, label, is_shared_tmp)."""
    out = []
    env = os.environ.get("CARES_CACHE_DIR")
    if env:
        out.append((os.path.abspath(env), "$CARES_CACHE_DIR=", False))
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative paths
        out.append((os.path.join(xdg, "cares"), "", False))
    else:
        home = os.path.expanduser("~")
        if os.path.isabs(home):
            out.append((os.path.join(home, ".cache", "cares"), "", False))
    uid = os.getuid() if hasattr(os, "getuid") else 0
    for base in (os.environ.get("TMPDIR"), "/tmp", "/var/tmp"):
        if base and os.path.isabs(base):
            path = os.path.join(base, "cares-%d" % uid)
            if path not in [c[0] for c in out]:
                out.append((path, "", True))
    return out


def _private_tmp_dir(root):
    # Others can create names in /tmp: only trust a dir that we own and that
    # nobody else can write to, or they could plant code for us to import.
    import stat
    try:
        os.mkdir(root, 0o700)
    except OSError as e:
        if not os.path.isdir(root):
            raise Skip("cannot create it: %s" % e.strerror)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise Skip("not a directory")
    if st.st_uid != os.getuid():
        raise Skip("owned by uid %d, not by us (uid %d)" % (st.st_uid, os.getuid()))
    if st.st_mode & 0o022:
        raise Skip("group or world writable")


def _noexec(path):
    # Shared libraries cannot be mapped from a noexec mount; statvfs tells
    # without writing or executing anything. (ST_NOEXEC exists on Linux only.)
    flag = getattr(os, "ST_NOEXEC", 0)
    try:
        return bool(flag and os.statvfs(path).f_flag & flag)
    except OSError:
        return False


def lock_entry(entry):
    """Take a shared lock on a finished entry; False if it is not (or no longer) there."""
    marker = os.path.join(entry, MARKER)
    try:
        fd = os.open(marker, os.O_RDONLY)
    except OSError:
        return False
    try:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_SH)
    except (ImportError, OSError):
        pass  # no locking here: usable, just not protected against pruning
    try:
        # A pruner renames an entry away while holding LOCK_EX: make sure the
        # file we locked is still the one at this path.
        same = os.fstat(fd).st_ino == os.stat(marker).st_ino
    except OSError:
        same = False
    if not same:
        os.close(fd)
        return False
    _held_locks.append(fd)
    try:
        os.utime(entry, None)  # last use, so that pruning spares entries in use
    except OSError:
        pass
    return True


def _rand():
    return "".join("%02x" % b for b in bytearray(os.urandom(4)))


def _rmtree(path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def unpack(archive, root, key, groups):
    """Extract the groups into root/key atomically; returns the entry path."""
    import zipfile
    import zlib
    entry = os.path.join(root, key)
    tmp = os.path.join(root, ".cares-tmp-%s-%d-%s" % (key, os.getpid(), _rand()))
    try:
        os.mkdir(tmp, 0o700)
    except OSError as e:
        raise Skip("not writable: %s" % e.strerror)
    damaged = "%s is damaged or truncated (%%s); copy it again" % archive
    try:
        try:
            zf = zipfile.ZipFile(archive)
        except (OSError, zipfile.BadZipFile) as e:
            raise Fail(damaged % e)
        with zf:
            counts = dict((g, [0, 0]) for g in groups)
            made = set()
            for info in zf.infolist():
                group, _, rel = info.filename[len(VENDOR):].partition("/")
                if not info.filename.startswith(VENDOR) or group not in counts or not rel:
                    continue
                parts = rel.split("/")
                if rel.endswith("/") or ".." in parts or rel.startswith("/"):
                    raise Fail(damaged % ("bad member name " + info.filename))
                try:
                    data = zf.read(info)  # checks the CRC
                except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
                    raise Fail(damaged % e)
                dest = os.path.join(tmp, *parts)
                try:
                    d = os.path.dirname(dest)
                    if d not in made:
                        os.makedirs(d, exist_ok=True)
                        made.add(d)
                    with open(dest, "wb") as f:
                        f.write(data)
                except OSError as e:
                    raise Skip("cannot write there: %s" % e.strerror)
                counts[group][0] += 1
                counts[group][1] += len(data)
            for g in groups:
                if counts[g] != GROUPS[g]:
                    raise Fail(damaged % ("%s has %d files, expected %d" % (g, counts[g][0], GROUPS[g][0])))
        try:
            with open(os.path.join(tmp, MARKER), "w") as f:
                f.write("cares.pyz %s %s\n" % (key, archive))
        except OSError as e:
            raise Skip("cannot write there: %s" % e.strerror)
        # rename() makes the entry appear complete or not at all. If another
        # run got there first, use its entry; if a damaged one is in the way,
        # move it aside and try again.
        for _ in range(3):
            try:
                os.rename(tmp, entry)
            except OSError:
                if lock_entry(entry):
                    _rmtree(tmp)
                    return entry
                trash = os.path.join(root, ".cares-trash-%s-%d-%s" % (key, os.getpid(), _rand()))
                try:
                    os.rename(entry, trash)
                    _rmtree(trash)
                except OSError:
                    pass
                continue
            if lock_entry(entry):
                return entry
        raise Skip("could not put %s in place" % key)
    except BaseException:
        _rmtree(tmp)
        raise


def is_entry_name(name):
    # <16 hex build id>-<os>-<arch>-cpXY
    parts = name.split("-")
    return (len(parts) >= 4 and len(parts[0]) == 16
            and all(c in "0123456789abcdef" for c in parts[0])
            and parts[-1][:2] == "cp" and parts[-1][2:].isdigit())


def prune(root, key):
    """Best effort: drop other builds' entries that nobody used for GRACE seconds."""
    try:
        import time
        now = time.time()
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name.startswith(".cares-trash-"):
                _rmtree(path)
            elif name.startswith(".cares-tmp-"):
                # left by a killed run (a live unpack takes about a second)
                if now - os.lstat(path).st_mtime > GRACE:
                    _rmtree(path)
            elif is_entry_name(name) and not name.startswith(BUILD_ID + "-"):
                if now - os.lstat(path).st_mtime > GRACE:
                    _drop_unused(root, name)
    except Exception:
        pass


def _drop_unused(root, name):
    import fcntl
    path = os.path.join(root, name)
    try:
        fd = os.open(os.path.join(path, MARKER), os.O_RDWR)
    except OSError as e:
        import errno
        if e.errno != errno.ENOENT:
            return  # e.g. another user's entry in a shared cache dir: not ours to judge
        fd = None  # no marker: damaged, nobody can be using it
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # a running cares holds it
        trash = os.path.join(root, ".cares-trash-%s-%d-%s" % (name, os.getpid(), _rand()))
        os.rename(path, trash)
    finally:
        if fd is not None:
            os.close(fd)
    _rmtree(trash)


def intact(entry, groups):
    """Does the entry still hold every file, at full size? (Only asked after a failed import.)"""
    want = [sum(GROUPS[g][0] for g in groups), sum(GROUPS[g][1] for g in groups)]
    have = [0, 0]
    for folder, dirs, files in os.walk(entry):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if not (folder == entry and f == MARKER):
                have[0] += 1
                have[1] += os.path.getsize(os.path.join(folder, f))
    return have == want


def discard(entry):
    root, name = os.path.split(entry)
    trash = os.path.join(root, ".cares-trash-%s-%d-%s" % (name, os.getpid(), _rand()))
    try:
        os.rename(entry, trash)
    except OSError:
        return
    _rmtree(trash)


def prepare():
    """Find or make the cache entry for this interpreter: (path, just_unpacked, groups)."""
    target, pytag = host()
    key = "%s-%s-%s" % (BUILD_ID, target, pytag)
    groups = LAYOUT[target][pytag]
    tried = []
    for root, label, shared_tmp in candidates():
        try:
            if shared_tmp:
                _private_tmp_dir(root)
            elif not os.path.isdir(root):
                try:
                    os.makedirs(root, 0o700)
                except OSError as e:
                    if not os.path.isdir(root):
                        raise Skip("cannot create it: %s" % e.strerror)
            if _noexec(root):
                raise Skip("mounted noexec")
            entry = os.path.join(root, key)
            fresh = not lock_entry(entry)
            if fresh:
                if not os.access(root, os.W_OK | os.X_OK):
                    raise Skip("not writable")
                entry = unpack(archive_path(), root, key, groups)
        except Skip as e:
            tried.append("%s%s: %s" % (label, root, e))
            continue
        prune(root, key)
        return entry, fresh, groups
    raise Fail("no usable cache directory (tried %s); set CARES_CACHE_DIR to a writable "
               "directory on a filesystem that allows exec" % "; ".join(tried))


def activate(entry):
    # The unpacked tree goes first and the host's site-packages go away, so
    # cares runs with exactly the bundled versions whatever the host has.
    archive = archive_path()
    keep = [p for p in sys.path
            if p and os.path.abspath(p) != archive and p != entry
            and os.path.basename(p.rstrip("/")) not in ("site-packages", "dist-packages")]
    sys.path[:] = [entry] + keep
    # .pth files (e.g. old namespace-package hacks for "google") may have
    # imported a host copy of a name we bundle already: forget it.
    for name in list(sys.modules):
        if name.partition(".")[0] in TOP_LEVEL:
            del sys.modules[name]
    # Let Python cache bytecode in the entry even under PYTHONDONTWRITEBYTECODE
    # or -B: without it every start recompiles grpc and protobuf (~2x slower).
    # With site-packages gone, the entry is the only writable place on sys.path.
    sys.dont_write_bytecode = False


def main():
    entry = "?"
    try:
        entry, fresh, groups = prepare()
        activate(entry)
        try:
            import cares
        except Exception:
            if fresh or intact(entry, groups):
                raise
            # Files vanished from a cached entry (a /tmp cleaner, a crash
            # while writing): throw it away and unpack afresh, once.
            discard(entry)
            entry, fresh, groups = prepare()
            activate(entry)
            import importlib
            importlib.invalidate_caches()
            import cares
    except Fail as e:
        sys.stderr.write("cares: %s\n" % e)
        return 1
    except KeyboardInterrupt:
        return 130
    except ImportError as e:
        if os.environ.get("CARES_PYZ_DEBUG"):
            raise
        sys.stderr.write("cares: cannot load the bundled modules from %s: %s "
                         "(CARES_PYZ_DEBUG=1 shows the traceback)\n" % (entry, e))
        return 1
    return cares.main()


_version_check()
if __name__ == "__main__":
    sys.exit(main())
'''


def build(args):
    for f in APP_FILES:
        if not os.path.isfile(os.path.join(args.src, f)):
            die("%s not found in %s (the stubs come from cluster.proto via grpcio-tools)" % (f, args.src))
    pins = read_pins(args.requirements)
    say("pins: " + " ".join("%s==%s" % kv for kv in sorted(pins.items())))

    app = {}
    for f in APP_FILES:
        with open(os.path.join(args.src, f), "rb") as fh:
            app[f] = fh.read()

    # One complete site-packages-like tree per (target, cpXY).
    trees, wheel_info, glibc = {}, {}, {}
    for t in args.target:
        for py in args.python:
            combo = (t, "cp" + py.replace(".", ""))
            tree = dict(app)
            wheels = ensure_wheels(args, t, py, pins)
            for w in wheels:
                wheel_tree(w, tree)
                g = min_glibc(os.path.basename(w))
                if g and g > glibc.get(t, (0, 0)):
                    glibc[t] = g
            trees[combo] = tree
            wheel_info.setdefault(t, {})[combo[1]] = [
                {"file": os.path.basename(w), "sha256": file_sha256(w)} for w in wheels]

    # Store each distinct file once, in a folder named after the set of
    # (target, cpXY) that use exactly those bytes: "common" (pure Python, the
    # app), "linux-x86_64" (abi3 extensions), "linux-x86_64-cp312" (cygrpc) ...
    users = {}
    blobs = {}
    for combo, tree in trees.items():
        for rel, data in tree.items():
            h = sha256(data)
            blobs[h] = data
            users.setdefault((rel, h), set()).add(combo)
    all_combos = frozenset(trees)
    pys_of = {t: sorted(c[1] for c in trees if c[0] == t) for t in args.target}
    members, groups, layout = {}, {}, {}
    for (rel, h), combos in users.items():
        g = group_name(frozenset(combos), all_combos, pys_of)
        if VENDOR + g + "/" + rel in members:
            die("internal error: two versions of %s in group %s" % (rel, g))
        members[VENDOR + g + "/" + rel] = h
        count = groups.setdefault(g, [0, 0])
        count[0] += 1
        count[1] += len(blobs[h])
        for t, py in combos:
            layout.setdefault(t, {}).setdefault(py, set()).add(g)
    layout = {t: {py: sorted(gs) for py, gs in sorted(p.items())} for t, p in sorted(layout.items())}
    top_level = sorted({rel.split("/")[0].split(".")[0] for tree in trees.values() for rel in tree
                        if not rel.split("/")[0].endswith((".dist-info", ".data"))})

    # The build id covers every byte that ends up unpacked plus the bootstrap
    # logic, so a changed app, pin or bootstrap gets a fresh cache entry.
    ident = json.dumps({"bootstrap": BOOTSTRAP, "layout": layout, "glibc": glibc,
                        "members": sorted(members.items())}, sort_keys=True)
    build_id = sha256(ident.encode())[:16]
    main_py = (BOOTSTRAP.replace("@BUILD_ID@", build_id)
               .replace("@LAYOUT@", json.dumps(layout, sort_keys=True))
               .replace("@GROUPS@", json.dumps(groups, sort_keys=True))
               .replace("@MIN_GLIBC@", json.dumps({t: list(v) for t, v in glibc.items()}, sort_keys=True))
               .replace("@TOP_LEVEL@", json.dumps(top_level)))
    compile(main_py, "__main__.py", "exec")  # fail the build, not the user's first run

    # For humans (`unzip -p cares.pyz _cares_vendor/BUILD.json`); the bootstrap never reads it.
    info = {"build_id": build_id, "pins": pins, "targets": sorted(args.target),
            "pythons": args.python, "min_glibc": {t: "%d.%d" % v for t, v in glibc.items()},
            "app": {f: sha256(app[f]) for f in APP_FILES}, "wheels": wheel_info}
    entries = [("__main__.py", main_py.encode()),
               (VENDOR + "BUILD.json", (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())]
    entries += [(name, blobs[h]) for name, h in sorted(members.items())]

    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    tmp = "%s.tmp-%d" % (args.output, os.getpid())
    try:
        with open(tmp, "wb") as f:
            f.write(SHEBANG)
            with zipfile.ZipFile(f, "w") as zf:
                for name, data in entries:
                    zi = zipfile.ZipInfo(name, ZIP_DATE)  # fixed time, mode, OS: same bytes every build
                    zi.create_system = 3
                    zi.external_attr = 0o100644 << 16
                    zi.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(zi, data, compresslevel=args.compresslevel)
        os.chmod(tmp, 0o755)
        os.replace(tmp, args.output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

    size = os.path.getsize(args.output)
    say("wrote %s: %.1f MB, %d files, build %s, sha256 %s" % (
        args.output, size / 1e6, len(entries), build_id, file_sha256(args.output)))
    say("targets: %s; Python %s" % (", ".join(sorted(args.target)), " ".join(args.python)))


# Turn kill/hangup into SystemExit so that the finally clauses remove temp files.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
build(parse_args())
END_OF_PYTHON
