"""Build cares.pyz, one file that runs with `python3 cares.pyz` on any host
with a supported CPython (no pip, no venv needed there).

Run it through `sh build_zipapp.sh` (`--help` lists the options); it needs
Python 3.8+ with pip, and PyPI for wheels not cached yet.

The archive holds cares.py + its gRPC stubs, the bootstrap (bootstrap.py,
copied as __main__.py), its build data (bootstrap.BUILD_DATA, JSON) and the
contents of the pinned wheels for every Python and target asked for. C
extensions cannot be imported from a zip, so the bootstrap unpacks only what
the running interpreter needs into a per-user cache on first run.

The steps, one function each: read_pins, app_files / stubs_for (the stubs each
Python gets), ensure_wheels (download, cached), assemble_trees (one file tree
per target and Python), group_files (store each distinct file once),
build_data, write_zip. The output is byte-for-byte reproducible from the same
sources and wheels.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

from pyz import bootstrap

PROG = "build_zipapp.sh"
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

# What cares needs at run time; requirements.txt must pin each with ==.
# Everything is fetched with --no-deps: this list *is* the dependency closure.
RUNTIME_PACKAGES = ["asciimatics", "grpcio", "protobuf", "psutil", "typing_extensions", "wcwidth"]
# asciimatics declares Pillow and pyfiglet too, but only its renderers and
# sprites import them and cares does not use those.
STUB_TOOL = "grpcio_tools"  # makes the stubs; pinned in requirements.txt too
APP_FILES = ["cares.py"]
PROTO = "cluster.proto"
STUB_FILES = ["cluster_pb2.py", "cluster_pb2_grpc.py"]
# grpcio 1.80 is the last with cp39 wheels: 3.9 gets its own pins (the marked
# section of requirements.txt) and stubs made for them at build time.
PYTHONS = ["3.9", "3.10", "3.11", "3.12", "3.13", "3.14"]

# Oldest glibc we accept wheels for: manylinux2014 (CentOS 7 era).
GLIBC_FLOOR = 17


def manylinux_tags(arch, floor=GLIBC_FLOOR):
    """pip --platform tags for every glibc from 2.floor down to 2.5, newest first.

    pip only takes the exact tags it is given (plus the legacy aliases of
    manylinux2014/2010), so every glibc up to the floor is spelled out.
    """
    tags = ["manylinux_2_%d_%s" % (m, arch) for m in range(floor, 4, -1)]
    return tags + ["manylinux2014_" + arch]


# target name -> pip --platform tags. The bootstrap computes the same names
# from sys.platform and os.uname().machine.
TARGETS = {
    "linux-x86_64": manylinux_tags("x86_64"),
    "linux-aarch64": manylinux_tags("aarch64"),
    # pip widens a macosx_11_0 tag to every older macOS and to universal2.
    "macos-x86_64": ["macosx_11_0_x86_64"],
    "macos-arm64": ["macosx_11_0_arm64"],
}
DEFAULT_TARGET = "linux-x86_64"

VENDOR = bootstrap.VENDOR          # archive folder holding the unpackable files
BUILD_DATA = bootstrap.BUILD_DATA  # the JSON member the bootstrap reads
SHEBANG = b"#!/usr/bin/env python3\n"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # earliest date zip can store: fixed for determinism
CACHE_RECORD = "cache.json"       # in each folder of the build cache: its inputs and file hashes


class BuildError(Exception):
    """A problem to report on one line (as `build_zipapp.sh: ...`), exit status 1."""


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


def version_key(version):
    return tuple(int(x) for x in version.split("."))


def cp_tag(python):
    """"3.10" -> "cp310"."""
    return "cp" + python.replace(".", "")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="sh " + PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build cares.pyz: cares + pinned wheels for CPython %s-%s in one "
        "file, run as `python3 cares.pyz ARGS`." % (PYTHONS[0], PYTHONS[-1]),
        epilog="""targets: %s (default: %s)

Pins: the == lines of SRC/requirements.txt for
  %s (run time) and %s (stubs);
environment markers (python_version only) say which Python a line is for.
A Python whose %s pin differs from the newest Python's gets its own
stubs, made from SRC/%s at build time; the others get the checked-in ones.
Wheels are fetched from the package index with pip (only when not cached)
and kept, with the made stubs, in the cache dir, by default SRC/.build/pyz
(git-ignore .build/). The output is byte-for-byte reproducible from the same
sources and wheels.

