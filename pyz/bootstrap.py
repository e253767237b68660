# cares.pyz bootstrap. pyz/build.py copies this file, byte for byte, into the
# archive as __main__.py. Standard library only.
#
# Why it exists: grpcio, protobuf (upb), psutil and wcwidth ship C extensions,
# and C extensions cannot be imported from inside a zip. So on first run the
# files this interpreter needs (shared files + this OS/arch + this cpXY) are
# unpacked into a per-user cache; every later run imports from there.
#
# What a build put into its archive (which groups each Python unpacks, file
# counts, glibc floors) is not written into this file: it is the JSON member
# BUILD_DATA, read by read_build_data(). So this file is the same real module
# in every build, and the tests import its functions directly.
#
# Keep this file parseable by old Pythons (no f-strings, no walrus, no
# keyword-only arguments): Python 2.7-3.8 must reach the version check at the
# bottom and print one clear line, not a SyntaxError. Importing it runs
# nothing.
import os
import sys

# Oldest Python that cares and this bootstrap run on. pyz/build.py builds for
# this version and newer only.
MIN_PYTHON = (3, 9)

VENDOR = "_cares_vendor/"        # archive folder holding the unpackable files
BUILD_DATA = VENDOR + "BUILD.json"
MARKER = ".cares-entry"          # written last into a finished entry; also the lock file
TMP_PREFIX = ".cares-tmp-"       # an entry being unpacked
TRASH_PREFIX = ".cares-trash-"   # a tree being deleted (see move_aside)
GRACE = 3600                     # seconds an unused old entry or leftover temp dir is kept
UNPACK_WAIT = 30                 # seconds a run waits for another run's unpack (one takes ~1 s)
_held_locks = []                 # open lock fds: keep our entry safe from other builds' pruning


class Fail(Exception):
    """Something to report on one line, without a traceback."""


class Skip(Exception):
    """This cache directory cannot be used; try the next one."""


def version_error(version_info, version):
    """The one-line complaint for a Python older than MIN_PYTHON, else None."""
    if tuple(version_info[:2]) < MIN_PYTHON:
        return "cares needs Python %d.%d or newer; this is %s" % (MIN_PYTHON[0], MIN_PYTHON[1], version)
    return None


def parse_build_data(raw):
    """What the bootstrap needs from the BUILD_DATA member (bytes); ValueError if malformed.

    build_id: 16 hex digits hashing everything unpacked plus this bootstrap, so
      runs never need to hash the archive. layout: target -> cpXY -> archive
      groups to unpack. groups: group -> [file count, bytes], to detect a
      damaged archive. min_glibc: target -> (2, N), the oldest glibc its wheels
      accept. top_level: the names we bundle, whose host copies must not win.
    The member holds more (pins, wheel hashes) for humans; that is not read here.
    """
    import json
    try:
        data = json.loads(raw.decode("utf-8"))
        build = {
            "build_id": data["build_id"],
            "layout": data["layout"],
            "groups": data["groups"],
            "min_glibc": dict((t, tuple(int(x) for x in v.split(".")))
                              for t, v in data["min_glibc"].items()),
            "top_level": list(data["top_level"]),
        }
        ok = (len(build["build_id"]) == 16 and all(c in "0123456789abcdef" for c in build["build_id"])
              and all(g in build["groups"] for pys in build["layout"].values() for gs in pys.values()
                      for g in gs))
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError("unreadable build data: %s" % e)
    if not ok:
        raise ValueError("inconsistent build data")
    return build


def read_build_data(archive, loader):
    """parse_build_data() of the archive's BUILD_DATA member, read through its zipimport loader."""
    try:
        raw = loader.get_data(os.path.join(archive, BUILD_DATA))
    except AttributeError:  # not run from a zip
        raise Fail("%s is not a cares.pyz: run the archive that build_zipapp.sh makes" % archive)
    except Exception as e:  # zipimport's own errors, zlib.error, OSError: all mean damage
        raise Fail("%s is damaged or truncated (%s); copy it again" % (archive, e))
    try:
        return parse_build_data(raw)
    except ValueError as e:
        raise Fail("%s is damaged or truncated (%s); copy it again" % (archive, e))