environment: PYTHON  interpreter that runs the build (default python3, needs pip)"""
        % (", ".join(sorted(TARGETS)), DEFAULT_TARGET, " ".join(RUNTIME_PACKAGES), STUB_TOOL,
           STUB_TOOL, PROTO),
    )
    p.add_argument("-o", "--output", metavar="PATH",
                   help="where to write the zipapp (default: SRC/cares.pyz)")
    p.add_argument("--target", action="append", metavar="TARGET", default=[],
                   help="platform to include; repeat for several (default: %s)" % DEFAULT_TARGET)
    p.add_argument("--python", action="append", metavar="X.Y", default=[],
                   help="CPython version to include; repeat for several (default: all of %s)"
                   % " ".join(PYTHONS))
    p.add_argument("--src", metavar="DIR", default=HERE,
                   help="folder holding cares.py, %s, the stubs and requirements.txt "
                   "(default: this script's folder)" % PROTO)
    p.add_argument("--requirements", metavar="FILE",
                   help="pins file (default: SRC/requirements.txt)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where downloaded wheels and made stubs are kept (default: SRC/.build/pyz)")
    p.add_argument("--offline", action="store_true",
                   help="never run pip; fail if a wheel or stub is not in the cache dir yet")
    # 9 is 2.5x slower to build for 0.3% less size.
    p.add_argument("--compresslevel", type=int, default=6, choices=range(0, 10), metavar="0-9",
                   help="deflate level (default 6)")
    a = p.parse_args(argv)

    a.target = sorted(set(a.target or [DEFAULT_TARGET]))
    for t in a.target:
        if t not in TARGETS:
            p.error("unknown target %r; choose from: %s" % (t, ", ".join(sorted(TARGETS))))
    a.python = sorted(set(a.python or PYTHONS), key=version_key)
    for v in a.python:
        if v not in PYTHONS:
            p.error("unsupported Python %r; choose from: %s" % (v, " ".join(PYTHONS)))
    a.src = os.path.abspath(a.src)
    a.output = os.path.abspath(a.output or os.path.join(a.src, "cares.pyz"))
    a.cache_dir = os.path.abspath(a.cache_dir or os.path.join(a.src, ".build", "pyz"))
    if a.requirements is None:
        a.requirements = os.path.join(a.src, "requirements.txt")
    return a


# ---------------------------------------------------------------------------
# Pins
# ---------------------------------------------------------------------------

PIN_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*===?\s*([A-Za-z0-9.+!_-]+)\s*(?:;(.*))?$")
MARKER_RE = re.compile(r"""\s*python_version\s*(<=|>=|==|!=|<|>)\s*(["'])(\d+(?:\.\d+)*)\2\s*$""")


def parse_requirements(text):
    """The name==version lines of a requirements file: [(normalized name, version, marker or None)].

    Lines that pin nothing (options, comments, unpinned names) are skipped.
    """
    pins = []
    for line in text.splitlines():
        m = PIN_RE.match(line.split("#", 1)[0].strip())
        if m:
            marker = m.group(3).strip() if m.group(3) else None
            pins.append((norm(m.group(1)), m.group(2), marker or None))
    return pins


def marker_applies(marker, python):
    """Does an environment marker hold for CPython `python` ("3.9")?

    Only what a pins file needs to tell Pythons apart: python_version
    comparisons, joined by `and`. Anything else is an error, not a guess.
    """
    if marker is None:
        return True
    ops = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
           ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
    for clause in re.split(r"\s+and\s+", marker.strip()):
        m = MARKER_RE.match(clause)
        if not m:
            raise BuildError("cannot evaluate the marker %r: only python_version comparisons "
                             "joined by `and` are understood" % marker)
        if not ops[m.group(1)](version_key(python), version_key(m.group(3))):
            return False
    return True


def pins_for(requirements, python):
    """{name: version} of the parsed pins whose marker holds for `python`."""
    found = {}
    for name, version, marker in requirements:
        if marker_applies(marker, python):
            if found.get(name, version) != version:
                raise BuildError("two pins of %s apply to Python %s: %s and %s"
                                 % (name, python, found[name], version))
            found[name] = version
    return found


def read_pins(path, pythons=PYTHONS):
    """{python: {package: version}} of the runtime packages and STUB_TOOL, from a requirements file."""
    try:
        with open(path, encoding="utf-8") as f:
            requirements = parse_requirements(f.read())
    except OSError as e:
        raise BuildError("cannot read %s: %s" % (path, e.strerror or e))
    out = {}
    for py in pythons:
        pins = pins_for(requirements, py)
        missing = [name for name in RUNTIME_PACKAGES + [STUB_TOOL] if name not in pins]
        if missing:
            raise BuildError("%s must pin with == each of %s for Python %s; missing: %s"
                             % (path, ", ".join(RUNTIME_PACKAGES + [STUB_TOOL]), py, ", ".join(missing)))
        out[py] = {name: pins[name] for name in RUNTIME_PACKAGES + [STUB_TOOL]}
    return out


def stub_tools(pins):
    """{python: None (the checked-in stubs serve) or the grpcio-tools version to make its stubs with}.

    pins: read_pins() of every Python in PYTHONS. The checked-in stubs are
    what CI checks against the grpcio-tools pin of the newest Python; a Python
    with another pin needs stubs of its own (the stubs check the grpcio and
    protobuf they run with).
    """
    main = pins[PYTHONS[-1]][STUB_TOOL]
    return {py: (None if p[STUB_TOOL] == main else p[STUB_TOOL]) for py, p in pins.items()}


def describe_pins(pins):
    """One line per distinct pin set: "Python 3.10 3.11: a==1 b==2"."""
    by_set = {}
    for py in sorted(pins, key=version_key):
        line = " ".join("%s==%s" % kv for kv in sorted(pins[py].items()))
        by_set.setdefault(line, []).append(py)
    return ["Python %s: %s" % (" ".join(pys), line) for line, pys in by_set.items()]


# ---------------------------------------------------------------------------
# The build cache
# ---------------------------------------------------------------------------

def cached_files(folder, inputs):
    """Sorted paths of a finished cache folder made from exactly these inputs, else None."""
    try:
        with open(os.path.join(folder, CACHE_RECORD)) as f:
            record = json.load(f)
        if record["inputs"] == inputs and all(
                file_sha256(os.path.join(folder, fn)) == h for fn, h in record["files"].items()):
            return [os.path.join(folder, fn) for fn in sorted(record["files"])]
        say("%s is damaged or out of date; making it again" % folder)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def fill_cache(folder, inputs, fill):
    """Make a cache folder: fill(tmp) writes its files into a temp folder, which then replaces folder.

    A killed build leaves only a temp folder (the next build removes it), never a half-made folder.
    """
    tmp = "%s.tmp-%d" % (folder, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        fill(tmp)
        files = {fn: file_sha256(os.path.join(tmp, fn)) for fn in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, CACHE_RECORD), "w") as f:
            json.dump({"inputs": inputs, "files": files}, f, indent=1, sort_keys=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(folder, fn) for fn in sorted(files)]


# ---------------------------------------------------------------------------
# Wheels
# ---------------------------------------------------------------------------

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


def pip_options(target, python):
    """pip download options that select the wheels of one target and Python."""
    tag = cp_tag(python)
    options = ["--implementation", "cp", "--python-version", python,
               "--abi", tag, "--abi", "abi3", "--abi", "none"]
    for plat in TARGETS[target]:
        options += ["--platform", plat]
    return options


def ensure_wheels(cache_dir, label, options, pins, offline):
    """Wheel paths of exactly these pins ({name: version}), downloaded once into the cache.

    label names the platform ("linux-x86_64/cp312"); options are the pip
    options that select it ([] for this interpreter's own).
    """
    want = ["%s==%s" % kv for kv in sorted(pins.items())]
    # One folder per pin set, so switching branches does not refetch everything.
    folder = os.path.join(cache_dir, "wheels", label, sha256(" ".join(want).encode())[:12])
    paths = cached_files(folder, want)
    if paths is not None:
        return paths
    if offline:
        raise BuildError("--offline, but the wheels for %s (%s) are missing or damaged in %s"
                         % (label, " ".join(want), folder))
    say("fetching wheels for %s ..." % label)
    return fill_cache(folder, want, lambda tmp: pip_download(tmp, label, options, pins))


def pip_download(dest, label, options, pins):
    """pip download the pinned wheels into dest, and check that exactly the pins came."""
    want = ["%s==%s" % kv for kv in sorted(pins.items())]
    cmd = [sys.executable, "-m", "pip", "download", "--no-input", "--disable-pip-version-check",
           "--only-binary=:all:", "--no-deps", "-d", dest] + options + want
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, universal_newlines=True)
    if res.returncode != 0:
        say(res.stdout.rstrip())
        raise BuildError("pip could not fetch the wheels for %s (output above)" % label)
    wheels = {}
    for fn in sorted(os.listdir(dest)):
        m = WHEEL_RE.match(fn)
        if not m:
            raise BuildError("pip left an unexpected file %s in %s" % (fn, dest))
        name = norm(m.group("name"))
        if pins.get(name) != m.group("ver") or name in wheels:
            raise BuildError("pip fetched %s, which is not one of the pins %s" % (fn, " ".join(want)))
        wheels[name] = fn
    if sorted(wheels) != sorted(pins):
        raise BuildError("pip did not fetch wheels for %s (%s)"
                         % (", ".join(sorted(set(pins) - set(wheels))), label))