def host_target(platform, machine, maxsize):
    """The archive's name for a platform: ("linux", "x86_64", 2**63-1) -> "linux-x86_64".

    platform is sys.platform, machine os.uname().machine, maxsize sys.maxsize;
    pyz/build.py names its TARGETS the same way.
    """
    if platform.startswith("linux"):
        osname = "linux"
    elif platform == "darwin":
        osname = "macos"
    else:
        osname = platform
    machine = machine.lower()
    machine = {"amd64": "x86_64", "x64": "x86_64"}.get(machine, machine)
    if osname == "linux" and machine == "arm64":
        machine = "aarch64"
    if osname == "macos" and machine == "aarch64":
        machine = "arm64"
    target = "%s-%s" % (osname, machine)
    if maxsize < 2 ** 32:
        target += "-32bit"  # 64-bit kernel, 32-bit Python: the 64-bit wheels will not load
    return target


def host(layout, min_glibc):
    """(target, cpXY) of this interpreter, checked against what the archive holds."""
    impl = sys.implementation.name
    pyver = "%d.%d" % sys.version_info[:2]
    if impl != "cpython":
        raise Fail("needs CPython; this is %s %s" % (impl, pyver))
    if "t" in getattr(sys, "abiflags", ""):
        raise Fail("cannot run on free-threaded Python %st; use a regular python3" % pyver)
    try:
        machine = os.uname().machine
    except AttributeError:  # Windows
        import platform
        machine = platform.machine()
    target = host_target(sys.platform, machine, sys.maxsize)
    if target not in layout:
        raise Fail("this cares.pyz has no build for %s (it has: %s)" % (target, ", ".join(sorted(layout))))
    pytag = "cp%d%d" % sys.version_info[:2]
    if pytag not in layout[target]:
        have = sorted(layout[target], key=lambda t: int(t[3:]))
        raise Fail("this cares.pyz has no build for Python %s on %s (it has: %s)"
                   % (pyver, target, ", ".join(t[2] + "." + t[3:] for t in have)))
    need = min_glibc.get(target)
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


def candidates(environ, home, uid):
    """Cache roots in order of preference: (path, label, is_shared_tmp).

    environ is os.environ, home os.path.expanduser("~"), uid os.getuid().
    """
    out = []
    env = environ.get("CARES_CACHE_DIR")
    if env:
        out.append((os.path.abspath(env), "$CARES_CACHE_DIR=", False))
    xdg = environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore relative paths
        out.append((os.path.join(xdg, "cares"), "", False))
    elif os.path.isabs(home):
        out.append((os.path.join(home, ".cache", "cares"), "", False))
    for base in (environ.get("TMPDIR"), "/tmp", "/var/tmp"):
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


def move_aside(path):
    """Delete a cache tree so that nobody ever finds it half deleted.

    The tree is first renamed (atomically) to a TRASH_PREFIX sibling, then
    removed; prune() sweeps trash a killed run left behind. False when the
    rename fails: the tree is gone already, or is not ours to move.
    """
    root, name = os.path.split(path)
    trash = os.path.join(root, "%s%s-%d-%s" % (TRASH_PREFIX, name, os.getpid(), _rand()))
    try:
        os.rename(path, trash)
    except OSError:
        return False
    _rmtree(trash)
    return True


def unpack(archive, root, key, groups, expected):
    """Extract the groups into root/key atomically; returns the entry path.

    expected: group -> [file count, bytes] (the build data's "groups").
    """
    import zipfile
    import zlib
    entry = os.path.join(root, key)
    tmp = os.path.join(root, "%s%s-%d-%s" % (TMP_PREFIX, key, os.getpid(), _rand()))
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
                if counts[g] != expected[g]:
                    raise Fail(damaged % ("%s has %d files, expected %d" % (g, counts[g][0], expected[g][0])))
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
                move_aside(entry)
                continue
            if lock_entry(entry):
                return entry
        raise Skip("could not put %s in place" % key)
    except BaseException:
        _rmtree(tmp)
        raise