def wheel_files(path):
    """The importable files of one wheel: {path relative to site-packages: bytes}."""
    files = {}
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
                raise BuildError("%s holds a suspicious path %r" % (os.path.basename(path), name))
            files[name] = zf.read(info)
    return files


def merge_files(tree, files, source):
    """Add files to tree (both {relative path: bytes}); two different versions of one path is an error."""
    for name, data in files.items():
        if name in tree and tree[name] != data:
            raise BuildError("%s and another wheel both ship %s" % (source, name))
        tree[name] = data


# ---------------------------------------------------------------------------
# The app and its stubs
# ---------------------------------------------------------------------------

def app_files(src):
    """{name: bytes} of cares.py and the checked-in stubs."""
    app = {}
    for f in APP_FILES + STUB_FILES:
        try:
            with open(os.path.join(src, f), "rb") as fh:
                app[f] = fh.read()
        except OSError:
            raise BuildError("%s not found in %s (the stubs come from %s via grpcio-tools)" % (f, src, PROTO))
    return app


def made_stubs(args, tools_version):
    """{stub name: bytes} made from SRC/cluster.proto by grpcio-tools tools_version, cached."""
    proto = os.path.join(args.src, PROTO)
    try:
        proto_sha = file_sha256(proto)
    except OSError as e:
        raise BuildError("cannot read %s: %s" % (proto, e.strerror or e))
    inputs = ["%s==%s" % (STUB_TOOL, tools_version), "%s sha256=%s" % (PROTO, proto_sha)]
    folder = os.path.join(args.cache_dir, "stubs", sha256(" ".join(inputs).encode())[:12])
    paths = cached_files(folder, inputs)
    if paths is None:
        # grpcio-tools runs here, so it is the wheel for this interpreter.
        host = "build-host/%s-%s" % (sys.implementation.cache_tag, sysconfig.get_platform())
        try:
            tools = ensure_wheels(args.cache_dir, host, [], {STUB_TOOL: tools_version}, args.offline)
        except BuildError as e:
            if args.offline:
                raise
            raise BuildError("%s; grpcio-tools %s runs on the build's own Python, so it needs a wheel "
                             "for it (is PYTHON too old or too new for that release?)" % (e, tools_version))
        say("making the stubs with grpcio-tools %s ..." % tools_version)
        paths = fill_cache(folder, inputs, lambda tmp: run_protoc(tools[0], args.src, tmp))
    stubs = {}
    for path in paths:
        with open(path, "rb") as f:
            stubs[os.path.basename(path)] = f.read()
    if sorted(stubs) != STUB_FILES:
        raise BuildError("grpcio-tools %s made %s, expected %s" % (tools_version, sorted(stubs), STUB_FILES))
    return stubs