def wait_to_unpack(root):
    """An exclusive lock on the cache folder (an open fd; None where there is none to have), so
    that runs started at once unpack once: the others wait, then use that entry. Bounded: a run
    stopped mid-unpack must not stop the rest, who then unpack as well (rename() keeps that safe)."""
    try:
        import fcntl
        import time
        fd = os.open(root, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    deadline = time.monotonic() + UNPACK_WAIT  # a clock stepping back must not extend the wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            import errno
            if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                os.close(fd)
                return None
        time.sleep(0.05)


def is_entry_name(name):
    # <16 hex build id>-<os>-<arch>-cpXY
    parts = name.split("-")
    return (len(parts) >= 4 and len(parts[0]) == 16
            and all(c in "0123456789abcdef" for c in parts[0])
            and parts[-1][:2] == "cp" and parts[-1][2:].isdigit())


def prune(root, build_id):
    """Best effort: drop other builds' entries that nobody used for GRACE seconds."""
    try:
        import time
        now = time.time()
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name.startswith(TRASH_PREFIX):
                _rmtree(path)
            elif name.startswith(TMP_PREFIX):
                # left by a killed run (a live unpack takes about a second)
                if now - os.lstat(path).st_mtime > GRACE:
                    _rmtree(path)
            elif is_entry_name(name) and not name.startswith(build_id + "-"):
                if now - os.lstat(path).st_mtime > GRACE:
                    _drop_unused(os.path.join(root, name))
    except Exception:
        pass


def _drop_unused(path):
    import fcntl
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
        move_aside(path)
    finally:
        if fd is not None:
            os.close(fd)


def intact(entry, groups, expected):
    """Does the entry still hold every file, at full size? (Only asked after a failed import.)"""
    want = [sum(expected[g][0] for g in groups), sum(expected[g][1] for g in groups)]
    have = [0, 0]
    for folder, dirs, files in os.walk(entry):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if not (folder == entry and f == MARKER):
                have[0] += 1
                have[1] += os.path.getsize(os.path.join(folder, f))
    return have == want


def prepare(build, archive):
    """Find or make the cache entry for this interpreter: (path, just_unpacked, groups)."""
    target, pytag = host(build["layout"], build["min_glibc"])
    key = "%s-%s-%s" % (build["build_id"], target, pytag)
    groups = build["layout"][target][pytag]
    tried = []
    uid = os.getuid() if hasattr(os, "getuid") else 0
    for root, label, shared_tmp in candidates(os.environ, os.path.expanduser("~"), uid):
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
                turn = wait_to_unpack(root)
                try:
                    fresh = not lock_entry(entry)  # another run may have unpacked it meanwhile
                    if fresh:
                        entry = unpack(archive, root, key, groups, build["groups"])
                finally:
                    if turn is not None:
                        os.close(turn)
        except Skip as e:
            tried.append("%s%s: %s" % (label, root, e))
            continue
        prune(root, build["build_id"])
        return entry, fresh, groups
    raise Fail("no usable cache directory (tried %s); set CARES_CACHE_DIR to a writable "
               "directory on a filesystem that allows exec" % "; ".join(tried))


def activate(entry, archive, top_level):
    # The unpacked tree goes first and the host's site-packages go away, so
    # cares runs with exactly the bundled versions whatever the host has.
    keep = [p for p in sys.path
            if p and os.path.abspath(p) != archive and p != entry
            and os.path.basename(p.rstrip("/")) not in ("site-packages", "dist-packages")]
    sys.path[:] = [entry] + keep
    # .pth files (e.g. old namespace-package hacks for "google") may have
    # imported a host copy of a name we bundle already: forget it.
    for name in list(sys.modules):
        if name.partition(".")[0] in top_level:
            del sys.modules[name]
    # Let Python cache bytecode in the entry even under PYTHONDONTWRITEBYTECODE
    # or -B: without it every start recompiles grpc and protobuf (~2x slower).
    # With site-packages gone, the entry is the only writable place on sys.path.
    sys.dont_write_bytecode = False


def main():
    entry = "?"
    try:
        archive = archive_path()
        build = read_build_data(archive, globals().get("__loader__"))
        entry, fresh, groups = prepare(build, archive)
        activate(entry, archive, build["top_level"])
        try:
            import cares
        except Exception:
            if fresh or intact(entry, groups, build["groups"]):
                raise
            # Files vanished from a cached entry (a /tmp cleaner, a crash
            # while writing): throw it away and unpack afresh, once.
            move_aside(entry)
            entry, fresh, groups = prepare(build, archive)
            activate(entry, archive, build["top_level"])
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


if __name__ == "__main__":
    _too_old = version_error(sys.version_info, sys.version.split()[0])
    if _too_old:
        sys.stderr.write(_too_old + "\n")
        sys.exit(1)
    sys.exit(main())