# Runs `python -m grpc_tools.protoc` (the README's command) from an unpacked wheel.
PROTOC = ("import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
          "runpy.run_module('grpc_tools.protoc', run_name='__main__', alter_sys=True)")


def run_protoc(tools_wheel, src, out):
    """Make the stubs of SRC/cluster.proto into out with the grpcio-tools of tools_wheel."""
    tools = tempfile.mkdtemp(prefix="cares-grpcio-tools-")
    try:
        for name, data in wheel_files(tools_wheel).items():
            path = os.path.join(tools, *name.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        res = subprocess.run([sys.executable, "-I", "-c", PROTOC, tools, "-I.", "--python_out=" + out,
                              "--grpc_python_out=" + out, PROTO], cwd=src, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, universal_newlines=True)
    finally:
        shutil.rmtree(tools, ignore_errors=True)
    if res.returncode != 0:
        say(res.stdout.rstrip())
        raise BuildError("grpcio-tools could not make the stubs of %s (output above)" % PROTO)


def stubs_for(args, tools, app):
    """{python: {stub name: bytes}} for the Pythons built, per stub_tools()."""
    made = {}
    out = {}
    for py in args.python:
        version = tools[py]
        if version is None:
            out[py] = {f: app[f] for f in STUB_FILES}
        else:
            if version not in made:
                made[version] = made_stubs(args, version)
            out[py] = made[version]
    return out


# ---------------------------------------------------------------------------
# Trees, groups, build data, the archive
# ---------------------------------------------------------------------------

def assemble_trees(args, pins, app, stubs):
    """One complete site-packages-like tree per (target, cpXY), with what the bootstrap needs to know.

    Returns trees {(target, cpXY): {path: bytes}}, wheel_info (for humans)
    and glibc {target: (2, N)}, the oldest glibc all its wheels accept.
    """
    trees, wheel_info, glibc = {}, {}, {}
    for t in args.target:
        for py in args.python:
            combo = (t, cp_tag(py))
            tree = {f: app[f] for f in APP_FILES}
            tree.update(stubs[py])
            runtime = {name: pins[py][name] for name in RUNTIME_PACKAGES}
            wheels = ensure_wheels(args.cache_dir, "%s/%s" % combo, pip_options(t, py), runtime, args.offline)
            for w in wheels:
                merge_files(tree, wheel_files(w), os.path.basename(w))
                g = min_glibc(os.path.basename(w))
                if g and g > glibc.get(t, (0, 0)):
                    glibc[t] = g
            trees[combo] = tree
            wheel_info.setdefault(t, {})[combo[1]] = [
                {"file": os.path.basename(w), "sha256": file_sha256(w)} for w in wheels]
    return trees, wheel_info, glibc


def group_name(combos, all_combos, pys_of):
    """A readable archive folder name for the set of (target, cpXY) pairs sharing a file.

    pys_of: target -> the set of cpXY of that target in the build.
    """
    if combos == all_combos:
        return "common"
    by_target = {}
    for t, py in sorted(combos, key=lambda c: (c[0], int(c[1][2:]))):  # cp39 before cp310
        by_target.setdefault(t, []).append(py)
    ts = sorted(by_target)
    if all(set(by_target[t]) == pys_of[t] for t in ts):
        return "+".join(ts)
    pys = {tuple(by_target[t]) for t in ts}
    if len(pys) == 1:
        return "+".join(ts) + "-" + "+".join(pys.pop())
    return "mix-" + sha256(repr(sorted(combos)).encode())[:12]


def group_files(trees):
    """Store each distinct file once, in a folder named after the set of (target, cpXY) that use it.

    "common" (pure Python, the app), "linux-x86_64" (abi3 extensions),
    "linux-x86_64-cp312" (cygrpc) ... Returns members {archive name: sha256},
    blobs {sha256: bytes}, groups {group: [file count, bytes]} and layout
    {target: {cpXY: [groups to unpack]}}.
    """
    users = {}
    blobs = {}
    for combo, tree in trees.items():
        for rel, data in tree.items():
            h = sha256(data)
            blobs[h] = data
            users.setdefault((rel, h), set()).add(combo)
    all_combos = frozenset(trees)
    pys_of = {}
    for t, py in trees:
        pys_of.setdefault(t, set()).add(py)
    members, groups, layout = {}, {}, {}
    for (rel, h), combos in users.items():
        g = group_name(frozenset(combos), all_combos, pys_of)
        if VENDOR + g + "/" + rel in members:
            raise BuildError("internal error: two versions of %s in group %s" % (rel, g))
        members[VENDOR + g + "/" + rel] = h
        count = groups.setdefault(g, [0, 0])
        count[0] += 1
        count[1] += len(blobs[h])
        for t, py in combos:
            layout.setdefault(t, {}).setdefault(py, set()).add(g)
    layout = {t: {py: sorted(gs) for py, gs in sorted(p.items())} for t, p in sorted(layout.items())}
    return members, blobs, groups, layout


def top_level_names(trees):
    """The importable top-level names the trees hold (the bootstrap drops host copies of them)."""
    return sorted({rel.split("/")[0].split(".")[0] for tree in trees.values() for rel in tree
                   if not rel.split("/")[0].endswith((".dist-info", ".data"))})


def build_id(bootstrap_source, layout, glibc, members):
    """16 hex digits covering every byte that ends up unpacked plus the bootstrap,
    so a changed app, pin or bootstrap gets a fresh cache entry."""
    ident = json.dumps({"bootstrap": bootstrap_source, "layout": layout, "glibc": glibc,
                        "members": sorted(members.items())}, sort_keys=True)
    return sha256(ident.encode())[:16]


def build_data(ident, layout, groups, glibc, top_level, about):
    """The BUILD_DATA member: what bootstrap.parse_build_data reads, plus `about` (for humans)."""
    data = dict(about)
    data.update({"build_id": ident, "layout": layout, "groups": groups, "top_level": top_level,
                 "min_glibc": {t: "%d.%d" % tuple(v) for t, v in glibc.items()}})
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def write_zip(path, entries, compresslevel):
    """Write [(name, bytes)] as an executable zipapp at path, atomically and reproducibly."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = "%s.tmp-%d" % (path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            f.write(SHEBANG)
            with zipfile.ZipFile(f, "w") as zf:
                for name, data in entries:
                    zi = zipfile.ZipInfo(name, ZIP_DATE)  # fixed time, mode, OS: same bytes every build
                    zi.create_system = 3
                    zi.external_attr = 0o100644 << 16
                    zi.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(zi, data, compresslevel=compresslevel)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build(args):
    all_pins = read_pins(args.requirements)
    tools = stub_tools(all_pins)
    pins = {py: all_pins[py] for py in args.python}
    for line in describe_pins(pins):
        say("pins for " + line)
    app = app_files(args.src)
    stubs = stubs_for(args, tools, app)
    trees, wheel_info, glibc = assemble_trees(args, pins, app, stubs)
    members, blobs, groups, layout = group_files(trees)

    with open(bootstrap.__file__, "rb") as f:
        main_py = f.read()
    ident = build_id(main_py.decode("utf-8"), layout, glibc, members)
    about = {"pins": {cp_tag(py): pins[py] for py in args.python},
             "targets": sorted(args.target), "pythons": args.python,
             "app": {f: sha256(app[f]) for f in APP_FILES + STUB_FILES},
             "made_stubs": {cp_tag(py): dict({f: sha256(stubs[py][f]) for f in STUB_FILES}, grpcio_tools=tools[py])
                            for py in args.python if tools[py]},
             "wheels": wheel_info}
    entries = [("__main__.py", main_py),
               (BUILD_DATA, build_data(ident, layout, groups, glibc, top_level_names(trees), about))]
    entries += [(name, blobs[h]) for name, h in sorted(members.items())]
    write_zip(args.output, entries, args.compresslevel)

    size = os.path.getsize(args.output)
    say("wrote %s: %.1f MB, %d files, build %s, sha256 %s" % (
        args.output, size / 1e6, len(entries), ident, file_sha256(args.output)))
    say("targets: %s; Python %s" % (", ".join(sorted(args.target)), " ".join(args.python)))


def main(argv=None):
    # Turn kill/hangup into SystemExit so that the finally clauses remove temp files.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    try:
        build(parse_args(sys.argv[1:] if argv is None else argv))
    except BuildError as e:
        sys.stderr.write("%s: %s\n" % (PROG, e))
        sys.exit(1)


if __name__ == "__main__":
    main()
