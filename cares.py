#!/usr/bin/env python3
"""cares: turn a handful of machines into a cluster and watch it live in the terminal.

One module, read top to bottom as the data flows:

1. text safety and formatting helpers (pure functions),
2. local metrics sampling (what a worker measures),
3. Node and NodeRegistry (the orchestrator's state), alerts, the inventory file and history,
4. the orchestrator: gRPC servicers on a grpc.aio server, event hooks, /metrics (4b), the
   Orchestrator itself (4c),
5. the worker client and the status client,
6. the TUI: asciimatics scenes for the menu, forms, dashboards, details and help,
7. running without a screen: log lines, signals, sd_notify,
8. running as a service: the systemd unit install-service writes,
9. the command line and main().
"""

from __future__ import annotations

import abc
import argparse
import array
import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import enum
import errno
import fcntl
import functools
import gc
import heapq
import ipaddress
import itertools
import json
import math
import operator
import os
import pwd
import random
import re
import resource
import shlex
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import types
import typing
import unicodedata
import zlib
from typing import Optional
# Imported where they are used instead: zipfile, shutil and filecmp (install-service), tempfile
# (state and hook files), urllib.parse (the orchestrator's HTTP and peer addresses), sqlite3
# (history) and http.client (the container API). A worker never needs them: 1.7 MB resident.
# Not imported at all: hashlib, hmac and secrets, which map OpenSSL's digests (0.9 MB resident)
# for what CPython has built in: the same SHA-256, the constant-time compare hmac.compare_digest
# is without OpenSSL, and os.urandom, which secrets.token_hex reads.
try:
    from _sha2 import sha256  # CPython 3.12 and later
except ImportError:
    try:
        from _sha256 import sha256  # 3.8-3.11
    except ImportError:  # a build without them
        from hashlib import sha256
from _operator import _compare_digest as compare_digest

# gRPC's C core logs to stderr, which would both leak internals to users and
# scribble over a full-screen UI. Users can still ask for it with GRPC_VERBOSITY.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
# gRPC's fork handlers serve children that go on using gRPC after fork(); cares has none (its only
# children are hooks, exec'd at once). With them on, a fork() while gRPC threads are busy can hang
# or abort the parent (grpc/grpc#37259), and Python 3.9 forks for every hook it starts.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import grpc  # noqa: E402
import psutil  # noqa: E402

import cluster_pb2 as pb  # noqa: E402
import cluster_pb2_grpc as pb_grpc  # noqa: E402

VERSION = "0.4.0"

DEFAULT_PORT = 50051
DEFAULT_LISTEN = f"[::]:{DEFAULT_PORT}"
DEFAULT_HEARTBEAT_MS = 1000
MIN_HEARTBEAT_MS = 100
MAX_HEARTBEAT_MS = 60_000
# A node is lost after this many heartbeat intervals without an accepted sample.
MISSED_HEARTBEATS = 3
HISTORY_SAMPLES = 60
DEFAULT_MAX_NODES = 10_000
# Disconnected rows are forgotten after this long (--forget-after), so restarts leave no ghosts.
DEFAULT_FORGET_AFTER_S = 24 * 3600.0
EVENT_LOG_SIZE = 1000
MAX_BACKOFF_S = 5.0
REJECTED_TOKEN_BACKOFF_S = 30.0
TOKEN_METADATA_KEY = "cares-token"
# A Heartbeat stream names its node and session in metadata, so the orchestrator
# binds it when it opens, before the first sample (which may take a moment).
NODE_METADATA_KEY = "cares-node-id"
SESSION_METADATA_KEY = "cares-session-id"
MAX_MESSAGE_BYTES = 64 * 1024
HOSTNAME_LIMIT = 64
PLATFORM_LIMIT = 80
ERROR_TEXT_LIMIT = 160
# Joins waiting for their heartbeat stream; beyond this the oldest is dropped (it joins again).
PENDING_JOINS_LIMIT = 2000
# A sweep later than this (or half its period) means the orchestrator itself stalled.
STALL_TOLERANCE_S = 0.1
STALL_REPORT_S = 0.5
# Repeated refusals are logged once, then summed up once per window per source and reason.
REFUSAL_SUMMARY_S = 10.0
WORKER_REPEAT_SUMMARY_S = 60.0
# More orchestrator commands than this within the window is a flood: the worker leaves the stream.
FLOOD_COMMANDS = 50
FLOOD_WINDOW_S = 5.0
# The same for samples, the other way: a worker sends one per interval, at most 50 in the window
# (--heartbeat-ms 100); five times that is a broken or hostile peer, and its stream is ended.
FLOOD_SAMPLES = 5 * int(FLOOD_WINDOW_S * 1000 / MIN_HEARTBEAT_MS)
HOUSEKEEPING_S = 1.0
# How often, at most, nodes gone longer than --forget-after are looked for.
FORGET_CHECK_S = 10.0
GIL_SWITCH_INTERVAL_S = 0.001
# Token guessing: free tries (typos), then doubling delays, then a lockout, per source address.
TOKEN_FREE_FAILURES = 3
TOKEN_LOCKOUT_FAILURES = 10
TOKEN_LOCKOUT_S = 60.0
TOKEN_FAILURE_WINDOW_S = 60.0
TOKEN_GUARD_SOURCES = 10_000
MAX_ALERTS_SHOWN = 16
# `status` pages: at most this many nodes and about this many bytes per reply.
STATUS_PAGE_NODES = 1000
STATUS_PAGE_BYTES = 1 << 20
STATUS_MAX_NODES = 10_000_000
# Headless log lines waiting to be written; beyond this they are counted as dropped.
LOG_QUEUE_LINES = 10_000
# --on-event: commands at once, the time each may take, and the events that may wait.
HOOK_CONCURRENCY = 4
HOOK_TIMEOUT_S = 10.0
HOOK_QUEUE_EVENTS = 100
# The inventory file is saved at most this often when nodes change, and at least this often
# otherwise (for their last-seen times).
STATE_SAVE_S = 5.0
STATE_REFRESH_S = 60.0
LOG_FLUSH_AT_EXIT_S = 1.0

# Keepalive measured on this project's machines: without ping_timeout a frozen
# peer takes ~60 s to notice, with it ~4 s. The server must accept pings as often
# as workers send them, or it answers GOAWAY too_many_pings.
KEEPALIVE_MS = 2000
_BOTH_SIDES_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
SERVER_OPTIONS = _BOTH_SIDES_OPTIONS + [
    ("grpc.so_reuseport", 0),  # a second orchestrator on a busy port must fail, not share it
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_ping_strikes", 2),
]
WORKER_OPTIONS = _BOTH_SIDES_OPTIONS + [
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging while the stream idles between samples
]


# ---------------------------------------------------------------------------
# 1. Text safety and formatting: pure functions, tested without a terminal.
#    Holds: sanitize_text (every peer's text goes through it), node ID and label
#    rules, addresses and targets, durations, percent/byte/age formats, fit().
#    Talks to: nothing; every later section uses it.
# ---------------------------------------------------------------------------

def random_hex(nbytes: int) -> str:
    """secrets.token_hex(nbytes): nbytes from the OS's random source, as hex."""
    return os.urandom(nbytes).hex()


NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,63}")
NODE_ID_RULE = "node ID must be 1-63 characters of A-Z a-z 0-9 . _ -"
# Control, format (bidi overrides, zero-width), surrogate, private-use and
# unassigned characters can move the cursor, reorder a line or change colours.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})


def sanitize_text(text: str, limit: int = 255) -> str:
    """Return text safe to draw on a terminal: no control or format characters, at most limit chars."""
    text = str(text)[: limit * 4]
    cleaned = "".join("?" if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch for ch in text)
    if len(cleaned) > limit:
        cleaned = cleaned[: max(limit - 1, 0)] + "…"
    return cleaned


def is_valid_node_id(node_id: str) -> bool:
    return bool(NODE_ID_PATTERN.fullmatch(node_id))


def parse_address(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split HOST:PORT or [IPv6]:PORT into (host, port), the host in the ASCII form DNS uses.
    Host names may hold underscores (Docker Compose service names do) and be internationalised
    (returned as xn-- labels). ValueError says what is wrong, in one line."""
    text = text.strip()
    if not text:
        raise ValueError("enter an address such as 127.0.0.1:50051")
    if len(text) > 300:
        raise ValueError("the address is too long")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError("missing ']' after the IPv6 address")
        if not rest.startswith(":"):
            raise ValueError("missing :PORT after the IPv6 address, e.g. [::1]:50051")
        port_text = rest[1:]
        if not _is_ipv6(host):
            raise ValueError(f"'{sanitize_text(host, 60)}' is not an IPv6 address")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("missing :PORT, e.g. 127.0.0.1:50051")
        if ":" in host:
            if _is_ipv6(host) or _is_ipv6(text):
                raise ValueError("put IPv6 addresses in brackets, e.g. [::1]:50051")
            raise ValueError(f"'{sanitize_text(host, 60)}' is not a host name: ':' is not allowed in one")
        host = ascii_host_name(host)
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"port '{sanitize_text(port_text, 20)}' is not a number")
    port = int(port_text)
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"port must be {lowest}-65535")
    return host, port


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def ascii_host_name(host: str) -> str:
    """An IPv4 address or host name as the resolver takes it; ValueError names the problem."""
    if not host:
        raise ValueError("missing host before ':'")
    shown = sanitize_text(host, 60)
    if any(char.isspace() or unicodedata.category(char) in _UNSAFE_CATEGORIES for char in host):
        raise ValueError(f"'{shown}' is not a host name: it has a space or control character")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"'{shown}' is not a valid internationalised host name") from None
    if len(host) > 253:
        raise ValueError("the host name is too long")
    labels = host.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"'{shown}' is not a valid IPv4 address") from None
        return host
    bad = next((label for label in labels if not _HOSTNAME_LABEL.fullmatch(label)), None)
    if bad is not None:
        raise ValueError(f"'{shown}' is not a valid host name: its part '{sanitize_text(bad, 30)}' must be "
                         f"1-63 letters, digits, '-' or '_', not starting or ending with '-'")
    return host


# gRPC target URI schemes a worker may name instead of HOST:PORT (gRPC's naming document).
_TARGET_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")


def parse_target(text: str) -> str:
    """What a worker or `status` dials: HOST:PORT, [IPv6]:PORT or a gRPC target URI such as
    dns:///orch:50051 or unix:/run/cares.sock. Returns the target for gRPC; ValueError says why not."""
    text = text.strip()
    scheme = next((scheme for scheme in _TARGET_SCHEMES if text.lower().startswith(scheme)), None)
    if scheme is None:
        return format_address(*parse_address(text))
    rest = text[len(scheme):]
    if not rest or sanitize_text(rest, 300) != rest or any(char.isspace() for char in rest):
        raise ValueError(f"nothing usable after '{scheme}'")
    if scheme != "dns:":
        return text
    authority = ""
    if rest.startswith("//"):
        authority, sep, rest = rest[2:].partition("/")
        if not sep:
            raise ValueError("a dns target is dns:///HOST:PORT (or dns://DNS-SERVER/HOST:PORT)")
    return f"dns://{authority}/{format_address(*parse_address(rest))}"


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_parts(peer: str) -> tuple[str, str]:
    """gRPC peers look like 'ipv4:10.0.0.5:4242' or 'ipv6:%5B::1%5D:4242': (host, HOST:PORT)."""
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            import urllib.parse
            address = urllib.parse.unquote(peer[len(prefix):])
            host = address.rpartition(":")[0].strip("[]") or address
            return host, address
    return peer, peer


def peer_to_address(peer: str) -> str:
    """A gRPC peer as HOST:PORT for display."""
    return sanitize_text(_peer_parts(peer)[1], 64)


def peer_host(peer: str) -> str:
    """A gRPC peer's host without the (ephemeral) port: the source a refusal is counted against."""
    return sanitize_text(_peer_parts(peer)[0], 64)


def host_of(address: str) -> str:
    """The host of HOST:PORT or [IPv6]:PORT."""
    return address.rpartition(":")[0].strip("[]") or address


TOKEN_RULE = "a token must be 1-256 printable ASCII characters, without spaces at either end"


def is_valid_token(token: str) -> bool:
    """gRPC metadata carries printable ASCII only: anything else could never be sent by a worker."""
    return (0 < len(token) <= 256 and token == token.strip()
            and all(32 <= ord(char) < 127 for char in token))


LABEL_KEY_PATTERN = re.compile(r"[a-z0-9_.-]{1,63}")
LABEL_RULE = ("a label is KEY=VALUE: KEY 1-63 of a-z 0-9 _ . -, VALUE at most 128 printable characters; "
              "at most 16 labels")
MAX_LABELS = 16


def parse_label(text: str) -> tuple[str, str]:
    """KEY=VALUE from --label; ValueError with the rule otherwise."""
    key, sep, value = text.partition("=")
    if not sep or labels_problem({key: value}) is not None:
        raise ValueError(LABEL_RULE)
    return key, value


def labels_problem(labels: dict) -> str | None:
    """Why these labels break the rule, or None."""
    if len(labels) > MAX_LABELS:
        return f"more than {MAX_LABELS} labels"
    for key, value in labels.items():
        if not LABEL_KEY_PATTERN.fullmatch(key):
            return f"label key '{sanitize_text(key, 63)}': {LABEL_RULE}"
        if len(value) > 128 or not value.isprintable():
            return f"label '{key}': {LABEL_RULE}"
    return None


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '30m', '24h', '7d' (or plain seconds) as seconds; ValueError otherwise."""
    text = text.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:], None)
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"'{sanitize_text(text, 20)}' is not a duration such as 90s, 30m, 24h or 7d") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError("a duration must be 0 or more")
    return value


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def join_addresses(listen_host: str, port: int, interfaces: dict) -> list[str]:
    """The HOST:PORT strings a worker can use; for a wildcard listen, this machine's IPv4 addresses
    (interfaces as psutil.net_if_addrs() gives them), loopback last. Never empty."""
    if listen_host not in ("::", "0.0.0.0", ""):
        return [format_address(listen_host, port)]
    found, loopback = [], []
    for addresses in interfaces.values():
        for entry in addresses:
            if entry.family != socket.AF_INET:
                continue
            (loopback if entry.address.startswith("127.") else found).append(entry.address)
    hosts = sorted(set(found)) + sorted(set(loopback))
    return [format_address(host, port) for host in hosts] or [format_address(listen_host, port)]


def clamp_heartbeat_ms(milliseconds: int) -> int:
    """A heartbeat interval from the network or a user, held to MIN-MAX ms; 0 (unset) is the default."""
    return min(max(int(milliseconds or DEFAULT_HEARTBEAT_MS), MIN_HEARTBEAT_MS), MAX_HEARTBEAT_MS)


def clamp_percent(value: float) -> float:
    """Any number to 0-100 for drawing; NaN draws as 0."""
    if math.isnan(value):
        return 0.0
    return min(max(value, 0.0), 100.0)


def format_age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 1.0:
        return "now"
    if seconds < 60:
        return f"{int(seconds)}s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)}m ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h ago"
    return f"{int(seconds // 86400)}d ago"


def format_percent(value: float | None, unicode: bool = True) -> str:
    """A percentage for a table; a dash for a value never measured (not 0.0 %, which would be invented)."""
    if value is None:
        return "–" if unicode else "-"
    return f"{clamp_percent(value):.1f}%"


def os_error_text(error: OSError) -> str:
    """An OSError as the end of a one-line message: "no space left on device"."""
    return (error.strerror or str(error)).lower()


def format_bytes(count: float) -> str:
    if abs(count) < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024.0
        if abs(count) < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024.0:.1f} TiB"


@contextlib.contextmanager
def collection_deferred():
    """Run a burst that makes many short-lived objects (a /metrics or /sd page: a copy of every
    node, then its text) with the cyclic garbage collector paused: they die by reference counting
    at the end, instead of being promoted while still in use and then scanned. Measured at 3,000
    nodes scraped once a second: full collections of the whole heap stalled the gRPC loop for up
    to 120 ms. The collector is one switch for the whole process, and a burst may start on any
    thread: it is paused while any burst runs, and switched back on, if it was on, when the last
    one ends. The bursts: a /metrics or /sd page, building an inventory save (StateFile._write),
    and each turn of the screen's loop (draw_next), though a redraw reads the nodes themselves
    (nodes_now) rather than copies."""
    global _deferring_bursts, _collector_was_enabled
    with _deferring_lock:
        if _deferring_bursts == 0:
            _collector_was_enabled = gc.isenabled()
            gc.disable()
        _deferring_bursts += 1
    try:
        yield
    finally:
        with _deferring_lock:
            _deferring_bursts -= 1
            if _deferring_bursts == 0 and _collector_was_enabled:
                gc.enable()


_deferring_lock = threading.Lock()
_deferring_bursts = 0
_collector_was_enabled = True


class _CellWidths(dict):
    """Terminal cells a character takes (2 for wide, 0 for combining marks), as wcwidth says,
    remembered: every redraw measures the same bar and graph glyphs again. wcwidth is imported
    on first use: its tables cost a headless worker 6 MB it never needs. Bounded: a peer's text
    may bring any character."""

    LIMIT = 4096

    def __missing__(self, char: str) -> int:
        from wcwidth import wcwidth
        if len(self) >= self.LIMIT:
            self.clear()
        width = self[char] = max(wcwidth(char), 0) if ord(char) >= 0x300 else 1
        return width


char_width = _CellWidths().__getitem__


def display_width(text: str) -> int:
    # Most text on screen (IDs, numbers, padding) is below U+0300, one cell a character: the
    # dashboard measures every segment of every row at each redraw, so that case is counted in C.
    if not text or max(text) < "\u0300":
        return len(text)
    return sum(map(char_width, text))


def fit(text: str, width: int, ellipsis: str = "…") -> str:
    """Pad or cut text to exactly width terminal cells, marking a cut with the ellipsis."""
    if width <= 0:
        return ""
    cells = display_width(text)
    if cells <= width:
        return text + " " * (width - cells)
    kept, used = [], 0
    for char in text:
        if used + char_width(char) > width - len(ellipsis):
            break
        kept.append(char)
        used += char_width(char)
    return "".join(kept) + ellipsis + " " * (width - len(ellipsis) - used)


# ---------------------------------------------------------------------------
# 2. Local metrics sampling: what a worker measures of its machine, for its own
#    screen and for its heartbeat stream.
#    Holds: Metrics (one sample), CounterRates, LocalSampler (every heartbeat:
#    /proc read directly on Linux, psutil elsewhere), DetailSampler and its
#    readers (processes, mounts, interfaces, sensors, cgroups, the Docker/Podman
#    API), only while an orchestrator asks.
#    Talks to: 1 (text), cluster_pb2 (NodeDetail is built as the message itself).
# ---------------------------------------------------------------------------

class Metrics(typing.NamedTuple):
    """One sample of a machine's load, as a worker measures it and the orchestrator keeps it.
    Names and units are those of NodeMetrics' fields. None means not measured: an older worker
    does not send it, and a rate needs two readings. A named tuple, not a dataclass: one is
    built for every heartbeat, and a frozen dataclass took 7 us to build, this under 1."""

    cpu_percent: Optional[float] = None
    memory_percent: Optional[float] = None
    memory_used_bytes: Optional[float] = None  # total minus available, so used/total agrees with the percent
    memory_total_bytes: Optional[float] = None
    swap_percent: Optional[float] = None
    load_average_1m: Optional[float] = None
    load_average_5m: Optional[float] = None
    load_average_15m: Optional[float] = None
    boot_time_unix_s: Optional[float] = None  # a time, not a load: the screens show the uptime it gives
    root_fs_used_percent: Optional[float] = None
    root_fs_size_bytes: Optional[float] = None
    disk_read_bytes_per_s: Optional[float] = None
    disk_write_bytes_per_s: Optional[float] = None
    net_receive_bytes_per_s: Optional[float] = None
    net_transmit_bytes_per_s: Optional[float] = None


METRIC_NAMES = Metrics._fields
PERCENT_METRICS = frozenset(name for name in METRIC_NAMES if name.endswith("_percent"))
# NodeMetrics fields of the first release: proto3 scalars without presence, always sent.
FIRST_RELEASE_METRICS = ("cpu_percent", "memory_percent", "memory_used_bytes", "memory_total_bytes")


class CounterRates:
    """Per-second rates of cumulative counters (bytes read, received...) summed over devices.
    A counter that went back (a device reset or replaced) contributes nothing for that interval
    instead of a negative or absurd rate; the first reading gives None."""

    def __init__(self):
        self._previous: dict[str, tuple] = {}
        self._previous_at = 0.0

    def update(self, counters: dict[str, tuple], now: float) -> tuple | None:
        """counters: device -> tuple of cumulative values; returns the summed rates, or None the first time."""
        previous, elapsed = self._previous, now - self._previous_at
        self._previous, self._previous_at = counters, now
        if not previous or elapsed <= 0:
            return None
        width = len(next(iter(counters.values()), ()))
        totals = [0.0] * width
        for device, values in counters.items():
            before = previous.get(device)
            if before is None:
                continue
            for index, (old, new) in enumerate(zip(before, values)):
                if new >= old:
                    totals[index] += new - old
        return tuple(total / elapsed for total in totals)


# psutil counts CPU time in 10 ms ticks: a CPU reading needs a window several ticks long.
MIN_CPU_WINDOW_S = 0.09
# Which disks are physical and which interfaces loopback is re-read this often (hot-plug).
DEVICE_REFRESH_S = 60.0
# statvfs() of / waits as long as the file system does (a dead NFS root, a failing disk), so no
# sample calls it: a thread of its own reads it at most this often and a sample carries the
# latest reading. A hung read costs that figure its freshness, never a heartbeat or a redraw.
ROOT_FS_REFRESH_S = 10.0


def physical_disks() -> frozenset:
    """Whole physical disks (sda, nvme0n1, vda), not partitions, loop, RAM or device-mapper
    devices, whose traffic is already counted on the disks beneath them: Linux gives those
    a /sys/block/NAME/device link. Elsewhere, every disk psutil lists."""
    names = psutil.disk_io_counters(perdisk=True, nowrap=True) or {}
    if not os.path.isdir("/sys/block"):
        return frozenset(names)
    return frozenset(name for name in names if os.path.exists(f"/sys/block/{name}/device"))


def non_loopback_interfaces() -> frozenset:
    stats = psutil.net_if_stats()
    return frozenset(name for name, stat in stats.items()
                     if "loopback" not in getattr(stat, "flags", "") and name != "lo")


def read_proc(path: str) -> bytes:
    """A /proc file whole, in one read (they are generated at each read, never large)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        return os.read(descriptor, 1 << 20)
    finally:
        os.close(descriptor)


class ProcFiles:
    """/proc files kept open and read again from their start, which has the kernel make them
    afresh: opening each one every second (a path walk, a descriptor) and reading into a 1 MiB
    buffer (an mmap and its page faults) cost more than making them. A read that fills the
    buffer is read again into one twice the size, so a file of any length comes whole."""

    def __init__(self, first_size: int = 1 << 16):
        self._first_size = first_size
        self._open: dict[str, list] = {}  # path -> [descriptor, read size]

    def read(self, path: str) -> bytes:
        entry = self._open.get(path)
        if entry is None:
            entry = self._open[path] = [os.open(path, os.O_RDONLY), self._first_size]
        while True:
            data = os.pread(entry[0], entry[1], 0)
            if len(data) < entry[1]:
                return data
            entry[1] *= 2

    def close(self) -> None:
        for descriptor, _ in self._open.values():
            os.close(descriptor)
        self._open.clear()

    __del__ = close


MEMINFO_KEYS = (b"MemTotal", b"MemAvailable", b"SwapTotal", b"SwapFree")
# One pass in C over the file: splitting its ~55 lines in Python was most of a sample's cost.
_MEMINFO_LINE = re.compile(rb"^(" + b"|".join(MEMINFO_KEYS) + rb"): +(\d+)", re.M)


def proc_meminfo(read=read_proc) -> dict:
    """MEMINFO_KEYS' /proc/meminfo lines in bytes (KeyError when one is missing: kernels before 3.14)."""
    found = {key: int(value) * 1024 for key, value in _MEMINFO_LINE.findall(read("/proc/meminfo"))}
    return {key: found[key] for key in MEMINFO_KEYS}


def proc_cpu_times(read=read_proc) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat, counted as psutil.cpu_percent counts
    them: guest time is inside user and nice already, and iowait is idle."""
    user, nice, system, idle, iowait, irq, softirq, steal, guest, guest_nice = \
        map(int, read("/proc/stat").split(b"\n", 1)[0].split()[1:11])
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total - idle - iowait, total


def proc_counters(path: str, names: frozenset, fields: tuple, scale: int = 1, read=read_proc) -> dict:
    """name -> (those counters) of the wanted devices in /proc/diskstats (name third, then the
    counters) or /proc/net/dev ("name: counters")."""
    if not names:
        return {}
    found = {}
    for name, rest in _device_lines(names, path.endswith("/net/dev")).findall(read(path)):
        values = rest.split()
        found[name] = tuple(int(values[field]) * scale for field in fields)
    return found


@functools.lru_cache(maxsize=8)
def _device_lines(names: frozenset, net_dev: bool) -> re.Pattern:
    """The lines of these devices, found in one pass in C (the devices change only on hot-plug)."""
    alternatives = b"|".join(re.escape(name) for name in sorted(names))
    if net_dev:
        return re.compile(rb"^ *(" + alternatives + rb"):(.*)$", re.M)
    return re.compile(rb"^ *\d+ +\d+ (" + alternatives + rb") (.*)$", re.M)


def percent_of(part: float, whole: float) -> float:
    """part of whole in percent as psutil gives it (one decimal, 0 for nothing to be part of),
    held to 0-100: every percentage LocalSampler works out itself."""
    return clamp_percent(round(part / whole * 100, 1) if whole > 0 else 0.0)


# /proc/diskstats after the name: sectors read is the 3rd counter, written the 7th, always in
# 512-byte units; /proc/net/dev: bytes received the 1st, sent the 9th.
DISKSTAT_BYTES, SECTOR_BYTES, NETDEV_BYTES = (2, 6), 512, (0, 8)


class LocalSampler:
    """Thread-safe sampling of this machine, shared by the screen and the heartbeat.

    CPU use is measured since the previous sample, so a sample younger than max_age is reused
    rather than measured over a uselessly short window. On Linux the host-wide /proc files are
    read directly: psutil reads the same files and gives the same figures (a test compares
    them), but took 0.7 ms a sample where this takes about 0.15, once a second on every worker.
    Elsewhere, or if /proc does not read as expected, psutil measures.
    """

    def __init__(self, max_age: float = MIN_CPU_WINDOW_S):
        self._max_age = max_age
        self._lock = threading.Lock()
        self._last: Metrics | None = None
        self._last_at = 0.0
        # Fixed for the life of the process: read once, for the join and the worker view.
        self.cpu_count = psutil.cpu_count() or 0
        self.memory_total_bytes = psutil.virtual_memory().total
        self.boot_time = psutil.boot_time()
        self._disk_rates, self._net_rates = CounterRates(), CounterRates()
        self._devices_at = -DEVICE_REFRESH_S
        self._disks = self._interfaces = frozenset()
        self._from_proc = sys.platform.startswith("linux")
        self._proc = ProcFiles()
        self._cpu_before = (0, 0)
        self._root, self._root_at, self._root_reading = _root_fs_usage(), time.monotonic(), False
        self._cpu_percent()  # primed: the first sample measures from here
        self._primed_at = time.monotonic()
        self._read_rates(self._primed_at)

    def warmup_left(self) -> float:
        """Seconds until the first CPU reading covers a meaningful window; wait this before sending one."""
        return max(self._primed_at + MIN_CPU_WINDOW_S - time.monotonic(), 0.0)

    def sample(self) -> Metrics:
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last_at < self._max_age:
                return self._last
            total, available, swap_total, swap_free = self._read_memory()
            disk, net = self._read_rates(now)
            root = self._root_fs(now)
            load = os.getloadavg() if hasattr(os, "getloadavg") else (None, None, None)
            self._last = Metrics(
                cpu_percent=self._cpu_percent(),
                memory_percent=percent_of(total - available, total),
                memory_used_bytes=max(total - available, 0),
                memory_total_bytes=total,
                swap_percent=percent_of(swap_total - swap_free, swap_total),
                load_average_1m=load[0], load_average_5m=load[1], load_average_15m=load[2],
                boot_time_unix_s=self.boot_time,
                root_fs_used_percent=root[0] if root else None,
                root_fs_size_bytes=root[1] if root else None,
                disk_read_bytes_per_s=disk[0] if disk else None,
                disk_write_bytes_per_s=disk[1] if disk else None,
                net_receive_bytes_per_s=net[0] if net else None,
                net_transmit_bytes_per_s=net[1] if net else None,
            )
            self._last_at = time.monotonic()
            return self._last

    def _root_fs(self, now: float) -> tuple[float, int] | None:
        """The latest reading of /'s usage; when it is due, a thread of its own reads it again."""
        if now - self._root_at >= ROOT_FS_REFRESH_S and not self._root_reading:
            self._root_reading = True
            try:
                threading.Thread(target=self._read_root_fs, name="cares-statvfs", daemon=True).start()
            except RuntimeError:  # no new threads (interpreter shutdown, a thread limit): keep the last one
                self._root_reading = False
        return self._root

    def _read_root_fs(self) -> None:
        try:
            self._root = _root_fs_usage()
        finally:
            self._root_at, self._root_reading = time.monotonic(), False

    def _proc_failed(self) -> None:
        """/proc did not read as expected (a container's odd mount, a future format): psutil
        from now on (its first CPU reading, 0, covers no window: one sample's worth)."""
        self._from_proc = False

    def _cpu_percent(self) -> float:
        """Use of all CPUs since the previous call, in percent."""
        if self._from_proc:
            try:
                now = proc_cpu_times(self._proc.read)
            except (OSError, ValueError):
                self._proc_failed()
            else:
                (busy_before, total_before), self._cpu_before = self._cpu_before, now
                busy, total = now[0] - busy_before, now[1] - total_before
                return percent_of(busy, total)
        return clamp_percent(psutil.cpu_percent(interval=None))

    def _read_memory(self) -> tuple:
        """(total, available, swap total, swap free) in bytes."""
        if self._from_proc:
            try:
                return tuple(proc_meminfo(self._proc.read).values())
            except (OSError, ValueError, KeyError, IndexError):
                self._proc_failed()
        memory, swap = psutil.virtual_memory(), psutil.swap_memory()
        return memory.total, memory.available, swap.total, swap.free

    def _read_rates(self, now: float) -> tuple:
        if now - self._devices_at >= DEVICE_REFRESH_S:
            self._disks, self._interfaces, self._devices_at = physical_disks(), non_loopback_interfaces(), now
            self._disk_names = frozenset(name.encode() for name in self._disks)
            self._interface_names = frozenset(name.encode() for name in self._interfaces)
        disks = nics = None
        if self._from_proc:
            try:
                disks = proc_counters("/proc/diskstats", self._disk_names, DISKSTAT_BYTES, SECTOR_BYTES,
                                      read=self._proc.read)
                nics = proc_counters("/proc/net/dev", self._interface_names, NETDEV_BYTES, read=self._proc.read)
            except (OSError, ValueError, IndexError):
                self._proc_failed()
        if not self._from_proc:
            disks = {name.encode(): (io.read_bytes, io.write_bytes)
                     for name, io in (psutil.disk_io_counters(perdisk=True, nowrap=True) or {}).items()
                     if name in self._disks}
            nics = {name.encode(): (io.bytes_recv, io.bytes_sent)
                    for name, io in (psutil.net_io_counters(pernic=True, nowrap=True) or {}).items()
                    if name in self._interfaces}
        return self._disk_rates.update(disks, now), self._net_rates.update(nics, now)


def _root_fs_usage() -> tuple[float, int] | None:
    """(percent used, size in bytes) of the file system holding /, as df counts it; None if unreadable."""
    try:
        vfs = os.statvfs("/")
    except OSError:
        return None
    # psutil.disk_usage's arithmetic: used of what non-root users can have (used + available).
    used, available = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize
    return percent_of(used, used + available), vfs.f_blocks * vfs.f_frsize


# -- on-demand detail: processes, mounts, interfaces, sensors, containers -------
# Taken only while an orchestrator asks (a DetailRequest on the Heartbeat stream), at most once
# per DETAIL_MIN_PERIOD_S whatever the interval, and cut to fit the 64 KiB receive cap.

TOP_PROCESSES = 15  # per order: CPU, memory, disk I/O
DETAIL_LIST_LIMIT = 32  # mounts, interfaces, sensors, containers each
COMMAND_LINE_LIMIT = 200
DETAIL_BYTE_BUDGET = 48 * 1024  # the NodeDetail inside a NodeMetrics that must stay under MAX_MESSAGE_BYTES
DETAIL_MIN_PERIOD_S = 1.0  # walking /proc costs 10-40 ms: at most one snapshot a second
DETAIL_STALE_S = 30.0  # readings older than this are no base for a rate: start over
CGROUP_WALK_LIMIT = 2000  # cgroup directories read per snapshot (a Kubernetes node has thousands)
ENGINE_SOCKETS = (("docker", "/var/run/docker.sock"), ("podman", "/run/podman/podman.sock"))
ENGINE_NAMES_MAX_AGE_S = 10.0
# Pseudo and virtual file systems are not "real" mounts; tmpfs is, where it is not the system's own.
_SYSTEM_MOUNT_PREFIXES = ("/proc", "/sys", "/dev", "/run", "/snap")
_CONTAINER_CGROUP = re.compile(r"(?:(docker|libpod|cri-containerd|crio)-)?([0-9a-f]{64})(?:\.scope)?")


class DetailSampler:
    """Builds NodeDetail snapshots of this machine. Rates and CPU percentages are over the time
    since the previous snapshot, so the first one has none (window_s 0). Thread-safe; it runs on
    an executor thread, never on the gRPC loop."""

    def __init__(self, share_command_lines: bool = False, share_processes: bool = True,
                 cgroup_root: str | None = None, engine_sockets=ENGINE_SOCKETS):
        self.share_command_lines = share_command_lines
        self.share_processes = share_processes
        self._lock = threading.Lock()
        self._previous_at: float | None = None
        self._processes: dict[int, tuple] = {}  # pid -> (create time, CPU seconds, I/O bytes)
        self._interfaces: dict[str, tuple] = {}  # name -> (bytes received, bytes sent)
        self._cgroups: dict[str, int] = {}  # path -> usage_usec
        self._cgroup_root = cgroup_root  # found at the first snapshot: reading /proc/self/mounts is I/O,
        # and the worker builds its sampler on the gRPC loop, when the first request arrives
        self._engine_sockets = engine_sockets
        self._engine_names: dict[str, tuple[str, str]] = {}  # container ID -> (engine, name)
        self._engine_names_at = -math.inf
        self.taken = 0  # snapshots so far: what a worker spent on being looked at

    def prime(self) -> None:
        """Take a reading to measure the next snapshot's rates from (the worker's first request)."""
        try:
            self.snapshot()
        except Exception:  # the snapshot that follows says why, where someone reads it
            pass

    def snapshot(self) -> pb.NodeDetail:
        with self._lock:
            now = time.monotonic()
            window = now - self._previous_at if self._previous_at is not None else 0.0
            if window > DETAIL_STALE_S:
                window = 0.0
            self._previous_at = now
            self.taken += 1
            detail = pb.NodeDetail(window_s=window)
            left_out = 0
            if self.share_processes:
                processes, detail.process_count = self._read_processes(window)
                detail.processes.extend(processes)
                # PID 1 is always there, unless /proc shows this user's processes only.
                detail.own_processes_only = not os.path.exists("/proc/1") and os.path.isdir("/proc/self")
            for field, entries in (("mounts", read_mounts()), ("interfaces", self._read_interfaces(window)),
                                   ("sensors", read_sensors()), ("containers", self._read_containers(window))):
                getattr(detail, field).extend(entries[:DETAIL_LIST_LIMIT])
                left_out += max(len(entries) - DETAIL_LIST_LIMIT, 0)
            detail.left_out = left_out + fit_detail(detail, DETAIL_BYTE_BUDGET)
            return detail

    def _read_processes(self, window: float) -> tuple[list, int]:
        """The union of the top TOP_PROCESSES by CPU, memory and I/O, and how many processes there are."""
        attrs = ["pid", "name", "username", "cpu_times", "memory_info", "status", "num_threads",
                 "io_counters", "create_time"] + (["cmdline"] if self.share_command_lines else [])
        previous, current, rows = self._processes, {}, []
        for process in psutil.process_iter(attrs, ad_value=None):
            info = process.info
            times, memory = info.get("cpu_times"), info.get("memory_info")
            if times is None or memory is None:
                continue  # gone between listing and reading
            cpu_seconds = times.user + times.system
            io = info.get("io_counters")
            io_bytes = io.read_bytes + io.write_bytes if io is not None else None
            created = info.get("create_time") or 0.0
            current[info["pid"]] = (created, cpu_seconds, io_bytes)
            before = previous.get(info["pid"])
            cpu = io_rate = 0.0
            if before is not None and before[0] == created:  # the same process, not a reused PID
                cpu = counter_rate(cpu_seconds, before[1], window) * 100.0
                if io_bytes is not None and before[2] is not None:
                    io_rate = counter_rate(io_bytes, before[2], window)
            rows.append((info, cpu, memory.rss, io_rate, io_bytes is None))
        self._processes = current
        chosen: dict[int, tuple] = {}
        for index in (1, 2, 3):  # by CPU, by memory, by I/O
            for row in heapq.nlargest(TOP_PROCESSES, rows, key=operator.itemgetter(index)):
                chosen[row[0]["pid"]] = row
        samples = []
        for info, cpu, rss, io_rate, io_unknown in sorted(chosen.values(), key=lambda row: -row[1]):
            command_line = " ".join(info.get("cmdline") or ()) if self.share_command_lines else ""
            samples.append(pb.ProcessSample(
                pid=info["pid"], user=(info.get("username") or "")[:32], name=(info.get("name") or "")[:64],
                command_line=command_line[:COMMAND_LINE_LIMIT], cpu_percent=round(cpu, 1), rss_bytes=rss,
                io_bytes_per_s=round(io_rate, 1), state=str(info.get("status") or "")[:16],
                threads=info.get("num_threads") or 0, io_unknown=io_unknown))
        return samples, len(rows)

    def _read_interfaces(self, window: float) -> list:
        counters = psutil.net_io_counters(pernic=True, nowrap=True) or {}
        stats = psutil.net_if_stats()
        previous, current, samples = self._interfaces, {}, []
        for name in sorted(non_loopback_interfaces() & set(counters)):
            io, stat = counters[name], stats.get(name)
            current[name] = (io.bytes_recv, io.bytes_sent)
            before = previous.get(name)
            receive = transmit = 0.0
            if before is not None:
                receive, transmit = (counter_rate(io.bytes_recv, before[0], window),
                                     counter_rate(io.bytes_sent, before[1], window))
            samples.append(pb.InterfaceSample(
                name=name[:32], receive_bytes_per_s=round(receive, 1), transmit_bytes_per_s=round(transmit, 1),
                errors_in=io.errin, errors_out=io.errout, drops_in=io.dropin, drops_out=io.dropout,
                up=bool(stat and stat.isup), speed_mbps=max(stat.speed, 0) if stat else 0))
        self._interfaces = current
        return samples

    def _read_containers(self, window: float) -> list:
        """cgroup v2 groups that hold processes, busiest first: containers (named by the Docker or
        Podman API when its socket is readable), services and any other group."""
        if self._cgroup_root is None:
            self._cgroup_root = cgroup2_root()
        if not self._cgroup_root:
            return []
        previous, current, found = self._cgroups, {}, []
        for path in cgroups_with_processes(self._cgroup_root, CGROUP_WALK_LIMIT):
            usage = _read_cgroup_usage_usec(path)
            if usage is None:
                continue
            current[path] = usage
            before = previous.get(path)
            cpu = counter_rate(usage, before, window) / 1e4 if before is not None else 0.0  # us/s -> % of a CPU
            found.append((path, cpu))
        self._cgroups = current
        found.sort(key=lambda entry: -entry[1])
        names = self._container_names() if any(_CONTAINER_CGROUP.fullmatch(os.path.basename(path))
                                               for path, _ in found) else {}
        samples = []
        for path, cpu in found:
            relative = os.path.relpath(path, self._cgroup_root)
            engine, container_id, name = cgroup_identity(relative, names)
            samples.append(pb.ContainerSample(id=container_id[:64], name=name[:64], cpu_percent=round(cpu, 1),
                                              memory_bytes=_read_int(os.path.join(path, "memory.current")) or 0,
                                              pids=_count_lines(os.path.join(path, "cgroup.procs")), engine=engine))
        return samples

    def _container_names(self) -> dict:
        if time.monotonic() - self._engine_names_at >= ENGINE_NAMES_MAX_AGE_S:
            names = {}
            for engine, path in self._engine_sockets:
                for container_id, name in engine_container_names(path).items():
                    names[container_id] = (engine, name)
            self._engine_names, self._engine_names_at = names, time.monotonic()
        return self._engine_names


def counter_rate(new: float, old: float, window: float) -> float:
    """A cumulative counter's rate over window seconds; 0 without a window, or for a counter that
    went back (a device reset, a cgroup recreated): CounterRates' rule, for one counter."""
    return max(new - old, 0) / window if window > 0 else 0.0


def fit_detail(detail: pb.NodeDetail, budget: int) -> int:
    """Cut entries off the longest list until detail serialises to at most budget bytes; how many
    were cut. Each entry is bounded, so this only cuts with absurd numbers of them."""
    fields = ("processes", "mounts", "interfaces", "sensors", "containers")
    total, cut = detail.ByteSize(), 0
    if total <= budget:
        return 0
    sizes = {field: [entry.ByteSize() + 3 for entry in getattr(detail, field)] for field in fields}  # + tag, length
    while total > budget:
        field = max(fields, key=lambda name: len(sizes[name]))
        if not sizes[field]:
            break
        total -= sizes[field].pop()
        cut += 1
    for field in fields:
        del getattr(detail, field)[len(sizes[field]):]
    return cut + fit_detail(detail, budget)  # in case the estimate of the framing was short


def read_mounts() -> list:
    """Every device-backed mount and every tmpfs outside the system's own places, as df shows them."""
    seen, samples = set(), []
    try:
        partitions = psutil.disk_partitions(all=True)
    except OSError:
        return []
    physical = {part.mountpoint for part in psutil.disk_partitions(all=False)}
    for part in partitions:
        system_tmpfs = part.fstype == "tmpfs" and part.mountpoint.startswith(_SYSTEM_MOUNT_PREFIXES)
        if part.mountpoint in seen or not (part.mountpoint in physical or (part.fstype == "tmpfs" and not system_tmpfs)):
            continue
        seen.add(part.mountpoint)
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:  # gone, or not ours to read
            continue
        samples.append(pb.MountUsage(mountpoint=part.mountpoint[:128], device=part.device[:64],
                                     fstype=part.fstype[:16], used_bytes=usage.used, total_bytes=usage.total,
                                     used_percent=clamp_percent(usage.percent)))
    return samples


def read_sensors() -> list:
    """Temperatures and fans, where psutil can read them (Linux hwmon; nothing in most VMs)."""
    samples = []
    for kind, read in ((pb.TEMPERATURE_CELSIUS, getattr(psutil, "sensors_temperatures", None)),
                       (pb.FAN_RPM, getattr(psutil, "sensors_fans", None))):
        try:
            chips = read() if read is not None else {}
        except (OSError, RuntimeError):
            chips = {}
        for chip, readings in sorted(chips.items()):
            for reading in readings:
                samples.append(pb.SensorReading(kind=kind, chip=chip[:32], label=(reading.label or "")[:32],
                                                value=float(reading.current or 0.0),
                                                high=float(getattr(reading, "high", None) or 0.0),
                                                critical=float(getattr(reading, "critical", None) or 0.0)))
    return samples


def cgroup2_root() -> str:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or .../unified on a hybrid host); '' if nowhere."""
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "cgroup2":
                    return fields[1]
    except OSError:
        pass
    return ""


def cgroups_with_processes(root: str, limit: int) -> list[str]:
    """cgroup directories below root that hold processes of their own, visiting at most limit directories."""
    found, pending, visited = [], [root], 0
    while pending and visited < limit:
        path = pending.pop()
        visited += 1
        try:
            with os.scandir(path) as entries:
                pending.extend(entry.path for entry in entries if entry.is_dir(follow_symlinks=False))
        except OSError:
            continue
        if path != root and _count_lines(os.path.join(path, "cgroup.procs")):
            found.append(path)
    return found


def cgroup_identity(relative: str, names: dict) -> tuple[str, str, str]:
    """(engine, id, name) of a cgroup path relative to the root: a container, a systemd unit or a plain group."""
    base = os.path.basename(relative)
    match = _CONTAINER_CGROUP.fullmatch(base)
    if match:
        container_id = match.group(2)
        engine, name = names.get(container_id, ({"libpod": "podman", "cri-containerd": "containerd",
                                                 "crio": "cri-o"}.get(match.group(1) or "", "docker"), ""))
        return engine, container_id, name or container_id[:12]
    if base.endswith((".service", ".scope", ".slice")):
        return "systemd", relative, base
    return "cgroup", relative, relative


def _read_cgroup_usage_usec(path: str) -> int | None:
    try:
        with open(os.path.join(path, "cpu.stat")) as file:
            for line in file:
                if line.startswith("usage_usec "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return None


def _count_lines(path: str) -> int:
    try:
        with open(path) as file:
            return sum(1 for line in file if line.strip())
    except OSError:
        return 0


def engine_container_names(socket_path: str, timeout: float = 0.5) -> dict[str, str]:
    """Container ID -> name from a Docker or Podman Engine API on its unix socket (GET
    /containers/json, stdlib HTTP); {} when there is none or it does not answer in time."""
    if not os.path.exists(socket_path):
        return {}
    import http.client  # here, not at the top: only hosts with a container engine pay for it
    connection = unix_http_connection_type()(socket_path, timeout)
    try:
        connection.request("GET", "/containers/json", headers={"Host": "localhost"})
        response = connection.getresponse()
        if response.status != 200:
            return {}
        containers = json.loads(response.read(4 * 1024 * 1024))
        return {str(entry["Id"]): str((entry.get("Names") or [""])[0]).lstrip("/")
                for entry in containers if isinstance(entry, dict) and "Id" in entry}
    except (OSError, ValueError, KeyError, TypeError, http.client.HTTPException):
        return {}
    finally:
        connection.close()


@functools.lru_cache(maxsize=None)
def unix_http_connection_type() -> type:
    """http.client.HTTPConnection over a unix socket, where the Docker and Podman APIs listen."""
    import http.client

    class UnixHTTPConnection(http.client.HTTPConnection):
        def __init__(self, socket_path: str, timeout: float):
            super().__init__("localhost", timeout=timeout)
            self._socket_path = socket_path

        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            self.sock.connect(self._socket_path)
    return UnixHTTPConnection


# ---------------------------------------------------------------------------
# 3. Node and NodeRegistry: the orchestrator's state, behind one lock: the gRPC
#    loop applies joins and heartbeats while the UI thread takes snapshots and edits.
#    Holds: NodeStatus, events (EventLog), refusals (RefusalReason, Refusal),
#    NodeHistory (the live 60 s), alert rules, Node, NodeRegistry, the inventory
#    file (StateFile) and the SQLite history (HistoryStore), each disk writer on
#    its own thread. Talks to: 1, 2 (Metrics). Later sections reach it only
#    through the registry's methods and its named hooks (on_sample,
#    history_sink, on_forget, EventLog.subscribe).
# ---------------------------------------------------------------------------

class NodeStatus(enum.Enum):
    """Where a node stands, as the dashboard, `status` and /metrics show it."""

    JOINING = "Joining"            # its heartbeat stream is bound; no sample accepted yet
    ACTIVE = "Active"              # its stream delivers accepted samples
    DISCONNECTED = "Disconnected"  # it left, or was lost: its stream ended, or it went silent
    MISSING = "Missing"            # known before the orchestrator restarted, not seen since

    def __init__(self, words: str):
        # True while the node has a bound stream the liveness sweep watches. An attribute, not a
        # property: the sweep and every heartbeat read it, 10,000 times a pass (a property was
        # 9 % of the gRPC loop's busy time at 10,000 nodes).
        self.live = words in ("Joining", "Active")

    @property
    def wire(self) -> int:
        """NodeStatus.state on the wire (the NodeState enum of cluster.proto)."""
        return _STATUS_ON_THE_WIRE[self]

    @staticmethod
    def of_row(state: int, text: str) -> "NodeStatus | None":
        """A status row's status: its state, or from an orchestrator older than the field, its
        words; None for what neither says (a newer orchestrator's new state)."""
        for status, wire in _STATUS_ON_THE_WIRE.items():
            if (state and wire == state) or (not state and status.value == text):
                return status
        return None


_STATUS_ON_THE_WIRE = {NodeStatus.JOINING: pb.NODE_STATE_JOINING, NodeStatus.ACTIVE: pb.NODE_STATE_ACTIVE,
                       NodeStatus.DISCONNECTED: pb.NODE_STATE_DISCONNECTED, NodeStatus.MISSING: pb.NODE_STATE_MISSING}


class Level(enum.IntEnum):
    """How much an event matters. The values are syslog priorities: journald reads them from a
    line's "<N>" prefix."""

    ERROR = 3
    WARN = 4
    INFO = 6


class EventKind(enum.Enum):
    """What an event is about. The node events (joined ... missing) are what --on-event hooks
    receive as CARES_EVENT."""

    JOINED = "joined"
    REJOINED = "rejoined"
    LEFT = "left"
    LOST = "lost"
    THRESHOLD = "threshold"
    RECOVERED = "recovered"
    MISSING = "missing"
    REFUSED = "refused"  # a join, stream or status request turned away
    NOTICE = "notice"    # anything else the orchestrator or a worker has to say


@dataclasses.dataclass(frozen=True)
class Event:
    at: float  # wall clock, Unix seconds
    level: Level
    text: str
    kind: EventKind = EventKind.NOTICE
    node_id: str = ""
    # For machine-readable logs and hooks: the node's host name, address and latest values.
    values: dict = dataclasses.field(default_factory=dict)


class EventLog:
    """A bounded, thread-safe list of events. Listeners run on the thread that adds the event (often
    the gRPC loop), so they must only hand the event on (to a queue), never write or wait."""

    def __init__(self, size: int = EVENT_LOG_SIZE):
        self._lock = threading.Lock()
        self._events: collections.deque[Event] = collections.deque(maxlen=size)
        self._listeners: list = []

    def add(self, level: Level, text: str, kind: EventKind = EventKind.NOTICE, node_id: str = "",
            values: dict | None = None) -> Event:
        event = Event(time.time(), level, text, kind, node_id, values or {})
        with self._lock:
            self._events.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must not break the join or heartbeat that logged
                pass
        return event

    def subscribe(self, listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def tail(self, count: int, node_id: str | None = None) -> list[Event]:
        """The newest count events, oldest first; only one node's with node_id."""
        with self._lock:
            if count <= 0:
                return []
            if node_id is None:
                return list(self._events)[-count:]
            return [event for event in self._events if event.node_id == node_id][-count:]


def format_event(event: Event, clock: str = "%H:%M:%S") -> str:
    return f"{time.strftime(clock, time.localtime(event.at))} [{event.level.name}] {event.text}"


class PeerRequest(str, enum.Enum):
    """What a peer asked for when it was refused: the first part of a refusal's count key and log line."""

    JOIN = "join"
    HEARTBEAT_STREAM = "heartbeat stream"
    STATUS_REQUEST = "status request"

    @property
    def is_join(self) -> bool:
        """A node is refused at its join or when its stream is bound (the cluster is full, the ID
        is taken, the join expired): /metrics counts both as refused joins."""
        return self in (PeerRequest.JOIN, PeerRequest.HEARTBEAT_STREAM)


class RefusalReason(enum.Enum):
    """Why a peer was turned away, and everything about telling it: the one table of refusals.

    label: the reason label of /metrics' counters and of the cares-refusal trailing metadata
    every refused call carries; code: the gRPC status it is answered with; words: how the log
    and its summaries say it; is_join: counted in cares_joins_refused_total; told_in_full: about
    the request itself (which ID, which rule), so logged with the message the peer gets; http:
    the HTTP status /metrics and /sd answer it with (0 where it cannot happen there)."""

    # label, gRPC code, words, is_join, told_in_full, http
    WRONG_TOKEN = ("wrong_token", grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token", True, False, 401)
    THROTTLED = ("throttled", grpc.StatusCode.UNAUTHENTICATED, "too many wrong tokens from this address",
                 True, False, 429)
    # a bad node ID, labels or secret
    INVALID_JOIN = ("invalid_join", grpc.StatusCode.INVALID_ARGUMENT, "invalid join", True, True, 0)
    ID_IN_USE = ("id_in_use", grpc.StatusCode.ALREADY_EXISTS, "node ID already connected", True, True, 0)
    ID_OWNED = ("id_owned", grpc.StatusCode.PERMISSION_DENIED, "node ID belongs to another worker", True, True, 0)
    CLUSTER_FULL = ("cluster_full", grpc.StatusCode.RESOURCE_EXHAUSTED, "cluster full", True, True, 0)
    # a stream for a join that does not exist (or expired)
    NO_SESSION = ("no_session", grpc.StatusCode.PERMISSION_DENIED, "no joined session", True, False, 0)
    # samples on a stream the orchestrator already ended
    SESSION_ENDED = ("session_ended", grpc.StatusCode.FAILED_PRECONDITION, "session already ended", False, False, 0)
    WRONG_NODE = ("wrong_node", grpc.StatusCode.PERMISSION_DENIED, "metrics for another node", False, False, 0)
    # joined but never opened its stream within the silence limit: counted, never answered
    JOIN_EXPIRED = ("join_expired", grpc.StatusCode.DEADLINE_EXCEEDED, "no heartbeat stream after the join",
                    True, False, 0)
    # samples far faster than one per heartbeat interval
    SAMPLE_FLOOD = ("sample_flood", grpc.StatusCode.RESOURCE_EXHAUSTED, "flooded the orchestrator with samples",
                    False, True, 0)
    # `status NODE --top/--history` for a node the orchestrator does not know
    UNKNOWN_NODE = ("unknown_node", grpc.StatusCode.NOT_FOUND, "no such node", False, True, 0)
    # a status request asking for what cannot be (a history range)
    BAD_REQUEST = ("bad_request", grpc.StatusCode.INVALID_ARGUMENT, "bad request", False, True, 0)

    def __init__(self, label: str, code: grpc.StatusCode, words: str, is_join: bool, told_in_full: bool, http: int):
        self.label, self.code, self.words = label, code, words
        self.is_join, self.told_in_full, self.http = is_join, told_in_full, http

    @classmethod
    def from_label(cls, label: str) -> "RefusalReason | None":
        return next((reason for reason in cls if reason.label == label), None)


# The trailing metadata a refused call carries its reason in (RefusalReason.label): a client
# knows why without reading the message, which is for people.
REFUSAL_METADATA_KEY = "cares-refusal"


class Refusal(Exception):
    """The one way cares turns a peer away: the reason (which says how to answer, count and log
    it) and one line for the peer."""

    def __init__(self, reason: RefusalReason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def code(self) -> grpc.StatusCode:
        return self.reason.code


def refusal_reason(error) -> RefusalReason | None:
    """The reason of a refused gRPC call, from its cares-refusal trailing metadata; None when the
    call was not refused by cares (or by an orchestrator older than the metadata)."""
    try:
        metadata = error.trailing_metadata() or ()
    except Exception:  # not a call error, or one without metadata
        return None
    for key, value in metadata:
        if key == REFUSAL_METADATA_KEY:
            return RefusalReason.from_label(value if isinstance(value, str) else value.decode("ascii", "replace"))
    return None


class RepeatSummary:
    """Say a thing once, then count its repeats and say how many once per window: a flood of the
    same refusal or error becomes a line per window instead of a line per event. Keys beyond
    max_keys are counted together under None, so a flood from many sources stays bounded too."""

    def __init__(self, window_s: float, max_keys: int = 1000):
        self.window_s = window_s
        self._max_keys = max_keys
        self._open: dict = {}  # key -> [window start (monotonic), repeats since]

    def note(self, key, now: float) -> bool:
        """Count one occurrence; True when it is the first in a while (say it now)."""
        entry = self._open.get(key)
        if entry is None and len(self._open) >= self._max_keys:
            key, entry = None, self._open.setdefault(None, [now, 0])
        if entry is not None:
            entry[1] += 1
            return False
        self._open[key] = [now, 0]
        return True

    def due(self, now: float) -> list[tuple]:
        """(key, repeats, seconds) for every window that ended with repeats; quiet keys are forgotten."""
        summaries = []
        for key, (started, repeats) in list(self._open.items()):
            if now - started < self.window_s:
                continue
            if repeats:
                summaries.append((key, repeats, now - started))
                self._open[key] = [now, 0]
            else:
                del self._open[key]
        return summaries


class RefusalLog:
    """Refusals counted for /metrics and logged sparingly: the first from a source at once, repeats
    as one summary line per window (flush): wrong-token floods must not bury the event log or fill
    the disk. Thread-safe (refusals come from the gRPC loop and the /metrics thread)."""

    def __init__(self, events: EventLog):
        self._lock = threading.Lock()
        self._events = events
        self.summary = RepeatSummary(REFUSAL_SUMMARY_S)
        self._counts: collections.Counter = collections.Counter()  # (PeerRequest, RefusalReason) -> n

    def add(self, source: str, what: PeerRequest, refusal: Refusal) -> None:
        what = PeerRequest(what)
        with self._lock:
            self._counts[(what, refusal.reason)] += 1
            first = self.summary.note((source, what, refusal.reason), time.monotonic())
        if first:
            said = refusal.message if refusal.reason.told_in_full else refusal.reason.words
            self._events.add(Level.WARN, f"{what.value.capitalize()} from {source} refused: {said}.",
                             EventKind.REFUSED)

    def counts(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def flush(self) -> None:
        """Log one summary line per source and reason whose window ended with repeats."""
        with self._lock:
            due = self.summary.due(time.monotonic())
        for key, repeats, seconds in due:
            if key is None:
                text = f"{repeats} more refusals from other sources in the last {seconds:.0f} s."
            else:
                source, what, reason = key
                text = f"{repeats} {what.value}s refused from {source} in the last {seconds:.0f} s: {reason.words}."
            self._events.add(Level.WARN, text, EventKind.REFUSED)


_GRAPHED_VALUES = operator.attrgetter("cpu_percent", "memory_percent", "net_receive_bytes_per_s",
                                      "net_transmit_bytes_per_s")


class NodeHistory:
    """A node's last HISTORY_SAMPLES points of CPU, memory and network, one per heartbeat interval
    (a sender faster than asked replaces the newest point instead of adding one). Kept in 4-byte
    arrays: 10,000 nodes' graphs as float objects were 80 MB and slowed the garbage collector."""

    __slots__ = ("series", "started_at")

    def __init__(self, series: tuple | None = None, started_at: float = -math.inf):
        self.series = series or tuple(array.array("f") for _ in range(4))  # cpu, memory, in, out
        self.started_at = started_at

    cpu = property(lambda self: self.series[0])
    memory = property(lambda self: self.series[1])
    net_receive = property(lambda self: self.series[2])
    net_transmit = property(lambda self: self.series[3])

    def add(self, metrics: Metrics, now: float, period: float) -> None:
        values = _GRAPHED_VALUES(metrics)
        if None in values:
            values = [math.nan if value is None else value for value in values]
        if now - self.started_at < 0.9 * period and self.series[0]:
            for series, value in zip(self.series, values):
                series[-1] = value
            return
        self.started_at = now
        full = len(self.series[0]) >= HISTORY_SAMPLES
        for series, value in zip(self.series, values):
            if full:
                del series[0]
            series.append(value)

    def copy(self) -> "NodeHistory":
        return NodeHistory(tuple(array.array("f", series) for series in self.series), self.started_at)


# --alert names, and the Metrics field each one watches.
class AlertMetric(enum.Enum):
    """What an --alert rule watches: its name on the command line, the Metrics field it reads,
    and the unit its limit is written in."""

    CPU = ("cpu", "cpu_percent", "%")
    MEMORY = ("memory", "memory_percent", "%")
    SWAP = ("swap", "swap_percent", "%")
    DISK = ("disk", "root_fs_used_percent", "%")
    LOAD = ("load", "load_average_1m", "")

    def __init__(self, word: str, field: str, unit: str):
        self.word, self.field, self.unit = word, field, unit


ALERT_RULE = "an alert is METRIC>LIMIT:DURATION or METRIC<LIMIT:DURATION, METRIC one of " + \
    ", ".join(metric.word for metric in AlertMetric) + ", e.g. cpu>90:60s or disk>95:5m"


@dataclasses.dataclass(frozen=True)
class AlertRule:
    """--alert cpu>90:60s: a node whose metric stays beyond the limit for the duration raises a
    threshold event; going back raises recovered. One event per crossing, never one per sample."""

    metric: AlertMetric
    above: bool
    limit: float
    duration_s: float

    def value(self, metrics: Metrics) -> float | None:
        return getattr(metrics, self.metric.field)

    def crossed(self, value: float) -> bool:
        return value > self.limit if self.above else value < self.limit

    def describe(self) -> str:
        return f"{self.metric.word} {'>' if self.above else '<'} {self.limit:g}{self.metric.unit}"


def follow_alert_rules(rules, node, metrics: Metrics, now: float) -> list[tuple]:
    """Follow each alert rule for a node's accepted sample (under the registry's lock): the
    threshold and recovered events to raise (NodeRegistry.announce) for the rules whose state changed."""
    said = []
    for rule in rules:
        value = rule.value(metrics)
        if value is None:
            continue
        shown = f"{value:g}{rule.metric.unit}"
        if rule.crossed(value):
            since = node.alert_since.setdefault(rule, now)
            if rule not in node.alerting and now - since >= rule.duration_s:
                node.alerting = node.alerting | {rule}
                said.append((Level.WARN, f"Node '{node.node_id}': {rule.describe()} for "
                                         f"{format_duration(rule.duration_s)} (now {shown}).",
                             EventKind.THRESHOLD, node.node_id, node.event_values()))
        else:
            node.alert_since.pop(rule, None)
            if rule in node.alerting:
                node.alerting = node.alerting - {rule}
                said.append((Level.INFO, f"Node '{node.node_id}' recovered: no longer {rule.describe()} (now {shown}).",
                             EventKind.RECOVERED, node.node_id, node.event_values()))
    return said


def parse_alert(text: str) -> AlertRule:
    match = re.fullmatch(r"\s*([a-z]+)\s*([<>])\s*([0-9]+(?:\.[0-9]+)?)%?\s*:\s*(\S+)\s*", text)
    metric = next((metric for metric in AlertMetric if match and metric.word == match.group(1)), None)
    if metric is None:
        raise ValueError(ALERT_RULE)
    return AlertRule(metric, match.group(2) == ">", float(match.group(3)), parse_duration(match.group(4)))


@dataclasses.dataclass(frozen=True)
class DetailOffer:
    """What a worker shares when asked for detail (NodeInfo.detail_offer)."""

    processes: bool = True  # false: it runs with --no-processes
    command_lines: bool = False  # true: it runs with --share-cmdlines


class NodeEvent(enum.Enum):
    """What happens to a node that may change its status (see NODE_TRANSITIONS)."""

    STREAM_BOUND = "stream bound"      # its heartbeat stream is bound to its join
    FIRST_SAMPLE = "first sample"      # the first accepted sample of a node never heard before
    SAMPLE_AGAIN = "sample again"      # the first accepted sample of a stream, from a node heard before
    GOODBYE = "goodbye"                # it said it is leaving, and its stream ended
    STREAM_ENDED = "stream ended"      # its stream ended without a goodbye
    SILENT = "silent"                  # no accepted sample for the silence limit
    RESTORED = "restored"              # known from the state file when the orchestrator started
    NOT_BACK = "not back"              # restored, and not rejoined within the silence limit


@dataclasses.dataclass(frozen=True)
class Transition:
    status: NodeStatus  # the status it moves to
    kind: EventKind | None = None  # the event it raises (None: none)
    level: Level = Level.INFO
    message: str = ""  # with {node_id} and {why}
    left: bool = False  # Disconnected on purpose


_LEFT = Transition(NodeStatus.DISCONNECTED, EventKind.LEFT, Level.INFO, "Node '{node_id}' has left the cluster.",
                   left=True)
_LOST = Transition(NodeStatus.DISCONNECTED, EventKind.LOST, Level.WARN, "Node '{node_id}' lost: {why}.")
# Every status change a node can go through, and what is said about it: (status, event) -> what
# follows. apply_transition applies it; a pair not listed changes nothing (an ended
# stream of a node already Disconnected, a sample from an Active node).
NODE_TRANSITIONS = {
    **{(status, NodeEvent.STREAM_BOUND): Transition(NodeStatus.JOINING) for status in NodeStatus},
    (NodeStatus.JOINING, NodeEvent.FIRST_SAMPLE): Transition(NodeStatus.ACTIVE, EventKind.JOINED, Level.INFO,
                                                             "Node '{node_id}' has joined the cluster."),
    (NodeStatus.JOINING, NodeEvent.SAMPLE_AGAIN): Transition(NodeStatus.ACTIVE, EventKind.REJOINED, Level.INFO,
                                                             "Node '{node_id}' has rejoined the cluster."),
    **{(status, event): transition for status in (NodeStatus.JOINING, NodeStatus.ACTIVE)
       for event, transition in ((NodeEvent.GOODBYE, _LEFT), (NodeEvent.STREAM_ENDED, _LOST),
                                 (NodeEvent.SILENT, _LOST))},
    (NodeStatus.JOINING, NodeEvent.RESTORED): Transition(NodeStatus.MISSING),  # a new row, from the file
    (NodeStatus.MISSING, NodeEvent.NOT_BACK): Transition(
        NodeStatus.MISSING, EventKind.MISSING, Level.WARN,
        "Node '{node_id}' is missing: not seen since the orchestrator restarted."),
}


@dataclasses.dataclass
class Node:
    """One worker as the orchestrator knows it."""

    node_id: str
    address: str = ""  # HOST:PORT of its latest stream, as the orchestrator sees the peer
    hostname: str = ""
    labels: dict = dataclasses.field(default_factory=dict)
    platform: str = ""
    version: str = ""
    cpu_count: int = 0
    memory_total_bytes: int = 0
    status: NodeStatus = NodeStatus.JOINING
    joined_at: float = 0.0  # wall clock of the first join, Unix seconds
    last_seen: float = 0.0  # wall clock of the last accepted sample; 0 before the first
    gone_at: float = 0.0  # wall clock of its last disconnect (or of the restart that made it Missing)
    metrics: Metrics | None = None  # the last accepted sample; None before the first
    history: NodeHistory | None = dataclasses.field(default_factory=NodeHistory, repr=False)
    # Liveness, session and ownership bookkeeping; never shown.
    session_id: str = dataclasses.field(default="", repr=False)
    heard_at: float = dataclasses.field(default=0.0, repr=False)  # LoopClock time of the last accepted sample
    last_sequence: int = dataclasses.field(default=0, repr=False)
    streaming: bool = dataclasses.field(default=False, repr=False)
    dropped_samples: int = dataclasses.field(default=0, repr=False)  # rejected since the last accepted one
    drop_reason: str = dataclasses.field(default="", repr=False)
    owner_digest: bytes = dataclasses.field(default=b"", repr=False)  # sha256 of the claiming worker's secret
    left: bool = False  # its last disconnect was a goodbye, not a loss
    # ID, host and labels in lower case, for the dashboard's filter (set with them, read every redraw)
    search_text: str = dataclasses.field(default="", repr=False)
    alerting: frozenset = frozenset()  # the AlertRules it is beyond now (replaced, never mutated)
    alert_since: dict = dataclasses.field(default_factory=dict, repr=False)  # AlertRule -> monotonic start
    detail_offer: DetailOffer | None = None  # None: its worker cannot send detail (older than 0.4)
    # The latest NodeDetail it sent while asked, as it came off the wire: made safe where it is
    # shown (safe_detail), so the gRPC loop pays nothing for it; wall-clock time it arrived.
    detail: object = dataclasses.field(default=None, repr=False)
    detail_at: float = 0.0

    def copy(self, with_history: bool = True) -> "Node":
        """A detached, read-only copy for another thread, with a copy of its graphs or none.
        One dict copy, a single step under the GIL, taken without the registry's lock: the fields
        are those of one moment, but that moment may fall between two assignments of a heartbeat
        (its metrics new, its last-seen time not yet), and the graphs, copied a step later, may
        hold one sample more. Good enough to draw and to scrape: the next copy is whole again.
        dataclasses.replace took 4 us a node, this under 1."""
        clone = object.__new__(Node)
        fields = self.__dict__.copy()
        fields["history"] = self.history.copy() if with_history and self.history is not None else None
        clone.__dict__ = fields
        return clone

    def event_values(self) -> dict:
        """What an event about this node carries for JSON logs and hooks."""
        metrics = self.metrics or Metrics()
        return {"hostname": self.hostname, "address": self.address,
                "cpu_percent": metrics.cpu_percent, "memory_percent": metrics.memory_percent}


def apply_transition(node: Node, event: NodeEvent, why: str = "") -> tuple | None:
    """Apply NODE_TRANSITIONS to a node (under the registry's lock); the event to raise once the
    lock is released (NodeRegistry.announce), or None when the table has none."""
    transition = NODE_TRANSITIONS.get((node.status, event))
    if transition is None:
        return None
    node.status = transition.status
    if transition.status is NodeStatus.DISCONNECTED:
        node.gone_at, node.left = time.time(), transition.left
        node.alert_since, node.alerting = {}, frozenset()
    elif transition.status is NodeStatus.JOINING:
        node.left = False
    if transition.kind is None:
        return None
    return (transition.level, transition.message.format(node_id=node.node_id, why=why), transition.kind,
            node.node_id, node.event_values())


_PERCENT_INDEXES = tuple(index for index, name in enumerate(METRIC_NAMES) if name in PERCENT_METRICS)
_OTHER_INDEXES = tuple(index for index, name in enumerate(METRIC_NAMES) if name not in PERCENT_METRICS)


# What a worker says about itself when it joins (NodeInfo, already made safe to show): these
# fields of a Node, declared once there; a bound stream copies them onto its node.
JOIN_FIELDS = ("hostname", "labels", "platform", "version", "cpu_count", "memory_total_bytes", "detail_offer")
JoinInfo = dataclasses.make_dataclass(
    "JoinInfo", [(field.name, field.type, dataclasses.field(default=field.default, default_factory=field.default_factory))
                 for field in dataclasses.fields(Node) if field.name in JOIN_FIELDS], frozen=True)
JoinInfo.__module__ = __name__


def search_text(node: Node) -> str:
    """What the dashboard's filter looks in: ID, host name and KEY=VALUE labels, in lower case."""
    return "\n".join([node.node_id, node.hostname, *(f"{key}={value}" for key, value in node.labels.items())]).lower()


def metrics_problem(metrics: Metrics) -> str | None:
    """Why a sample cannot be true (NaN, a percentage outside 0-100, a negative or infinite size
    or rate), or None. Comparisons written so that NaN fails them; this runs for every heartbeat."""
    if metrics.cpu_percent is None or metrics.memory_percent is None:
        return "no CPU or memory value"
    for index in _PERCENT_INDEXES:
        value = metrics[index]
        if value is not None and not 0.0 <= value <= 100.0:
            return f"{METRIC_NAMES[index]} outside 0-100"
    for index in _OTHER_INDEXES:
        value = metrics[index]
        if value is not None and not 0.0 <= value < math.inf:
            return f"{METRIC_NAMES[index]} is not a finite, non-negative number"
    return None


class LoopClock:
    """Monotonic time that does not count the orchestrator's own stalls.

    Silence is judged on this clock. The liveness sweep ticks it every period; when a tick comes
    late (the loop was stalled: a pause, a swap storm, a long snapshot), the lateness is credited,
    so every node gets that much more grace instead of all of them being declared lost at once.
    """

    monotonic = staticmethod(time.monotonic)  # what it counts on (a test gives it a clock of its own)

    def __init__(self):
        self._credit = 0.0
        self._last_tick: float | None = None
        # The highest the clock read before it stepped back (see expire).
        self.stepped_back_from = -math.inf

    def now(self) -> float:
        return self.monotonic() - self._credit

    def tick(self, period: float) -> float:
        """Note one sweep; return how late it was (seconds credited as a stall), 0 if on time."""
        now = self.monotonic()
        late = 0.0 if self._last_tick is None else now - self._last_tick - period
        self._last_tick = now
        if late <= max(STALL_TOLERANCE_S, period / 2):
            return 0.0
        self.stepped_back_from = max(self.stepped_back_from, now - self._credit)
        self._credit += late
        return late


@dataclasses.dataclass
class PendingJoin:
    """A join whose heartbeat stream has not been bound yet. It makes no row and holds no
    --max-nodes slot; it expires after the silence limit."""

    session_id: str
    node_id: str
    address: str
    info: JoinInfo
    digest: bytes
    expires_at: float  # LoopClock time

    def bind(self, node: Node, now: float) -> None:
        """The node takes this join's identity and session (under the registry's lock): Joining,
        heard from now, and blank until its first sample, since what it measured before it went
        away is not how it is now."""
        node.address = self.address
        for name in JOIN_FIELDS:
            setattr(node, name, getattr(self.info, name))
        node.search_text = search_text(node)
        node.owner_digest = node.owner_digest or self.digest
        apply_transition(node, NodeEvent.STREAM_BOUND)
        node.alert_since, node.alerting = {}, frozenset()
        node.session_id, node.streaming = self.session_id, True
        node.heard_at, node.last_sequence = now, 0
        node.dropped_samples, node.drop_reason = 0, ""
        node.metrics = None


def check_claim(node: Node, digest: bytes) -> None:
    """Refuse a join or stream for a node whose ID belongs to another secret, or that is
    streaming and not provably the same worker (which may take its place)."""
    if node.owner_digest and not compare_digest(node.owner_digest, digest):
        raise Refusal(RefusalReason.ID_OWNED,
                      f"node ID '{node.node_id}' belongs to another worker (a different node secret); "
                      f"pick another with --node-id")
    if node.streaming and not node.owner_digest:
        raise Refusal(RefusalReason.ID_IN_USE,
                      f"node ID '{node.node_id}' is already connected; pick another with --node-id")


class RegistryReads:
    """The reading side of the NodeRegistry, safe from any thread: copies, pages, counts. What
    changes the nodes (joins, samples, the sweep, forgetting) is NodeRegistry's."""

    def __init__(self):
        self._lock = threading.Lock()
        self._nodes: dict[str, Node] = {}
        self._sorted_ids: list[str] | None = None  # cache for paging, dropped when IDs change

    def snapshot(self, with_history: bool = True) -> list[Node]:
        """Copies of every node, safe to read on another thread. Only the list is taken under the
        lock; the copies are made outside it (Node.copy says how consistent each one is), so the
        heartbeats of 10,000 nodes never wait the 10-20 ms the copies take."""
        with self._lock:
            nodes = list(self._nodes.values())
        return [node.copy(with_history) for node in nodes]

    def nodes_now(self) -> list[Node]:
        """The nodes themselves in a new list, not copies: for a screen that reads a few fields of
        each and writes none. Each field is read as it is at that moment, as a copy's are (Node.copy
        says how consistent that is). Nothing is made per node: the dashboard's copies, kept from
        one redraw to the next, were 2,000 objects a second at 1,000 nodes that the garbage
        collector scanned and promoted, twice as many collections as a headless orchestrator's,
        most of them on the gRPC loop."""
        with self._lock:
            return list(self._nodes.values())

    def page(self, after_node_id: str, limit: int) -> tuple[list[Node], int]:
        """Up to limit nodes after after_node_id in node ID order (copies without graphs), and the total."""
        with self._lock:
            if self._sorted_ids is None:
                self._sorted_ids = sorted(self._nodes)
            start = bisect.bisect_right(self._sorted_ids, after_node_id) if after_node_id else 0
            chosen = [self._nodes[node_id] for node_id in self._sorted_ids[start:start + limit]]
            total = len(self._nodes)
        return [node.copy(False) for node in chosen], total

    def histories(self, node_ids) -> dict[str, NodeHistory]:
        """Copies of the graphs of just these nodes (the rows a screen shows)."""
        with self._lock:
            return {node_id: self._nodes[node_id].history.copy() for node_id in node_ids if node_id in self._nodes}

    def get(self, node_id: str) -> Node | None:
        with self._lock:
            node = self._nodes.get(node_id)
            return node.copy() if node is not None else None

    def status_counts(self) -> dict[NodeStatus, int]:
        with self._lock:
            counts = collections.Counter(node.status for node in self._nodes.values())
        return {status: counts.get(status, 0) for status in NodeStatus}

    def __len__(self) -> int:
        with self._lock:
            return len(self._nodes)

    def inventory(self) -> list[dict]:
        """What the state file keeps of every node: who it is, not how it is doing. Only the list
        is taken under the lock (as snapshot() does): the state writer builds 10,000 records in 9 ms,
        which heartbeats must not wait for."""
        with self._lock:
            nodes = list(self._nodes.values())
        return [{"node_id": node.node_id, "hostname": node.hostname, "labels": node.labels,
                 "platform": node.platform, "version": node.version, "cpu_count": node.cpu_count,
                 "memory_total_bytes": node.memory_total_bytes, "address": node.address,
                 "joined_at": node.joined_at, "last_seen": node.last_seen, "owner": node.owner_digest.hex()}
                for node in nodes]

    def latest_detail(self, node_id: str) -> tuple:
        """(the node's latest NodeDetail as sent, when it arrived), or (None, 0.0)."""
        with self._lock:
            node = self._nodes.get(node_id)
            return (node.detail, node.detail_at) if node is not None else (None, 0.0)


class NodeRegistry(RegistryReads):
    """Every worker that joined, keyed by node ID, behind one lock.

    A join only reserves a session; the node appears (Joining) when its heartbeat stream is
    bound and turns Active at its first accepted sample. Only accepted samples count as being
    heard from: a node whose samples are all rejected goes silent and is lost like any other.
    """

    def __init__(self, *, max_nodes: int = DEFAULT_MAX_NODES,
                 heartbeat_interval: float = DEFAULT_HEARTBEAT_MS / 1000.0):
        super().__init__()
        self._pending: dict[str, PendingJoin] = {}  # by node ID: one pending join per node
        # The streaming nodes, the one heard from longest ago first: the sweep reads only the
        # silent ones and stops at the first that is not (a scan of all 10,000 held the loop
        # 0.7 ms on an idle machine, ~20 ms on a loaded one).
        self._by_heard: collections.OrderedDict[str, Node] = collections.OrderedDict()
        self.max_nodes = max_nodes
        self.heartbeat_interval = heartbeat_interval
        self.clock = LoopClock()
        self.events = EventLog()
        self.refusals = RefusalLog(self.events)
        # Counters for /metrics, only ever increased.
        self.heartbeats_received = 0
        self.samples_dropped = 0
        self.joins_accepted = 0
        # The hook for tools that watch cares from inside the process (the bench): called on the
        # gRPC loop after each accepted sample, outside the lock, as on_sample(node_id, metrics, sent_at_ms).
        self.on_sample = None
        # History (HistoryStore.add): called the same way with (node_id, metrics); and the IDs of
        # forgotten nodes go to on_forget, so their history goes with them.
        self.history_sink = None
        self.on_forget = None
        self.alert_rules: tuple = ()
        # Inventory bookkeeping: a change count the state file follows, and the nodes restored
        # from it that have not been announced missing yet.
        self.changes = 0
        self._restored_at: float | None = None
        self._unannounced: set[str] = set()
        self.detail_watch = DetailWatch()

    @property
    def silence_limit(self) -> float:
        return MISSED_HEARTBEATS * self.heartbeat_interval

    # -- joining and streams ------------------------------------------------

    def announce(self, *said) -> None:
        """Raise the events apply_transition returned (outside the lock: listeners run here)."""
        for event in said:
            if event is not None:
                self.events.add(*event)

    def join(self, node_id: str, address: str, info: JoinInfo, secret: str = "") -> str:
        """Reserve a session for a node and return its ID; Refusal when the ID is another's."""
        if not is_valid_node_id(node_id):
            raise Refusal(RefusalReason.INVALID_JOIN,
                          f"invalid node ID '{sanitize_text(node_id, 40)}': {NODE_ID_RULE}")
        if len(secret) > 256:
            raise Refusal(RefusalReason.INVALID_JOIN, "node secret too long")
        digest = sha256(secret.encode()).digest() if secret else b""
        pending = PendingJoin(random_hex(16), node_id, address, info, digest,
                              self.clock.now() + self.silence_limit)
        with self._lock:
            node = self._nodes.get(node_id)
            if node is not None:
                check_claim(node, digest)
            self._pending.pop(node_id, None)
            if len(self._pending) >= PENDING_JOINS_LIMIT:
                del self._pending[next(iter(self._pending))]  # the oldest: a genuine worker simply joins again
            self._pending[node_id] = pending
            self.joins_accepted += 1
        return pending.session_id

    def attach_stream(self, node_id: str, session_id: str) -> str:
        """Bind a heartbeat stream to its join: the node appears, Joining. Returns the session ID
        of a stream this one replaces (the same worker reconnecting before its old stream was
        noticed gone), or ""; Refusal otherwise."""
        with self._lock:
            pending = self._pending.get(node_id)
            # As bytes: a peer's session ID may be any text, and a non-ASCII str makes compare_digest raise.
            if pending is None or not session_id or not compare_digest(pending.session_id.encode(),
                                                                       session_id.encode("utf-8", "replace")):
                raise Refusal(RefusalReason.NO_SESSION,
                              "no joined session for this node; call JoinCluster first, then open the stream "
                              "with that node_id and session_id")
            node = self._nodes.get(node_id)
            if node is not None:
                check_claim(node, pending.digest)
            elif len(self._nodes) >= self.max_nodes and not self._evict_one_locked():
                raise Refusal(RefusalReason.CLUSTER_FULL,
                              f"the cluster is full ({self.max_nodes} nodes)")
            del self._pending[node_id]
            if node is None:
                node = self._nodes[node_id] = Node(node_id, joined_at=time.time())
                self._sorted_ids = None
            replaced = node.session_id if node.streaming else ""
            pending.bind(node, self.clock.now())
            self._heard(node)
            self.changes += 1
            return replaced

    def _heard(self, node: Node) -> None:
        """The node was heard from just now (under the lock): last in the sweep's order."""
        try:
            self._by_heard.move_to_end(node.node_id)
        except KeyError:
            self._by_heard[node.node_id] = node

    def _evict_one_locked(self) -> bool:
        """Make room by forgetting the node that has been gone longest."""
        gone = [node for node in self._nodes.values() if not node.status.live]
        if not gone:
            return False
        del self._nodes[min(gone, key=lambda node: node.gone_at).node_id]
        self._sorted_ids = None
        return True

    def update(self, node_id: str, session_id: str, metrics: Metrics, sequence: int, sent_at_ms: int = 0) -> None:
        """Apply one heartbeat sample. An impossible one is dropped (counted, logged sparingly) and
        does not count as being heard from; Refusal when the session has ended (end the stream)."""
        with self._lock:
            self.heartbeats_received += 1
            node = self._nodes.get(node_id)
            if node is None or node.session_id != session_id or not node.status.live:
                raise Refusal(RefusalReason.SESSION_ENDED,
                              "this session has ended; join again")
            problem = metrics_problem(metrics)
            if problem is None and sequence <= node.last_sequence:
                problem = "sequence number went back"
            if problem is not None:
                self.samples_dropped += 1
                node.dropped_samples += 1
                node.drop_reason = problem
                dropped = node.dropped_samples
            else:
                now = self.clock.now()
                # Heard before (Active in this or an earlier session): its first sample is a rejoin.
                arrival = NodeEvent.SAMPLE_AGAIN if node.last_seen > 0 else NodeEvent.FIRST_SAMPLE
                node.heard_at, node.last_seen, node.last_sequence = now, time.time(), sequence
                self._heard(node)
                node.metrics, node.dropped_samples = metrics, 0
                if metrics.memory_total_bytes:
                    node.memory_total_bytes = int(metrics.memory_total_bytes)
                node.history.add(metrics, now, self.heartbeat_interval)
                alerts = follow_alert_rules(self.alert_rules, node, metrics, time.monotonic()) if self.alert_rules else ()
                joined = apply_transition(node, arrival) if node.status is NodeStatus.JOINING else None
        if problem is not None:
            if _is_power_of_ten(dropped):
                self.events.add(Level.WARN, f"Node '{node_id}' sent a bad sample ({problem}); "
                                            f"{dropped} dropped since its last good one.", node_id=node_id)
            return
        if joined is not None or alerts:
            self.announce(joined, *alerts)
        if self.history_sink is not None:
            self.history_sink(node_id, metrics)
        if self.on_sample is not None:
            try:
                self.on_sample(node_id, metrics, sent_at_ms)
            except Exception:  # instrumentation must never end a worker's stream
                pass

    def disconnect(self, node_id: str, session_id: str, reason: str, *, left: bool = False) -> bool:
        """Mark a session's node Disconnected; False when that session is no longer current."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or node.session_id != session_id:
                return False
            node.streaming = False
            if not node.status.live:
                return False
            said = apply_transition(node, NodeEvent.GOODBYE if left else NodeEvent.STREAM_ENDED, reason)
            self._by_heard.pop(node_id, None)
        self.announce(said)
        return True

    # -- the liveness sweep -----------------------------------------------

    def expire(self) -> list[tuple[str, str]]:
        """Mark streaming nodes with no accepted sample for the silence limit Disconnected, and drop
        joins that never opened their stream; return the expired (node_id, session_id) pairs."""
        now, limit = self.clock.now(), self.silence_limit
        # Heard times are LoopClock readings. A sweep that comes late credits the lateness as a
        # stall, and the clock steps back: samples applied while the sweep was late read ahead of
        # later ones. Until every node heard before the step has been heard again or gone silent,
        # the order nodes were heard in is not that of their heard times: every node is looked at.
        everyone = now <= self.clock.stepped_back_from + limit
        with self._lock:
            stale_joins = [pending for pending in self._pending.values() if pending.expires_at < now]
            for pending in stale_joins:
                del self._pending[pending.node_id]
            silent = []
            for node in self._by_heard.values():
                if now - node.heard_at > limit:
                    silent.append(node)
                elif not everyone:
                    break
            expired, said = [], []
            for node in silent:
                del self._by_heard[node.node_id]
                why = (f"no accepted sample for {limit:.1f} s ({node.dropped_samples} rejected: {node.drop_reason})"
                       if node.dropped_samples else f"no heartbeat for {limit:.1f} s")
                said.append(apply_transition(node, NodeEvent.SILENT, why))
                expired.append((node.node_id, node.session_id))
        for pending in stale_joins:
            self.refusals.add(host_of(pending.address), PeerRequest.JOIN, Refusal(RefusalReason.JOIN_EXPIRED, ""))
        self.announce(*said)
        return expired

    # -- forgetting and reading ----------------------------------------------

    def forget_gone(self, older_than_s: float | None = None) -> int:
        """Forget Disconnected and Missing nodes (gone longer than older_than_s, if given)."""
        cutoff = time.time() - (older_than_s or 0.0)
        with self._lock:
            gone = [node_id for node_id, node in self._nodes.items()
                    if not node.status.live and (older_than_s is None or node.gone_at < cutoff)]
            for node_id in gone:
                del self._nodes[node_id]
            if gone:
                self._sorted_ids = None
                self.changes += 1
        if gone:
            when = "" if older_than_s is None else f" gone for over {format_duration(older_than_s)}"
            self.events.add(Level.INFO, f"Forgot {len(gone)} node(s){when}.")
            if self.on_forget is not None:
                self.on_forget(gone)
        return len(gone)

    # -- the inventory that survives a restart ------------------------------

    def restore(self, records: list[dict]) -> int:
        """Add the nodes a state file remembers as Missing (until they rejoin); returns how many.
        A record that does not hold together is skipped (node_from_record)."""
        restored = [node for node in map(node_from_record, records) if node is not None]
        with self._lock:
            for node in restored[:self.max_nodes]:
                if node.node_id not in self._nodes:
                    self._nodes[node.node_id] = node
                    self._unannounced.add(node.node_id)
            self._sorted_ids = None
            self._restored_at = self.clock.now()
        return len(self._unannounced)

    def announce_missing(self) -> None:
        """Once the restored nodes had MISSED_HEARTBEATS intervals to come back, raise a missing
        event for each one that did not."""
        with self._lock:
            if self._restored_at is None or self.clock.now() - self._restored_at < self.silence_limit:
                return
            said = [apply_transition(self._nodes[node_id], NodeEvent.NOT_BACK)
                    for node_id in sorted(self._unannounced) if node_id in self._nodes]
            self._unannounced.clear()
            self._restored_at = None
        self.announce(*said)

    def counters(self) -> dict:
        """The cumulative counters /metrics exports."""
        with self._lock:
            return {"heartbeats_received": self.heartbeats_received, "samples_dropped": self.samples_dropped,
                    "joins_accepted": self.joins_accepted, "refusals": self.refusals.counts()}

    # -- on-demand detail ---------------------------------------------------

    def detail_watched(self) -> list[str]:
        """Nodes whose detail is asked for now and whose workers can send it."""
        watched = self.detail_watch.watched()
        with self._lock:
            return [node_id for node_id in watched if node_id in self._nodes and self._nodes[node_id].detail_offer]

    def store_detail(self, node_id: str, session_id: str, detail) -> bool:
        """Keep a NodeDetail a worker sent, if someone asked for it: a worker that sends detail
        unasked (or a stale session) is ignored, never stored."""
        if not self.detail_watch.wanted(node_id):
            return False
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or node.session_id != session_id or node.detail_offer is None:
                return False
            node.detail, node.detail_at = detail, time.time()
            return True



class DetailWatch:
    """The nodes someone looks at in detail (a detail view, `status --top`): node ID -> the
    monotonic time the asking lapses. Empty in a cluster nobody looks into: then detail costs nothing."""

    def __init__(self):
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}

    def watch(self, node_id: str, seconds: float) -> bool:
        """Ask for node_id's detail for the next seconds (called again to keep asking). True when
        it was not asked for before, so the first request can go out at once."""
        now = time.monotonic()
        with self._lock:
            before = self._until.get(node_id, 0.0)
            self._until[node_id] = max(before, now + seconds)
            return before < now

    def wanted(self, node_id: str) -> bool:
        with self._lock:
            return self._until.get(node_id, 0.0) > time.monotonic()

    def watched(self) -> list[str]:
        """The nodes asked for now; lapsed watches are dropped."""
        now = time.monotonic()
        with self._lock:
            if not self._until:
                return []
            self._until = {node_id: until for node_id, until in self._until.items() if until > now}
            return list(self._until)


def replace_file(path: str, write, mode: int = 0o600) -> None:
    """Put a file at path, all or nothing, even across a power cut: write(file) fills a
    temporary file in the same directory, created 0600 (so a secret is never readable by others,
    even for a moment), which gets its final mode, goes to disk, and is renamed over path; then
    the directory's new entry goes to disk too. OSError when that fails (nothing is left behind).
    The temporary name is made as tempfile.mkstemp makes it (O_EXCL, a random name), without the
    module: a worker writing its first node secret would keep 0.6 MB of it resident."""
    directory = os.path.dirname(path) or "."
    temporary = os.path.join(directory, f".cares-{random_hex(8)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            if mode != 0o600:
                os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Make a rename in directory last (best effort: not every file system can)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def stored_field(record: dict, key: str, kind, default=None):
    """record[key] if it has the type kind (default when absent and a default is given); TypeError
    otherwise. bool is refused where a number belongs: True is an int to Python, not to a file."""
    if key not in record and default is not None:
        return default
    value = record[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TypeError(f"{key} is a {type(value).__name__}")
    return value


def node_from_record(record) -> Node | None:
    """A Missing node from a state file record (gone since it was last seen, until it rejoins),
    or None when the record does not hold together: each
    field must have the type the file was written with (a number where a name belongs, from a
    hand edit or another program's file, is refused like any other bad record, never coerced)."""
    try:
        labels = stored_field(record, "labels", dict, {})
        if not all(isinstance(key, str) and isinstance(value, str) for key, value in labels.items()):
            return None
        node = Node(stored_field(record, "node_id", str),
                    address=sanitize_text(stored_field(record, "address", str, ""), 64),
                    hostname=sanitize_text(stored_field(record, "hostname", str, ""), HOSTNAME_LIMIT),
                    labels=labels,
                    platform=sanitize_text(stored_field(record, "platform", str, ""), PLATFORM_LIMIT),
                    version=sanitize_text(stored_field(record, "version", str, ""), 32),
                    cpu_count=stored_field(record, "cpu_count", int, 0),
                    memory_total_bytes=stored_field(record, "memory_total_bytes", int, 0),
                    joined_at=float(stored_field(record, "joined_at", (int, float), 0.0)),
                    last_seen=float(stored_field(record, "last_seen", (int, float), 0.0)),
                    owner_digest=bytes.fromhex(stored_field(record, "owner", str, "")))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not is_valid_node_id(node.node_id) or labels_problem(node.labels) is not None:
        return None
    apply_transition(node, NodeEvent.RESTORED)  # a new node, not in any registry yet
    node.gone_at = node.last_seen or time.time()
    node.search_text = search_text(node)
    return node


class StateFile:
    """The orchestrator's inventory on disk: one JSON file per listen address, replaced whole
    (replace_file) by its own thread, so a slow or full disk never reaches the gRPC loop. A file
    that cannot be read is kept aside as .corrupt."""

    FORMAT = 1

    def __init__(self, directory: str, listen: str, events: EventLog):
        name = re.sub(r"[^A-Za-z0-9._-]", "_", listen)
        self.path = os.path.join(directory, f"orchestrator-{name}.json")
        self._events = events
        self._pending: list | None = None
        self._ready = threading.Condition()
        self._writing = False
        self._last_error = ""
        threading.Thread(target=self._write_forever, name="cares-state", daemon=True).start()

    def load(self) -> list[dict]:
        """The nodes the file remembers; [] (with one WARN line) when it is missing or unusable."""
        try:
            with open(self.path, encoding="utf-8") as file:
                document = json.load(file)
            nodes = document["nodes"]
            if document.get("format") != self.FORMAT or not isinstance(nodes, list):
                raise ValueError("not a cares state file")
            return [node for node in nodes if isinstance(node, dict)]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as error:
            reason = sanitize_text(getattr(error, "strerror", None) or str(error) or type(error).__name__, 80)
            kept = self.path + ".corrupt"
            try:
                os.replace(self.path, kept)
            except OSError:
                kept = "left in place"
            self._events.add(Level.WARN, f"The state file {self.path} is unreadable ({reason}); kept as "
                                         f"{kept}, starting with no known nodes.")
            return []

    def save(self, records) -> None:
        """Hand the latest inventory to the writer thread (a newer one replaces one not yet
        written): the records, or a callable the writer thread calls for them, so that building
        10,000 of them (9 ms) happens off the gRPC loop."""
        with self._ready:
            self._pending = records
            self._ready.notify()

    def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._ready:
            while (self._pending is not None or self._writing) and time.monotonic() < deadline:
                self._ready.wait(max(deadline - time.monotonic(), 0.01))

    def _write_forever(self) -> None:
        while True:
            with self._ready:
                while self._pending is None:
                    self._ready.wait()
                records, self._pending, self._writing = self._pending, None, True
            error = self._write(records)
            with self._ready:
                self._writing = False
                self._ready.notify_all()
            if error != self._last_error:  # say each new problem once, and when it is over
                if error:
                    self._events.add(Level.WARN, f"Cannot save the state file {self.path}: {error}; "
                                                 f"still serving, the inventory is kept in memory.")
                else:
                    self._events.add(Level.INFO, f"The state file {self.path} is saved again.")
                self._last_error = error

    def _write(self, records) -> str:
        # A burst (collection_deferred): 10,000 records, alive until the text is made, set off
        # collections on this thread that scanned the gRPC loop's young objects too, holding the
        # GIL for up to 54 ms at 3,000 nodes. The disk write after it runs with the collector on.
        with collection_deferred():
            records = records() if callable(records) else records
            # One record at a time: json.dumps of 10,000 records holds the GIL for 50 ms in one C
            # call, and the gRPC loop waits that long; between records it gets the GIL back.
            document = (f'{{"format": {self.FORMAT}, "saved_at": {time.time()!r}, "nodes": ['
                        + ", ".join(json.dumps(record) for record in records) + "]}")
            del records  # they die here, in the burst, not after the write
        try:
            replace_file(self.path, lambda file: file.write(document.encode("utf-8")))
        except OSError as error:
            return os_error_text(error)
        return ""


# -- history: downsampled metrics in SQLite, written by their own thread ------------
# Each accepted sample is appended to a deque on the gRPC loop (tens of nanoseconds); the
# history thread groups the deque by node and minute every second and, every HISTORY_FLUSH_S,
# adds each minute's sums and maxima to the 1-minute tier in one transaction. The coarser tiers
# are rolled up from the 1-minute tier inside SQLite in the same transaction, once the minutes are
# complete: Python builds one row per node and minute, not one per tier. Buckets hold sums, counts
# and maxima, so a partial bucket written before a restart and the rest after it add up exactly.

@dataclasses.dataclass(frozen=True)
class HistoryTier:
    bucket_s: int
    keep_s: int


HISTORY_TIERS = (HistoryTier(60, 3600), HistoryTier(600, 86400), HistoryTier(3600, 7 * 86400),
                 HistoryTier(21600, 30 * 86400))
DEFAULT_HISTORY_DAYS = 30
# What history keeps of a sample, and the integer scale it is stored at (a tenth of a percent,
# a hundredth of a load, a byte per second): integers add up exactly and store in 1-8 bytes.
HISTORY_METRICS = (("cpu_percent", 10), ("memory_percent", 10), ("swap_percent", 10), ("load_average_1m", 100),
                   ("root_fs_used_percent", 10), ("disk_read_bytes_per_s", 1), ("disk_write_bytes_per_s", 1),
                   ("net_receive_bytes_per_s", 1), ("net_transmit_bytes_per_s", 1))
_HISTORY_PICK = operator.itemgetter(*(METRIC_NAMES.index(name) for name, _ in HISTORY_METRICS))
_HISTORY_SCALES = tuple(scale for _, scale in HISTORY_METRICS)
HISTORY_FLUSH_S = 30.0
HISTORY_ROLLUP_S = 600  # the finest coarse tier's bucket
HISTORY_PENDING_LIMIT = 500_000  # samples waiting for the history thread (a stuck disk must not eat memory)
HISTORY_NODE_EVENTS = frozenset({EventKind.JOINED, EventKind.REJOINED, EventKind.LEFT, EventKind.LOST,
                                 EventKind.THRESHOLD, EventKind.RECOVERED, EventKind.MISSING})
_HISTORY_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS nodes (id INTEGER PRIMARY KEY, node_id TEXT NOT NULL UNIQUE)",
    "CREATE TABLE IF NOT EXISTS buckets (node INTEGER NOT NULL, tier INTEGER NOT NULL, start INTEGER NOT NULL, "
    "samples INTEGER NOT NULL, " + ", ".join(f"{name}_sum INTEGER, {name}_max INTEGER" for name, _ in HISTORY_METRICS)
    + ", PRIMARY KEY (node, tier, start)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS events (node INTEGER NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL, text TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS events_by_node ON events (node, at)",
    # The 1-minute buckets before this time are in the coarser tiers too. A database written
    # before the roll-up (every tier written directly) starts with all of its minutes counted.
    "CREATE TABLE IF NOT EXISTS rollup (upto INTEGER NOT NULL)",
    "INSERT INTO rollup SELECT coalesce((SELECT max(start) + 60 FROM buckets WHERE tier = 0), 0) "
    "WHERE NOT EXISTS (SELECT 1 FROM rollup)",
)
_BUCKET_SUMS = ", ".join(f"{name}_sum, {name}_max" for name, _ in HISTORY_METRICS)
_BUCKET_MERGE = (
    " ON CONFLICT (node, tier, start) DO UPDATE SET samples = samples + excluded.samples, "
    + ", ".join(f"{name}_sum = coalesce({name}_sum, 0) + coalesce(excluded.{name}_sum, 0), "
                f"{name}_max = max(coalesce({name}_max, excluded.{name}_max), coalesce(excluded.{name}_max, {name}_max))"
                for name, _ in HISTORY_METRICS))
_BUCKET_UPSERT = "INSERT INTO buckets VALUES (?, ?, ?, ?, " + ", ".join("?, ?" for _ in HISTORY_METRICS) + ")" + _BUCKET_MERGE
# One coarser tier's buckets from the complete 1-minute buckets of [?, ?): (tier, bucket_s, bucket_s, from, to).
_BUCKET_ROLLUP = ("INSERT INTO buckets SELECT node, ?, start / ? * ?, sum(samples), "
                  + ", ".join(f"sum({name}_sum), max({name}_max)" for name, _ in HISTORY_METRICS)
                  # Node by node (CROSS JOIN keeps nodes outside): a range of the primary key each,
                  # where a scan for tier and start alone would read every tier of every node.
                  + " FROM nodes CROSS JOIN buckets ON node = nodes.id WHERE tier = 0 AND start >= ? AND start < ?"
                  " GROUP BY node, start / ?" + _BUCKET_MERGE)


_HISTORY_PAIR_SCALES = tuple(scale for scale in _HISTORY_SCALES for _ in "sum max")


def fold_minute(rows: list) -> list:
    """[sum, max, sum, max, ...] of a minute's samples (rows of HISTORY_METRICS' values, NaN where
    not measured), at the scale they are stored; None for a metric none of them had. Column by
    column in C (sum, max) while every value is there: 10,000 nodes' minutes each write."""
    columns = list(zip(*rows))
    try:
        return list(map(round, map(float.__mul__, [fold(column) for column in columns for fold in (sum, max)],
                                   _HISTORY_PAIR_SCALES)))
    except (TypeError, ValueError):  # round() refuses the NaN of an older worker or a rate's first reading
        pass
    folded = []
    for column, scale in zip(columns, _HISTORY_SCALES):
        column = [value for value in column if value == value]  # NaN is not equal to itself
        if not column:
            folded += (None, None)
            continue
        folded += (round(sum(column) * scale), round(max(column) * scale))
    return folded


class HistoryRange(enum.Enum):
    """The spans a node's graphs can show: the live 60 s kept in memory, or history from SQLite."""

    LIVE = "60s"
    HOUR = "1h"
    DAY = "24h"
    WEEK = "7d"
    MONTH = "30d"

    @property
    def seconds(self) -> int:
        return {"60s": 60, "1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}[self.value]

    @property
    def tier(self) -> int:
        """The finest tier that keeps the whole span."""
        return next(index for index, tier in enumerate(HISTORY_TIERS) if tier.keep_s >= self.seconds)


@dataclasses.dataclass(frozen=True)
class HistoryBucket:
    start: int  # Unix seconds
    samples: int
    averages: dict  # metric name -> average, only metrics the node sent
    maxima: dict


@dataclasses.dataclass(frozen=True)
class HistorySeries:
    node_id: str
    span: HistoryRange
    bucket_s: int
    first: int  # the start of the span (Unix seconds, a bucket boundary)
    end: int  # its end
    buckets: list  # HistoryBucket, oldest first; a bucket with no samples is absent: a gap, never zeros
    events: list  # (at, EventKind value, text) of the node, in the span

    def column(self, at: float, width: int) -> int:
        """The column of width columns across the span that time at falls in."""
        return min(max(int((at - self.first) * width / max(self.end - self.first, 1)), 0), width - 1)

    def values(self, metric: str, width: int) -> list[float]:
        """The span in width columns, each the sample-weighted average of its buckets, NaN where
        there were none (a gap, never a zero)."""
        totals, samples = [0.0] * width, [0] * width
        for bucket in self.buckets:
            if metric in bucket.averages:
                index = self.column(bucket.start, width)
                totals[index] += bucket.averages[metric] * bucket.samples
                samples[index] += bucket.samples
        return [total / count if count else math.nan for total, count in zip(totals, samples)]

    def summary(self, metric: str) -> tuple | None:
        """(min of the bucket averages, sample-weighted average, max of the maxima), or None."""
        chosen = [bucket for bucket in self.buckets if metric in bucket.averages]
        if not chosen:
            return None
        samples = sum(bucket.samples for bucket in chosen)
        return (min(bucket.averages[metric] for bucket in chosen),
                sum(bucket.averages[metric] * bucket.samples for bucket in chosen) / samples,
                max(bucket.maxima[metric] for bucket in chosen))


class HistoryStore:
    """Per-node history in an SQLite database (WAL) in the state directory. Everything that
    touches the file runs on its own thread; the gRPC loop only appends to a deque. A full disk or
    a locked database costs that batch (one WARN line, one INFO when writes work again); a file
    that is not a readable database is kept aside as .corrupt and a new one started."""

    def __init__(self, directory: str, listen: str, events: EventLog, days: int = DEFAULT_HISTORY_DAYS,
                 clock=time.time):
        import sqlite3  # here: only an orchestrator with history pays for the module
        self._sqlite3 = sqlite3
        name = re.sub(r"[^A-Za-z0-9._-]", "_", listen)
        self.path = os.path.join(directory, f"history-{name}.sqlite")
        self.days = days
        self._keep_s = days * 86400
        self._events = events
        self._clock = clock
        # Each sample as three items (node ID, arrival time, Metrics), added by one extend(): a
        # tuple per sample would be an object the garbage collector counts while it waits.
        self._pending: collections.deque = collections.deque()
        self._pending_events: collections.deque = collections.deque()
        self._forget: collections.deque = collections.deque()
        self.dropped = 0  # samples lost to a full queue or a failed write
        # The history thread's minutes not written yet, read by series() too.
        self._lock = threading.Lock()
        # Minute start -> ([node ID], array of their HISTORY_METRICS values, NaN where not
        # measured), in arrival order. Two objects a minute: at 10,000 nodes, an object kept per
        # sample (even the Metrics itself, past the registry's next sample) was 2,000 a second
        # for the garbage collector: ~200 more collections a minute, +5-8 % of a core.
        self._minutes: dict[int, tuple[list, array.array]] = {}
        self._node_keys: dict[str, int] = {}
        self._rolled_up_to = 0  # the 1-minute buckets before this are in every tier (the rollup table)
        self._wake = threading.Event()
        self._flushed = threading.Event()
        self._db = None
        self._last_error = self._open()
        if self._last_error:
            self._report(self._last_error)
        events.subscribe(self._on_event)
        self._thread = threading.Thread(target=self._run, name="cares-history", daemon=True)
        self._thread.start()

    # -- the gRPC loop's side: hand over, never wait ---------------------------

    def add(self, node_id: str, metrics: Metrics) -> None:
        if len(self._pending) >= 3 * HISTORY_PENDING_LIMIT:
            self.dropped += 1
            return
        self._pending.extend((node_id, self._clock(), metrics))  # one C call: the three stay together

    def _on_event(self, event: Event) -> None:
        if event.node_id and event.kind in HISTORY_NODE_EVENTS and len(self._pending_events) < 10_000:
            self._pending_events.append(event)

    def forget(self, node_ids) -> None:
        """Drop the history of forgotten nodes (on the history thread)."""
        self._forget.extend(node_ids)
        self._wake.set()

    def flush(self, timeout: float = 5.0) -> None:
        """Write what is pending now and wait for it (the orchestrator stopping, tests)."""
        self._flushed.clear()
        self._wake.set()
        self._flushed.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is pending (the thread is a daemon: it ends with the process)."""
        self.flush(timeout)

    # -- the history thread ----------------------------------------------------

    def _open(self) -> str:
        """Open (or create) the database: "" or why not."""
        self._db, error = open_history_database(self.path, self._events)
        if self._db is not None:
            self._read_keys()
        return error

    def _read_keys(self) -> None:
        """The node keys and the roll-up mark as the file has them (after opening, or a rollback)."""
        self._node_keys = dict(self._db.execute("SELECT node_id, id FROM nodes"))
        self._rolled_up_to = self._db.execute("SELECT upto FROM rollup").fetchone()[0]

    def _run(self) -> None:
        next_prune, next_write = 0.0, time.monotonic() + HISTORY_FLUSH_S
        while True:
            # Fold every second (the graphs read the folded minutes), write every HISTORY_FLUSH_S.
            asked = self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._fold()
                if not asked and time.monotonic() < next_write:
                    continue
                next_write = time.monotonic() + HISTORY_FLUSH_S
                error = self._write(everything=asked)
                if self._clock() >= next_prune and not error:
                    error = self._prune()
                    next_prune = self._clock() + 3600
            except Exception as failure:  # whatever SQLite or the disk did: the thread goes on
                error = sanitize_text(f"{type(failure).__name__}: {failure}", 120)
            if error != self._last_error:
                if error:
                    self._report(error)
                else:
                    self._events.add(Level.INFO, f"The history database {self.path} is written again.")
                self._last_error = error
            self._flushed.set()

    def _report(self, error: str) -> None:
        self._events.add(Level.WARN, f"Cannot write the history database {self.path}: {error}; still serving, "
                                     f"history is not kept meanwhile.")

    def _fold(self) -> None:
        """Sort the pending samples into their minutes (under the lock: series() reads them). The
        sums wait for the write, which makes them a column at a time (fold_minute)."""
        pending, pop, pick = self._pending, self._pending.popleft, _HISTORY_PICK
        with self._lock:
            minutes, minute, node_ids, values = self._minutes, None, None, None
            while pending:
                node_id, at, metrics = pop(), pop(), pop()
                if minute is None or not minute <= at < minute + 60:
                    minute = int(at // 60 * 60)
                    if minute not in minutes:
                        minutes[minute] = ([], array.array("d"))
                    node_ids, values = minutes[minute]
                row = pick(metrics)
                if None in row:
                    row = [math.nan if value is None else value for value in row]
                node_ids.append(node_id)
                values.extend(row)

    def _write(self, everything: bool = False) -> str:
        """Add the complete minutes (every minute when everything: stopping, tests) to the
        1-minute tier and roll complete ten-minute spans up into the others, with the events and
        the forgetting, in one transaction. The minute being filled waits for the next write, so
        a minute is one row written once, not one per write it straddles (a crash loses at most
        the last minute and a half; SIGTERM writes everything)."""
        now_minute = int(self._clock() // 60 * 60)
        with self._lock:
            if everything:
                taken, self._minutes = self._minutes, {}
            else:
                taken = {minute: batch for minute, batch in self._minutes.items() if minute < now_minute}
                for minute in taken:
                    del self._minutes[minute]
        # Every sample stamped before the fold that preceded this write is in the minutes: the
        # minutes before the one before now are complete (one spare for a clock stepping back).
        # They are rolled up ten at a time: a coarse bucket costs SQLite the same for one minute
        # as for ten, so 10,000 nodes cost 30,000 upserts every 10 minutes, not every minute.
        complete = (now_minute - 60) // HISTORY_ROLLUP_S * HISTORY_ROLLUP_S
        events = [self._pending_events.popleft() for _ in range(len(self._pending_events))]
        forget = [self._forget.popleft() for _ in range(len(self._forget))]
        if not (taken or events or forget or complete > self._rolled_up_to):
            return ""
        samples = sum(len(node_ids) for node_ids, _ in taken.values())
        if self._db is None:
            error = self._open()
            if error:
                self.dropped += samples
                return error
        db, sqlite3 = self._db, self._sqlite3
        try:
            db.execute("BEGIN")
            keys = {node_id: self._node_key(node_id) for node_id in set().union(*(ids for ids, _ in taken.values()))}
            db.executemany(_BUCKET_UPSERT, _minute_rows(taken, keys))
            if complete > self._rolled_up_to:
                for index, tier in enumerate(HISTORY_TIERS[1:], 1):
                    db.execute(_BUCKET_ROLLUP, (index, tier.bucket_s, tier.bucket_s, self._rolled_up_to, complete,
                                                tier.bucket_s))
                db.execute("UPDATE rollup SET upto = ?", (complete,))
            db.executemany("INSERT INTO events VALUES (?, ?, ?, ?)",
                           [(self._node_key(event.node_id), event.at, event.kind.value, event.text[:300])
                            for event in events])
            for node_id in forget:
                node = self._node_keys.pop(node_id, None)
                if node is not None:
                    for table in ("buckets", "events"):
                        db.execute(f"DELETE FROM {table} WHERE node = ?", (node,))
                    db.execute("DELETE FROM nodes WHERE id = ?", (node,))
            db.execute("COMMIT")
            self._rolled_up_to = max(self._rolled_up_to, complete)
        except sqlite3.Error as error:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._node_keys = {}  # rolled back with the transaction; read again on the next write
            with contextlib.suppress(sqlite3.Error):
                self._read_keys()
            self.dropped += samples
            if _is_corrupt(error):  # the next write opens it again, and moves it aside
                with contextlib.suppress(sqlite3.Error):
                    db.close()
                self._db = None
            return _sqlite_error_text(error)
        return ""

    def _node_key(self, node_id: str) -> int:
        key = self._node_keys.get(node_id)
        if key is None:
            self._db.execute("INSERT OR IGNORE INTO nodes (node_id) VALUES (?)", (node_id,))
            key = self._db.execute("SELECT id FROM nodes WHERE node_id = ?", (node_id,)).fetchone()[0]
            self._node_keys[node_id] = key
        return key

    def _prune(self) -> str:
        """Drop buckets older than their tier keeps (and than --history-days), events older than the days."""
        if self._db is None:
            return ""
        now = int(self._clock())
        try:
            with self._db:
                for index, tier in enumerate(HISTORY_TIERS):
                    cutoff = now - min(tier.keep_s, self._keep_s) - tier.bucket_s
                    if index == 0:  # a minute leaves once rolled up, or once older than the days kept
                        cutoff = max(min(cutoff, self._rolled_up_to), now - self._keep_s - tier.bucket_s)
                    self._db.execute("DELETE FROM buckets WHERE tier = ? AND start < ?", (index, cutoff))
                self._db.execute("DELETE FROM events WHERE at < ?", (now - self._keep_s,))
        except self._sqlite3.Error as error:
            return _sqlite_error_text(error)
        return ""

    # -- reading (any thread but the gRPC loop) ---------------------------------

    def series(self, node_id: str, span: HistoryRange) -> HistorySeries:
        """The node's buckets over span, oldest first, with what is not written yet, and its events."""
        tier = HISTORY_TIERS[span.tier]
        now = int(self._clock())
        end = (now // tier.bucket_s + 1) * tier.bucket_s
        first = end - max(min(span.seconds, self._keep_s), tier.bucket_s)
        parts, events = [], []  # parts: (bucket start, samples, [sum, max, ...]) to add up
        with contextlib.suppress(self._sqlite3.Error, OSError):
            # Its own connection: WAL lets it read while the history thread writes; one read
            # transaction, so a roll-up committed meanwhile is seen by both queries or by neither.
            with contextlib.closing(self._sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1.0)) as db:
                db.execute("BEGIN")
                row = db.execute("SELECT id FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
                if row is not None:
                    query = f"SELECT start, samples, {_BUCKET_SUMS} FROM buckets WHERE node = ? AND tier = ? AND start >= ?"
                    parts += [(start, samples, values) for start, samples, *values in
                              db.execute(query, (row[0], span.tier, first))]
                    if span.tier > 0:  # the minutes not rolled up into this tier yet
                        parts += [(start // tier.bucket_s * tier.bucket_s, samples, values)
                                  for start, samples, *values in db.execute(
                                      query + " AND start >= (SELECT upto FROM rollup)", (row[0], 0, first))]
                    events = [(at, kind, text) for at, kind, text in db.execute(
                        "SELECT at, kind, text FROM events WHERE node = ? AND at >= ? ORDER BY at", (row[0], first))]
        with self._lock:  # the minutes not written yet
            pending = [(minute, _history_rows(values, [index for index, node in enumerate(node_ids) if node == node_id]))
                       for minute, (node_ids, values) in self._minutes.items() if minute >= first]
        parts += [(minute // tier.bucket_s * tier.bucket_s, len(rows), fold_minute(rows))
                  for minute, rows in pending if rows]
        buckets = buckets_of(parts)
        # Events not written yet (tuple() copies the deque in one step under the GIL).
        events += [(event.at, event.kind.value, event.text) for event in tuple(self._pending_events)
                   if event.node_id == node_id and event.at >= first]
        return HistorySeries(node_id, span, tier.bucket_s, first, end, buckets, sorted(events))


def _minute_rows(minutes: dict, keys: dict):
    """The 1-minute tier's rows of these minutes, node by node, made as SQLite takes them: every
    row built first (10,000 nodes' tuples and folds alive at once) kept the garbage collector
    busy on that many objects, and pushed them into its oldest generation."""
    for minute, (node_ids, values) in minutes.items():
        by_node = sorted(range(len(node_ids)), key=node_ids.__getitem__)  # one list of sample indices
        for node_id, indices in itertools.groupby(by_node, key=node_ids.__getitem__):
            rows = _history_rows(values, indices)
            yield (keys[node_id], 0, minute, len(rows), *fold_minute(rows))


def _history_rows(values: array.array, indices) -> list:
    """The rows of HISTORY_METRICS' values at these sample indices of a minute's flat array."""
    width = len(HISTORY_METRICS)
    return [values[index * width:(index + 1) * width] for index in indices]


def buckets_of(parts: list) -> list:
    """HistoryBuckets, oldest first, of (bucket start, samples, [sum, max, ...]) parts: those of
    one start added up (from SQLite's tiers and from memory), sums made averages, scales undone."""
    found: dict[int, list] = {}
    for start, samples, values in parts:
        entry = found.get(start)
        if entry is None:
            found[start] = [samples, list(values)]
            continue
        entry[0] += samples
        totals = entry[1]
        for slot in range(0, len(values), 2):
            if values[slot] is not None:
                totals[slot] = values[slot] + (totals[slot] or 0)
                peak = totals[slot + 1]
                totals[slot + 1] = values[slot + 1] if peak is None else max(peak, values[slot + 1])
    buckets = []
    for start in sorted(found):
        samples, values = found[start]
        if samples <= 0:
            continue
        averages, peaks = {}, {}
        for (name, scale), total, peak in zip(HISTORY_METRICS, values[0::2], values[1::2]):
            if total is not None and peak is not None:
                averages[name], peaks[name] = total / samples / scale, peak / scale
        buckets.append(HistoryBucket(start, samples, averages, peaks))
    return buckets


def open_history_database(path: str, events: EventLog) -> tuple:
    """(an open connection, "") to the history database at path, created 0600 with its schema;
    (None, why) when it cannot be. A file that is not a database is moved aside as .corrupt
    (one WARN line) and a new one started."""
    import sqlite3
    for attempt in (1, 2):
        db = None
        try:
            # Created 0600 before SQLite opens it: its -wal and -shm files take the same mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(path, timeout=0.5, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            for statement in _HISTORY_SCHEMA:
                db.execute(statement)
            return db, ""
        except OSError as error:
            return None, os_error_text(error)
        except sqlite3.Error as error:
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            if attempt == 2 or not _is_corrupt(error):
                return None, _sqlite_error_text(error)
            kept = path + ".corrupt"
            try:
                os.replace(path, kept)
                for suffix in ("-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path + suffix)
            except OSError:
                kept = "left in place"
            events.add(Level.WARN, f"The history database {path} is unreadable ({sanitize_text(str(error), 80)}); "
                                   f"kept as {kept}, starting a new one; still serving.")
    return None, "the database cannot be opened"


def _is_corrupt(error) -> bool:
    text = str(error).lower()
    return "not a database" in text or "malformed" in text or "file is encrypted" in text


def _sqlite_error_text(error) -> str:
    text = str(error).lower()
    if "full" in text:
        return "the disk is full (or the file size limit reached)"
    if "locked" in text or "busy" in text:
        return "the database is locked by another process"
    return sanitize_text(text, 80)


def _is_power_of_ten(count: int) -> bool:
    while count >= 10 and count % 10 == 0:
        count //= 10
    return count == 1


# ---------------------------------------------------------------------------
# 4. The orchestrator: gRPC servicers on a grpc.aio server that runs on a
#    background thread's event loop, so a UI can own the main thread.
#    Holds: the one gRPC loop, TokenGuard, message conversions, ClusterServicer
#    (JoinCluster, Heartbeat, the commands sent down streams), StatusServicer
#    (ListNodes, GetNodeDetail, GetNodeHistory), HookRunner (--on-event).
#    Talks to: 3 (the registry, refusals, history), 2 (detail limits).
# ---------------------------------------------------------------------------

_grpc_loop: asyncio.AbstractEventLoop | None = None
_grpc_loop_lock = threading.Lock()


def grpc_loop() -> asyncio.AbstractEventLoop:
    """The one event loop, on a daemon thread, that runs all of this process's gRPC work.

    grpc.aio binds its completion queue to the first loop that uses it: calls made
    on any other loop stall once that one stops. So orchestrator, worker and status
    client share this loop, and the UI keeps the main thread.
    """
    global _grpc_loop
    with _grpc_loop_lock:
        if _grpc_loop is None:
            _grpc_loop = asyncio.new_event_loop()
            _grpc_loop.set_exception_handler(_report_loop_error)
            threading.Thread(target=_grpc_loop.run_forever, name="cares-grpc", daemon=True).start()
        return _grpc_loop


def _report_loop_error(loop, context: dict) -> None:
    """asyncio's report of an error no task handled: one line, never a traceback on the terminal.
    grpc's completion-queue poller failing with EBADF is its own teardown at process exit (its
    descriptor closed under a pending callback): nothing to say."""
    error = context.get("exception")
    if isinstance(error, OSError) and error.errno == errno.EBADF:
        return
    if os.environ.get("CARES_DEBUG"):
        loop.default_exception_handler(context)
        return
    global _loop_error_log
    if _loop_error_log is None:  # only ever called on the gRPC loop: no race to make two
        # Its own writer thread: the loop must not wait on a stderr nobody reads.
        _loop_error_log = LineWriter(2, capacity=100)
    detail = f": {type(error).__name__}: {error}" if error is not None else ""
    _loop_error_log.put("cares: " + sanitize_text(
        f"internal error on the gRPC loop ({context.get('message', 'unknown')}){detail}", 300))


_loop_error_log = None


def run_on_grpc_loop(coroutine, timeout: float | None = None):
    """Run a coroutine on the gRPC loop and wait for its result from another thread."""
    future = asyncio.run_coroutine_threadsafe(coroutine, grpc_loop())
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise


def _metadata_value(context, wanted: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == wanted:
            return str(value)
    return ""


class TokenGuard:
    """Checks the cluster token and slows guessing at it. After a few wrong tokens from one
    address, each further answer waits longer; past a limit that address is refused outright
    for a while, whatever it sends. Other addresses are not slowed, and the waits are
    asyncio sleeps, so nothing else on the loop waits with them. A guard serves one event loop
    (the gRPC servicers share one; /metrics has its own): no await falls between reading and
    updating an address's count, so no lock is needed."""

    def __init__(self, token: str | None):
        self.token = token
        self._failures: dict[str, list] = {}  # source -> [wrong tokens, first at, locked until] (monotonic)

    async def check(self, context, source: str) -> None:
        """A gRPC request's token (cares-token metadata): see verify()."""
        await self.verify(_metadata_value(context, TOKEN_METADATA_KEY), source)

    async def verify(self, given: str, source: str) -> None:
        """Return when given is the token; raise Refusal (after the due delay) otherwise. The
        count goes up before any wait, so concurrent guesses cannot slip past the lockout."""
        if not self.token:
            return
        now = time.monotonic()
        failures = self._failures.get(source)
        if failures is not None and failures[2] > now:
            # Refused without looking at the token, and not at line rate either.
            await asyncio.sleep(token_failure_delay(TOKEN_LOCKOUT_FAILURES))
            raise Refusal(RefusalReason.THROTTLED,
                          f"too many wrong tokens from {source}; try again in {math.ceil(failures[2] - now)} s")
        if compare_digest(sha256(given.encode("utf-8", "replace")).digest(),
                          sha256(self.token.encode()).digest()):
            self._failures.pop(source, None)
            return
        if failures is None or now - failures[1] > TOKEN_FAILURE_WINDOW_S:
            failures = self._remember(source, now)
        failures[0] += 1
        if failures[0] >= TOKEN_LOCKOUT_FAILURES:
            failures[2] = now + TOKEN_LOCKOUT_S
        delay = token_failure_delay(failures[0])
        if delay:
            await asyncio.sleep(delay)
        raise Refusal(RefusalReason.WRONG_TOKEN, "missing or wrong join token")

    def _remember(self, source: str, now: float) -> list:
        if len(self._failures) >= TOKEN_GUARD_SOURCES:
            for old in [key for key, (_, first, locked) in self._failures.items()
                        if now - first > TOKEN_FAILURE_WINDOW_S and locked <= now]:
                del self._failures[old]
            if len(self._failures) >= TOKEN_GUARD_SOURCES:
                del self._failures[next(iter(self._failures))]
        failures = self._failures[source] = [0, now, 0.0]
        return failures


def token_failure_delay(failures: int) -> float:
    """Seconds to wait before answering the n-th wrong token from one address: none for the
    first few (typos), then doubling from 0.1 s up to 2 s (the lockout does the rest)."""
    if failures <= TOKEN_FREE_FAILURES:
        return 0.0
    return min(0.1 * 2 ** (failures - TOKEN_FREE_FAILURES - 1), 2.0)


def join_info_from_message(request: pb.NodeInfo) -> JoinInfo:
    """What a worker said at join, made safe to show; Refusal for labels outside the rules."""
    labels = dict(request.labels)
    problem = labels_problem(labels)
    if problem is not None:
        raise Refusal(RefusalReason.INVALID_JOIN, problem)
    return JoinInfo(hostname=sanitize_text(request.hostname, HOSTNAME_LIMIT), labels=labels,
                    platform=sanitize_text(request.platform, PLATFORM_LIMIT),
                    version=sanitize_text(request.cares_version, 32), cpu_count=request.cpu_count,
                    memory_total_bytes=request.memory_total_bytes,
                    detail_offer=DetailOffer(request.detail_offer.processes, request.detail_offer.command_lines)
                    if request.HasField("detail_offer") else None)


_ADDED_METRICS = tuple(name for name in METRIC_NAMES if name not in FIRST_RELEASE_METRICS)


_READ_METRICS = operator.attrgetter(*METRIC_NAMES)


def metrics_from_message(message: pb.NodeMetrics) -> Metrics:
    """A NodeMetrics as Metrics: fields an older worker does not send stay None. This runs for
    every heartbeat on the gRPC loop, so every field is read in one C call, and presence is asked
    only when some field reads 0, the one value a field that was not sent can read (1.4 us for
    a full sample; asking each optional field took 3.4, ListFields and a dict 26)."""
    values = _READ_METRICS(message)
    if 0.0 not in values:
        return Metrics._make(values)
    return Metrics(*values[:len(FIRST_RELEASE_METRICS)],
                   *[value if value or message.HasField(name) else None
                     for name, value in zip(_ADDED_METRICS, values[len(FIRST_RELEASE_METRICS):])])


SHUTDOWN_NOTICE = pb.OrchestratorCommand(
    shutdown=pb.ShutdownNotice(reason="the orchestrator is shutting down"))
DETAIL_REQUEST = pb.OrchestratorCommand(request_detail=pb.DetailRequest())
# A detail request holds for this many heartbeat intervals (at least DETAIL_MIN_PERIOD_S each) on
# both sides: the orchestrator asks again each interval while someone looks, and a worker that
# stops hearing it stops sending detail on its own.
DETAIL_LAPSE_INTERVALS = 3
DETAIL_REPLY_WAIT_S = 10.0  # `status NODE --top` waits at most this long for a fresh snapshot


def detail_period(heartbeat_interval: float) -> float:
    """How often detail is asked and sent: every interval, never faster than DETAIL_MIN_PERIOD_S,
    so a short interval neither floods the worker with requests nor has it walk /proc ten times a second."""
    return max(heartbeat_interval, DETAIL_MIN_PERIOD_S)


def safe_detail(detail, offer: DetailOffer | None = None) -> pb.NodeDetail:
    """A NodeDetail from a worker made safe to show and pass on: every text sanitized and cut,
    every number finite and not negative, every list within its limit; command lines only from
    a worker that said it shares them."""
    def number(value: float) -> float:
        return value if math.isfinite(value) and value > 0 else 0.0

    cmdlines = offer is None or offer.command_lines
    safe = pb.NodeDetail(process_count=detail.process_count, left_out=detail.left_out, window_s=number(detail.window_s),
                         own_processes_only=detail.own_processes_only)
    for process in detail.processes[:3 * TOP_PROCESSES]:
        safe.processes.add(pid=process.pid, user=sanitize_text(process.user, 32), name=sanitize_text(process.name, 64),
                           command_line=sanitize_text(process.command_line, COMMAND_LINE_LIMIT) if cmdlines else "",
                           cpu_percent=number(process.cpu_percent), rss_bytes=process.rss_bytes,
                           io_bytes_per_s=number(process.io_bytes_per_s), state=sanitize_text(process.state, 16),
                           threads=process.threads, io_unknown=process.io_unknown)
    for mount in detail.mounts[:DETAIL_LIST_LIMIT]:
        safe.mounts.add(mountpoint=sanitize_text(mount.mountpoint, 128), device=sanitize_text(mount.device, 64),
                        fstype=sanitize_text(mount.fstype, 16), used_bytes=mount.used_bytes,
                        total_bytes=mount.total_bytes, used_percent=clamp_percent(number(mount.used_percent)))
    for nic in detail.interfaces[:DETAIL_LIST_LIMIT]:
        safe.interfaces.add(name=sanitize_text(nic.name, 32), receive_bytes_per_s=number(nic.receive_bytes_per_s),
                            transmit_bytes_per_s=number(nic.transmit_bytes_per_s), errors_in=nic.errors_in,
                            errors_out=nic.errors_out, drops_in=nic.drops_in, drops_out=nic.drops_out, up=nic.up,
                            speed_mbps=nic.speed_mbps)
    for sensor in detail.sensors[:DETAIL_LIST_LIMIT]:
        safe.sensors.add(kind=sensor.kind if sensor.kind in (pb.TEMPERATURE_CELSIUS, pb.FAN_RPM) else 0,
                         chip=sanitize_text(sensor.chip, 32), label=sanitize_text(sensor.label, 32),
                         value=number(sensor.value), high=number(sensor.high), critical=number(sensor.critical))
    for container in detail.containers[:DETAIL_LIST_LIMIT]:
        safe.containers.add(id=sanitize_text(container.id, 64), name=sanitize_text(container.name, 64),
                            cpu_percent=number(container.cpu_percent), memory_bytes=container.memory_bytes,
                            pids=container.pids, engine=sanitize_text(container.engine, 16))
    cut = sum(max(len(getattr(detail, field)) - len(getattr(safe, field)), 0)
              for field in ("processes", "mounts", "interfaces", "sensors", "containers"))
    safe.left_out += cut
    return safe


async def refuse(registry: NodeRegistry, context, source: str, what: PeerRequest, refusal: Refusal):
    """The one way a servicer turns a peer away: count and log the refusal (summarised under
    floods), then answer with its code, its message and its reason as trailing metadata."""
    registry.refusals.add(source, what, refusal)
    await context.abort(refusal.code, refusal.message,
                        trailing_metadata=((REFUSAL_METADATA_KEY, refusal.reason.label),))


class StreamEnding(enum.Enum):
    """Why the orchestrator itself ended a heartbeat stream (cancelled its handler)."""

    NONE = "none"
    EXPIRED = "expired"    # silent past the limit
    SHUTDOWN = "shutdown"  # the orchestrator is stopping
    REPLACED = "replaced"  # the same worker reconnected on a new stream


@dataclasses.dataclass
class _Stream:
    session_id: str
    task: asyncio.Task
    context: object
    ending: StreamEnding = StreamEnding.NONE
    interval_ms: int = 0  # the interval this stream was last told
    write_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    # The DetailRequest write under way, if any: a stuck stream gets no pile of them, and the task
    # is held here (asyncio keeps only weak references to tasks).
    detail_write: asyncio.Task | None = None


class ClusterServicer(pb_grpc.ClusterServiceServicer):
    """JoinCluster and Heartbeat, writing everything they learn into the registry."""

    def __init__(self, registry: NodeRegistry, guard: TokenGuard, heartbeat_ms: int):
        self.registry = registry
        self._guard = guard
        self._streams: dict[str, _Stream] = {}
        # The interval workers are asked to follow; every stream is told it when it opens.
        self.interval_ms = heartbeat_ms
        # Set while the orchestrator shuts down: streams it ends then are not lost workers.
        self.closing = False

    async def JoinCluster(self, request, context):
        source = peer_host(context.peer())
        try:
            await self._guard.check(context, source)
            session_id = self.registry.join(request.node_id, peer_to_address(context.peer()),
                                            join_info_from_message(request), request.node_secret)
        except Refusal as refusal:
            await refuse(self.registry, context, source, PeerRequest.JOIN, refusal)
        return pb.Acknowledgement(accepted=True, message=f"welcome, {request.node_id}", session_id=session_id,
                                  heartbeat_interval_ms=self.interval_ms)

    async def Heartbeat(self, request_iterator, context):
        source = peer_host(context.peer())
        # cares' workers name node and session in metadata, so the stream is bound before the
        # first sample; a client written from cluster.proto alone is bound by its first message.
        node_id = _metadata_value(context, NODE_METADATA_KEY)
        session_id = _metadata_value(context, SESSION_METADATA_KEY)
        first = None
        if not (node_id and session_id):
            # Bounded: an open stream that never says who it is must not be held forever.
            try:
                first = await asyncio.wait_for(context.read(), self.registry.silence_limit)
            except asyncio.TimeoutError:
                first = None
            if first is grpc.aio.EOF:
                return
            node_id, session_id = (first.node_id, first.session_id) if first is not None else ("", "")
        try:
            replaced = self.registry.attach_stream(node_id, session_id)
        except Refusal as refusal:
            await refuse(self.registry, context, source, PeerRequest.HEARTBEAT_STREAM, refusal)
        if replaced:
            self._end_stream(node_id, replaced, StreamEnding.REPLACED)
        # From here a silent stream is the liveness sweep's to end, like any silent node.
        stream = _Stream(session_id, asyncio.current_task(), context)
        self._streams[node_id] = stream
        ending, left = "its heartbeat stream ended", False
        try:
            # Its join may have been answered with an interval that changed since.
            await self._tell_interval(stream)
            message = first if first is not None else await context.read()
            loop, recent = asyncio.get_running_loop(), collections.deque(maxlen=FLOOD_SAMPLES)
            while message is not grpc.aio.EOF:
                if message.node_id != node_id or message.session_id != session_id:
                    ending = "it sent metrics for another node"
                    raise Refusal(RefusalReason.WRONG_NODE,
                                  "metrics must be for the node that joined")
                recent.append(loop.time())
                if len(recent) == FLOOD_SAMPLES and recent[-1] - recent[0] < FLOOD_WINDOW_S:
                    # Each sample costs the loop and the registry's lock: one peer must not take them.
                    ending = "it flooded the orchestrator with samples"
                    raise Refusal(RefusalReason.SAMPLE_FLOOD,
                                  f"{FLOOD_SAMPLES} samples in under {FLOOD_WINDOW_S:g} s; send one per "
                                  f"heartbeat interval")
                if message.leaving:
                    left = True
                    return
                self.registry.update(node_id, session_id, metrics_from_message(message), message.sequence,
                                     message.sent_at_ms)
                if message.HasField("detail"):  # kept only when asked for; a worker that sends it unasked costs this check
                    self.registry.store_detail(node_id, session_id, message.detail)
                message = await context.read()
        except Refusal as refusal:
            await refuse(self.registry, context, source, PeerRequest.HEARTBEAT_STREAM, refusal)
        except asyncio.CancelledError:
            if stream.ending is StreamEnding.EXPIRED:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"no heartbeat for {self.registry.silence_limit:.1f} s")
            if stream.ending is StreamEnding.REPLACED:
                await context.abort(grpc.StatusCode.ALREADY_EXISTS, "this node reconnected on a new stream")
            if stream.ending is not StreamEnding.SHUTDOWN:
                raise
            # Written by the handler itself, so the notice goes out before the end of the stream.
            await context.write(SHUTDOWN_NOTICE)
        finally:
            if self._streams.get(node_id) is stream:
                del self._streams[node_id]
            if not self.closing:
                self.registry.disconnect(node_id, session_id, ending, left=left)

    async def _tell_interval(self, stream: _Stream) -> None:
        """Send the stream the current interval unless it was told already. Under the stream's
        write lock, and looping, so a change made while a write is under way is sent too: the
        last interval a worker hears is always the current one."""
        async with stream.write_lock:
            while stream.interval_ms != self.interval_ms:
                wanted = self.interval_ms
                await stream.context.write(pb.OrchestratorCommand(set_heartbeat_interval_ms=wanted))
                stream.interval_ms = wanted

    async def tell_everyone_interval(self, timeout: float) -> None:
        """Send the current interval on every open stream; a stream that does not take it in time
        gets it when its write completes (nothing is cancelled), and one that is ending is skipped."""
        async def tell(stream):
            try:
                await self._tell_interval(stream)
            except Exception:  # the stream is ending; its own handler deals with that
                pass
        tasks = [asyncio.ensure_future(tell(stream)) for stream in list(self._streams.values())]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def ask_for_detail(self, node_ids) -> None:
        """Send a DetailRequest on the streams of these nodes (each write its own task, so one
        stuck stream holds up nothing). Called on the gRPC loop."""
        for node_id in node_ids:
            stream = self._streams.get(node_id)
            if stream is not None and stream.ending is StreamEnding.NONE and \
                    (stream.detail_write is None or stream.detail_write.done()):
                stream.detail_write = asyncio.ensure_future(self._ask_for_detail(stream))

    @staticmethod
    async def _ask_for_detail(stream: _Stream) -> None:
        try:
            async with stream.write_lock:
                await stream.context.write(DETAIL_REQUEST)
        except Exception:  # the stream is ending; its own handler deals with that
            pass

    def _end_stream(self, node_id: str, session_id: str, ending: StreamEnding) -> None:
        stream = self._streams.get(node_id)
        if stream is not None and stream.session_id == session_id:
            stream.ending = ending
            stream.task.cancel()

    def end_expired_streams(self, expired: list[tuple[str, str]]) -> None:
        for node_id, session_id in expired:
            self._end_stream(node_id, session_id, StreamEnding.EXPIRED)

    async def say_shutdown(self, timeout: float) -> None:
        """End every stream with a shutdown notice, so workers retry quietly instead of reporting a failure."""
        self.closing = True
        tasks = []
        for stream in self._streams.values():
            stream.ending = StreamEnding.SHUTDOWN
            stream.task.cancel()
            tasks.append(stream.task)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


def history_message(series: HistorySeries, days: int) -> pb.NodeHistory:
    reply = pb.NodeHistory(node_id=series.node_id, kept=True, history_days=days, bucket_s=series.bucket_s,
                           end_unix_s=series.end)
    for bucket in series.buckets:
        reply.buckets.add(start_unix_s=bucket.start, samples=bucket.samples, average=bucket.averages,
                          maximum=bucket.maxima)
    for at, kind, text in series.events:
        reply.events.add(at_unix_s=at, kind=kind, text=text)
    return reply


def node_status_message(node: Node, with_detail: bool = False) -> pb.NodeStatus:
    """One row of `status`: the node as the registry knows it, values only where they are known;
    with_detail, its latest detail snapshot too, made safe."""
    row = pb.NodeStatus(node_id=node.node_id, address=node.address, status=node.status.value,
                        state=node.status.wire,
                        last_seen_unix_s=node.last_seen, hostname=node.hostname, joined_at_unix_s=node.joined_at,
                        labels=node.labels, platform=node.platform, cares_version=node.version,
                        cpu_count=node.cpu_count, memory_total_bytes=node.memory_total_bytes, left=node.left,
                        alerts=sorted(rule.describe() for rule in node.alerting))
    if node.metrics is not None:
        row.cpu_percent = node.metrics.cpu_percent
        row.memory_percent = node.metrics.memory_percent
        row.latest.CopyFrom(metrics_message(node.metrics))
    if node.detail_offer is not None:
        row.detail_offer.CopyFrom(pb.DetailOffer(processes=node.detail_offer.processes,
                                                 command_lines=node.detail_offer.command_lines))
    if with_detail and node.detail is not None:
        row.detail.CopyFrom(safe_detail(node.detail, node.detail_offer))
        row.detail_at_unix_s = node.detail_at
    return row


def metrics_message(metrics: Metrics, **identity) -> pb.NodeMetrics:
    """Metrics as NodeMetrics, leaving out what was not measured."""
    values = {name: value for name, value in zip(METRIC_NAMES, metrics) if value is not None}
    for name in ("memory_used_bytes", "memory_total_bytes", "root_fs_size_bytes"):
        if name in values:
            values[name] = int(values[name])
    return pb.NodeMetrics(**values, **identity)


class StatusServicer(pb_grpc.StatusServiceServicer):
    """The read-only node table behind `cares status`, a page at a time, and one node's detail
    (`status NODE --top`), asked of its worker for the occasion."""

    def __init__(self, registry: NodeRegistry, guard: TokenGuard, watch_detail=None, history=lambda: None):
        self.registry = registry
        self._guard = guard
        self._watch_detail = watch_detail  # Orchestrator.watch_detail: asks the worker at once
        self._history = history  # the Orchestrator's HistoryStore, once it has one (or None)

    async def GetNodeHistory(self, request, context):
        source = peer_host(context.peer())
        spans = {span.seconds: span for span in HistoryRange if span is not HistoryRange.LIVE}
        try:
            await self._guard.check(context, source)
            if request.range_s not in spans:
                raise Refusal(RefusalReason.BAD_REQUEST,
                              f"a history range is one of {', '.join(span.value for span in spans.values())}")
            if self.registry.get(request.node_id) is None:
                raise Refusal(RefusalReason.UNKNOWN_NODE,
                              f"no node '{sanitize_text(request.node_id, 64)}' is known to this orchestrator")
        except Refusal as refusal:
            await refuse(self.registry, context, source, PeerRequest.STATUS_REQUEST, refusal)
        store = self._history()
        if store is None:
            return pb.NodeHistory(node_id=request.node_id, kept=False)
        # SQLite is read, and the reply built, on a worker thread, never on the loop.
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: history_message(store.series(request.node_id, spans[request.range_s]), store.days))

    async def GetNodeDetail(self, request, context):
        source = peer_host(context.peer())
        try:
            await self._guard.check(context, source)
            node = self.registry.get(request.node_id)
            if node is None:
                raise Refusal(RefusalReason.UNKNOWN_NODE,
                              f"no node '{sanitize_text(request.node_id, 64)}' is known to this orchestrator")
        except Refusal as refusal:
            await refuse(self.registry, context, source, PeerRequest.STATUS_REQUEST, refusal)
        loop = asyncio.get_running_loop()
        if node.detail_offer is not None and node.status.live and self._watch_detail is not None:
            # A snapshot newer than this request, with rates (its worker's second one): within
            # two or three intervals, or whatever arrived by the deadline.
            asked_at = time.time()
            deadline = loop.time() + min(DETAIL_LAPSE_INTERVALS * self.registry.heartbeat_interval + 1.0,
                                         DETAIL_REPLY_WAIT_S)
            while loop.time() < deadline:
                self._watch_detail(request.node_id)
                detail, detail_at = self.registry.latest_detail(request.node_id)
                if detail is not None and detail_at > asked_at and detail.window_s > 0:
                    break
                await asyncio.sleep(0.05)
        node = self.registry.get(request.node_id)
        if node is None:  # forgotten while we waited
            refusal = Refusal(RefusalReason.UNKNOWN_NODE, f"node '{sanitize_text(request.node_id, 64)}' was forgotten")
            await refuse(self.registry, context, source, PeerRequest.STATUS_REQUEST, refusal)
        # Making a worker's detail safe is ~100 sanitize_text calls: on a worker thread, as ListNodes' rows.
        return await loop.run_in_executor(None, functools.partial(node_status_message, node, with_detail=True))

    async def ListNodes(self, request, context):
        source = peer_host(context.peer())
        try:
            await self._guard.check(context, source)
        except Refusal as refusal:
            await refuse(self.registry, context, source, PeerRequest.STATUS_REQUEST, refusal)
        # Built on a worker thread: 1,000 rows took the loop 20 ms, a whole 10,000-node table 212.
        return await asyncio.get_running_loop().run_in_executor(None, self._reply, request)

    def _reply(self, request) -> pb.NodeList:
        if request.page_size == 0:  # an older client: everything at once, as it always got
            nodes, total = self.registry.page("", len(self.registry) + 1)
            return pb.NodeList(nodes=[node_status_message(node) for node in nodes], total_nodes=total)
        nodes, total = self.registry.page(request.page_after_node_id, min(request.page_size, STATUS_PAGE_NODES))
        reply, size = pb.NodeList(total_nodes=total), 0
        for node in nodes:
            row = node_status_message(node)
            size += row.ByteSize() + 8
            if size > STATUS_PAGE_BYTES and reply.nodes:
                break
            reply.nodes.append(row)
        if len(reply.nodes) < len(nodes) or len(nodes) == min(request.page_size, STATUS_PAGE_NODES):
            reply.next_page_after_node_id = reply.nodes[-1].node_id
        return reply


class StartError(Exception):
    """An orchestrator or worker could not start; the message is one line for the user."""


def explain_bind_failure(host: str, port: int) -> str:
    """Why gRPC could not listen: try the same bind with a plain socket to get the OS's reason."""
    address = format_address(host, port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return f"cannot listen on {address}: host name not found"
    family, kind, proto, _, sockaddr = infos[0]
    try:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            probe.bind(sockaddr)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            return f"cannot listen on {address}: port {port} is already in use"
        return f"cannot listen on {address}: {error.strerror or error}"
    return f"cannot listen on {address}"


HOOK_HIDDEN_VARIABLES = frozenset({"CARES_TOKEN", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                   "LISTEN_FDS", "LISTEN_PID", "CREDENTIALS_DIRECTORY"})
# The events --on-event runs its command for.
HOOK_EVENTS = frozenset({EventKind.JOINED, EventKind.REJOINED, EventKind.LEFT, EventKind.LOST, EventKind.THRESHOLD,
                         EventKind.RECOVERED, EventKind.MISSING})


class HookRunner:
    """Runs --on-event CMD (split with shlex, no shell) for each node event, with the event in its
    environment, on its own thread: at most HOOK_CONCURRENCY at once, each killed after
    HOOK_TIMEOUT_S, from a bounded queue that drops with one WARN line per burst. A command that
    fails is logged with its exit code and the end of what it wrote to stderr."""

    def __init__(self, command: list[str], events: EventLog):
        self.command = command
        self._events = events
        self._queue: collections.deque[Event] = collections.deque()
        self._wake = threading.Event()
        self.dropped = 0
        self.runs = 0
        events.subscribe(self._offer)
        threading.Thread(target=self._run_forever, name="cares-hooks", daemon=True).start()

    def _offer(self, event: Event) -> None:
        """The event log's listener: queue node events, never wait."""
        if event.kind not in HOOK_EVENTS:
            return
        if len(self._queue) >= HOOK_QUEUE_EVENTS:
            self.dropped += 1
            return
        self._queue.append(event)
        self._wake.set()

    @staticmethod
    def environment(event: Event) -> dict:
        """The event as CARES_* variables, each one printable line."""
        def text(value, limit=200):
            return "" if value is None else sanitize_text(str(value).replace("\n", " "), limit)
        values = event.values
        # The hook inherits cares' environment, but not its secrets or its systemd plumbing: a
        # command that posts to a webhook must never carry the cluster token along.
        inherited = {key: value for key, value in os.environ.items() if key not in HOOK_HIDDEN_VARIABLES}
        return {**inherited, "CARES_EVENT": event.kind.value, "CARES_NODE_ID": event.node_id,
                "CARES_HOSTNAME": text(values.get("hostname")), "CARES_ADDRESS": text(values.get("address")),
                "CARES_CPU_PERCENT": text(values.get("cpu_percent")),
                "CARES_MEMORY_PERCENT": text(values.get("memory_percent")), "CARES_MESSAGE": text(event.text, 500)}

    def _run_forever(self) -> None:
        running: list[tuple] = []  # (process, event, started at, stderr file)
        reported = 0
        failures = 0
        while True:
            self._wake.wait(0.1 if running else None)
            self._wake.clear()
            try:
                # Reap first, then start: started after a reap, the queue waits for no one's event.
                running = [entry for entry in running if entry[0] is not None and not self._finished(*entry)]
                while self._queue and len(running) < HOOK_CONCURRENCY:
                    running.append(self._start(self._queue.popleft()))
            except Exception as error:  # a full temp dir, no file descriptors left: say so, go on
                failures += 1
                if _is_power_of_ten(failures):
                    self._events.add(Level.ERROR, sanitize_text(f"Event hooks failed ({failures} time(s) so far): "
                                                                f"{type(error).__name__}: {error}", ERROR_TEXT_LIMIT))
            if self.dropped != reported:
                self._events.add(Level.WARN, f"Event hook too slow: {self.dropped - reported} event(s) dropped "
                                             f"(at most {HOOK_QUEUE_EVENTS} wait).")
                reported = self.dropped

    def _start(self, event: Event) -> tuple:
        import tempfile
        try:
            errors = tempfile.TemporaryFile()
        except OSError as error:
            self._events.add(Level.WARN, f"Event hook for {event.kind.value} of '{event.node_id}' not run: "
                                         f"no temporary file ({error.strerror or error}).")
            return (None, event, 0.0, None)
        try:
            process = subprocess.Popen(self.command, env=self.environment(event), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
        except OSError as error:
            errors.close()
            self._events.add(Level.WARN, f"Event hook {shlex.join(self.command)!r} could not start: "
                                         f"{error.strerror or error}.")
            return (None, event, 0.0, None)
        self.runs += 1
        return (process, event, time.monotonic(), errors)

    def _finished(self, process, event: Event, started: float, errors) -> bool:
        code = process.poll()
        if code is None and time.monotonic() - started < HOOK_TIMEOUT_S:
            return False
        if code is None:
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            problem = f"killed after {HOOK_TIMEOUT_S:g} s"
        elif code != 0:
            errors.seek(max(errors.seek(0, os.SEEK_END) - 200, 0))
            tail = errors.read(200).decode("utf-8", "replace").strip().splitlines()
            problem = f"exited with {code}" + (f": {sanitize_text(tail[-1], 120)}" if tail else "")
        else:
            problem = ""
        errors.close()
        if problem:
            self._events.add(Level.WARN, f"Event hook for {event.kind.value} of '{event.node_id}' {problem}.")
        return True


# ---------------------------------------------------------------------------
# 4b. /metrics and /sd: the registry in Prometheus' text format 0.0.4, and the
#     Active workers as Prometheus HTTP service discovery targets, served by a
#     small HTTP server on its own thread and event loop (never the gRPC loop's).
#     Holds: render_metrics, service discovery, MetricsServer. Talks to: 3 (node
#     snapshots and counters, handed in by the Orchestrator as a callable).
# ---------------------------------------------------------------------------

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Prometheus refuses an SD answer with any other Content-Type.
SD_CONTENT_TYPE = "application/json"
# node_exporter's port: what /sd points Prometheus at unless ?port=N says otherwise.
DEFAULT_SD_PORT = 9100

# Per-node gauges read from a worker's latest sample, in exposition order:
# (sample attribute, metric name, HELP). Names follow Prometheus' naming guide and node_exporter
# (base units, the unit as suffix). Percentages stay 0-100 `_percent` as the issue names them,
# although the guide prefers 0-1 `_ratio`: one scale for every percentage cares exports.
SAMPLE_GAUGES = (
    ("cpu_percent", "cares_node_cpu_percent", "CPU use over the last heartbeat interval, 0-100."),
    ("memory_percent", "cares_node_memory_percent", "Memory in use, 0-100."),
    ("memory_used_bytes", "cares_node_memory_used_bytes", "Memory in use (total minus available), in bytes."),
    ("swap_percent", "cares_node_swap_percent", "Swap in use, 0-100."),
    ("load_average_1m", "cares_node_load1", "1-minute load average."),
    ("load_average_5m", "cares_node_load5", "5-minute load average."),
    ("load_average_15m", "cares_node_load15", "15-minute load average."),
    ("boot_time_unix_s", "cares_node_boot_timestamp_seconds", "When the node booted, in Unix seconds."),
    ("root_fs_used_percent", "cares_node_root_filesystem_used_percent",
     "Space in use on the file system holding /, 0-100."),
    ("root_fs_size_bytes", "cares_node_root_filesystem_size_bytes", "Size of the file system holding /, in bytes."),
    ("disk_read_bytes_per_s", "cares_node_disk_read_bytes_per_second",
     "Bytes read from physical disks per second, over the last heartbeat interval."),
    ("disk_write_bytes_per_s", "cares_node_disk_written_bytes_per_second",
     "Bytes written to physical disks per second, over the last heartbeat interval."),
    ("net_receive_bytes_per_s", "cares_node_network_receive_bytes_per_second",
     "Bytes received on non-loopback interfaces per second, over the last heartbeat interval."),
    ("net_transmit_bytes_per_s", "cares_node_network_transmit_bytes_per_second",
     "Bytes sent on non-loopback interfaces per second, over the last heartbeat interval."),
)


# -- the text exposition format ----------------------------------------------

def escape_label_value(value: str) -> str:
    """A label value as the text format quotes it: backslash, double quote and line feed escaped.
    Anything else, carriage returns and tabs included, is allowed as it is."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_sample_value(value: float) -> str:
    """A sample value as Go's ParseFloat reads it: repr() gives the shortest text that reads back
    as the same float; NaN and infinities are spelled as the format wants. Called for every
    series, so the common case is the first test."""
    if value - value == 0:  # finite (for NaN and infinities this is NaN)
        return repr(value)
    if value != value:
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"


_INVALID_LABEL_NAME_CHARS = re.compile(r"[^A-Za-z0-9_]")


@functools.lru_cache(maxsize=1024)
def node_label_names(keys: tuple) -> dict:
    """Prometheus label names for a node's label keys (sorted), e.g. {"rack.row": "label_rack_row"}.

    Keys may hold '.' and '-', which label names may not: they become '_'. The prefix keeps them
    clear of node_id, hostname and the other fixed names, and of the reserved '__' prefix. Keys
    that needed no change keep their name; a changed key whose name is taken (both "a.b" and
    "a-b") gets "_2", "_3"... in key order, so a node's series never repeat a label name.
    Cached: most nodes share one set of keys."""
    names: dict = {}
    taken: set = set()
    unchanged = [key for key in keys if not _INVALID_LABEL_NAME_CHARS.search(key)]
    for key in unchanged + [key for key in keys if _INVALID_LABEL_NAME_CHARS.search(key)]:
        name = base = "label_" + _INVALID_LABEL_NAME_CHARS.sub("_", key)
        suffix = 2
        while name in taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        names[key] = name
        taken.add(name)
    return names


def node_labels_text(node) -> str:
    """The labels every per-node series carries, in a fixed order: node_id, hostname, then the
    node's own labels sorted by key, already escaped and joined: 'node_id="a",hostname="b"'."""
    parts = [f'node_id="{escape_label_value(node.node_id)}"', f'hostname="{escape_label_value(node.hostname)}"']
    labels = node.labels or {}
    if labels:
        keys = tuple(sorted(labels))
        names = node_label_names(keys)
        parts.extend(f'{names[key]}="{escape_label_value(labels[key])}"' for key in keys)
    return ",".join(parts)


# Rendering holds the GIL, and a thread that wants it (the gRPC loop, with a heartbeat to apply)
# waits up to the interpreter's switch interval, 5 ms, before it gets it: measured, a 1 ms timer
# thread ran 5.3 ms late at the median while pages rendered. So the page is built in blocks: every
# RENDER_BLOCK series the lines so far are encoded (no single join or encode of the whole page,
# which held the GIL for 57 ms at 10,000 nodes) and the render sleeps a moment, handing the GIL
# over at once: the same timer's median fell below 0.4 ms.
RENDER_BLOCK = 512
RENDER_PAUSE_S = 0.0001


class _Page:
    """A page's lines, encoded a block at a time into chunks (each ending with a line feed)."""

    def __init__(self):
        self.lines: list = []
        self.chunks: list = []

    def paced(self, items: list):
        """items, encoding the lines so far and pausing every RENDER_BLOCK of them."""
        for start in range(0, len(items), RENDER_BLOCK):
            if start:
                self.flush()
                time.sleep(RENDER_PAUSE_S)
            yield from items[start:start + RENDER_BLOCK]

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def flush(self) -> None:
        if self.lines:
            # "replace": a lone surrogate in some text becomes "?" instead of failing the page.
            self.chunks.append(("\n".join(self.lines) + "\n").encode("utf-8", "replace"))
            self.lines.clear()


def render_metrics(nodes, counters, version: str) -> str:
    """The whole /metrics page as one string (see render_metrics_chunks)."""
    return b"".join(render_metrics_chunks(nodes, counters, version)).decode("utf-8")


def render_metrics_chunks(nodes, counters, version: str) -> list:
    """The /metrics page from one registry snapshot, as UTF-8 chunks: per-node families (series
    sorted by node ID), then cluster and process families. Families appear even when empty, so
    the page's shape does not depend on the cluster. A node's measurements appear only while it
    is Active: a node without a sample yet has no value rather than 0, and a gone node's last
    values would otherwise stay flat forever (and keep firing alerts); cares_node_up says it is gone."""
    page = _Page()
    nodes = sorted(nodes, key=lambda node: node.node_id)
    labelled = [(node, node_labels_text(node)) for node in page.paced(nodes)]
    active = [(node, labels) for node, labels in labelled if node.status is NodeStatus.ACTIVE and node.metrics]
    add = page.lines.append

    page.family("cares_node_up", "gauge", "1 if the node is Active (its heartbeats arrive), 0 otherwise.")
    for node, labels in page.paced(labelled):
        add(f"cares_node_up{{{labels}}} {1 if node.status is NodeStatus.ACTIVE else 0}")
    page.family("cares_node_info", "gauge", "The platform and cares version a node reported when it joined; always 1.")
    for node, labels in page.paced(labelled):
        add(f'cares_node_info{{{labels},platform="{escape_label_value(node.platform)}",'
            f'version="{escape_label_value(node.version)}"}} 1')
    page.family("cares_node_joined_timestamp_seconds", "gauge", "When the node first joined, in Unix seconds.")
    for node, labels in page.paced(labelled):
        if node.joined_at:
            add(f"cares_node_joined_timestamp_seconds{{{labels}}} {format_sample_value(node.joined_at)}")
    page.family("cares_node_last_seen_timestamp_seconds", "gauge",
                "When the node's last accepted sample arrived, in Unix seconds.")
    for node, labels in page.paced(labelled):
        if node.last_seen:
            add(f"cares_node_last_seen_timestamp_seconds{{{labels}}} {format_sample_value(node.last_seen)}")
    page.family("cares_node_cpus", "gauge", "Logical CPUs the node reported when it joined.")
    for node, labels in page.paced(labelled):
        if node.cpu_count:
            add(f"cares_node_cpus{{{labels}}} {node.cpu_count}")
    page.family("cares_node_memory_total_bytes", "gauge", "Physical memory of the node, in bytes.")
    for node, labels in page.paced(labelled):
        total = _memory_total(node)
        if total:
            add(f"cares_node_memory_total_bytes{{{labels}}} {format_sample_value(total)}")
    for attribute, name, help_text in SAMPLE_GAUGES:
        page.family(name, "gauge", help_text)
        for node, labels in page.paced(active):
            value = getattr(node.metrics, attribute)  # None: that worker does not measure it
            if value is not None:
                add(f"{name}{{{labels}}} {format_sample_value(value)}")

    _render_cluster(page, nodes, counters, version)
    page.flush()
    return page.chunks


def _memory_total(node):
    """The latest sample's memory total, else what the node said at its join; 0 when unknown."""
    sampled = node.metrics.memory_total_bytes if node.metrics is not None else None
    return sampled if sampled else node.memory_total_bytes


def _render_cluster(page: _Page, nodes, counters, version: str) -> None:
    add = page.lines.append
    page.family("cares_nodes", "gauge", "Nodes the orchestrator knows, by status.")
    counts = {status: 0 for status in NodeStatus}
    for node in nodes:
        counts[node.status] += 1
    for status, count in counts.items():
        add(f'cares_nodes{{status="{status.value}"}} {count}')
    for key, name, help_text in (
            ("heartbeats_received", "cares_heartbeats_received_total", "Heartbeat samples received, accepted or not."),
            ("samples_dropped", "cares_samples_dropped_total", "Heartbeat samples dropped as impossible."),
            ("joins", "cares_joins_total", "Joins accepted.")):
        page.family(name, "counter", help_text)
        add(f"{name} {format_sample_value(counters.get(key, 0))}")
    page.family("cares_joins_refused_total", "counter", "Joins refused, by reason.")
    refused = counters.get("joins_refused") or {}
    for reason in sorted(refused):
        add(f'cares_joins_refused_total{{reason="{escape_label_value(reason)}"}} '
            f'{format_sample_value(refused[reason])}')
    page.family("cares_build_info", "gauge", "The running cares version; always 1.")
    add(f'cares_build_info{{version="{escape_label_value(version)}"}} 1')


# -- HTTP service discovery ----------------------------------------------------

def sd_host(address: str) -> str:
    """The host part of a peer address for a scrape target: an IPv4-mapped IPv6 address (a v4
    worker seen on a dual-stack socket) as plain IPv4, "" when there is none."""
    host = host_of(address) if address else ""
    if ":" not in host:
        return host
    try:
        mapped = ipaddress.IPv6Address(host.partition("%")[0]).ipv4_mapped
    except ValueError:
        return host
    return str(mapped) if mapped else host


def sd_targets(nodes, port: int) -> list:
    """Prometheus HTTP SD target groups: one per Active worker, its host at `port`, sorted by node
    ID; [] when there are none (Prometheus wants 200 and [] rather than an error)."""
    groups = []
    for node in sorted(nodes, key=lambda node: node.node_id):
        host = sd_host(node.address)
        if node.status is not NodeStatus.ACTIVE or not host:
            continue
        groups.append({"targets": [format_address(host, port)],
                       "labels": {"cares_node_id": node.node_id, "cares_hostname": node.hostname}})
    return groups


def render_sd_chunks(nodes, port: int) -> list:
    """sd_targets as a JSON array in UTF-8 chunks, paced like /metrics (one json.dumps of
    10,000 groups holds the GIL for about 25 ms)."""
    groups = sd_targets(nodes, port)
    chunks = [b"["]
    for start in range(0, len(groups), RENDER_BLOCK):
        if start:
            time.sleep(RENDER_PAUSE_S)
            chunks.append(b",")
        block = json.dumps(groups[start:start + RENDER_BLOCK], ensure_ascii=False)[1:-1]
        chunks.append(block.encode("utf-8", "replace"))
    chunks.append(b"]")
    return chunks


# -- the HTTP server -------------------------------------------------------------

# A request head (request line and headers) must arrive whole, within this many bytes and seconds
# of the connection being accepted (after the TLS handshake, which has the same time limit). A
# fixed deadline rather than a per-read timeout: trickling a byte a second does not extend it.
HTTP_HEAD_LIMIT = 8192
HTTP_HEAD_TIMEOUT_S = 5.0
# A response not taken by the client within this long is abandoned (Prometheus' default
# scrape_timeout is 10 s).
HTTP_WRITE_TIMEOUT_S = 10.0
HTTP_WRITE_CHUNK = 256 * 1024
# Open connections; past this the oldest one still sending its head is dropped for the new one,
# so idle sockets cannot lock out a scraper, nor eat the file descriptors gRPC needs.
HTTP_MAX_CONNECTIONS = 256
# Connections the kernel may hold for us before we accept them (asyncio's default, 100, is applied
# to the socket again when serving starts): past it, a SYN waits a second to be sent again.
HTTP_BACKLOG = 1024
# Requests past their head at once (rendering, waiting to render, or being written); more get 503.
# Renders run one at a time, on one thread: bounded CPU, and at most this many pages in memory.
HTTP_MAX_BUSY = 8
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            429: "Too Many Requests", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}
_ALLOWED_METHODS = "GET, HEAD"


class HttpRequest:
    """The parts of a request head that /metrics and /sd use."""

    def __init__(self, method: str, path: str, query: str, headers: dict):
        self.method, self.path, self.query, self.headers = method, path, query, headers


def parse_request_head(head: bytes) -> HttpRequest:
    """Parse 'METHOD TARGET HTTP/1.x' and its header lines; ValueError names what is wrong.
    Header names are lower-cased; a repeated header keeps its first value."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/1."):
        raise ValueError("malformed request line")
    headers: dict = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or line[0] in " \t":
            raise ValueError("malformed header line")
        headers.setdefault(name.lower(), value.strip(" \t"))
    import urllib.parse
    target = urllib.parse.urlsplit(parts[1])
    return HttpRequest(parts[0], target.path, target.query, headers)


def peer_host_of(writer: asyncio.StreamWriter) -> str:
    """An HTTP client's host, the source a wrong token is counted against (as peer_host for gRPC)."""
    peer = writer.get_extra_info("peername")
    return sanitize_text(str(peer[0]), 64) if peer else "unknown"


def bearer_token(authorization: str | None) -> str:
    """The token an Authorization header carries as `Bearer <token>`; "" for none or another scheme."""
    scheme, _, given = (authorization or "").partition(" ")
    return given.strip(" ") if scheme.lower() == "bearer" else ""


def http_response(status: int, body=b"", content_type: str = "text/plain; charset=utf-8",
                  extra: tuple = (), head_only: bool = False) -> list:
    """A whole HTTP/1.1 response as a list of byte pieces (the head, then the body's chunks, never
    joined: a 30 MB copy would hold the GIL). Every response closes its connection."""
    chunks = [body] if isinstance(body, bytes) else body
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}",
             f"Content-Length: {sum(map(len, chunks))}", "Connection: close", "Cache-Control: no-store",
             *extra, "", ""]
    return ["\r\n".join(lines).encode("latin-1"), *([] if head_only else chunks)]


def _error(status: int, text: str, extra: tuple = (), head_only: bool = False) -> list:
    return http_response(status, (text + "\n").encode(), extra=extra, head_only=head_only)


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an Accept-Encoding header names gzip without q=0 (Prometheus always sends gzip)."""
    for item in (accept_encoding or "").split(","):
        coding, _, parameter = item.partition(";")
        if coding.strip().lower() != "gzip":
            continue
        name, _, weight = parameter.strip().partition("=")
        try:
            return name.strip().lower() != "q" or float(weight) > 0
        except ValueError:
            return False
    return False


def gzip_chunks(chunks: list) -> list:
    """gzip at level 1, chunk by chunk: a 10,000-node page shrinks 20-fold for about a third of
    its render time, and zlib lets go of the GIL while it works."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    pieces = [compressor.compress(chunk) for chunk in chunks]
    pieces.append(compressor.flush())
    return [piece for piece in pieces if piece]


def parse_sd_port(query: str, default: int) -> int:
    """The ?port=N of a /sd request; ValueError unless it is one number 1-65535."""
    import urllib.parse
    values = urllib.parse.parse_qs(query, keep_blank_values=True).get("port")
    if values is None:
        return default
    if len(values) != 1 or not values[0].isascii() or not values[0].isdigit() or not 1 <= int(values[0]) <= 65535:
        raise ValueError("port must be one number 1-65535")
    return int(values[0])


async def write_in_slices(writer: asyncio.StreamWriter, pieces: list, deadline: float) -> None:
    """Write pieces HTTP_WRITE_CHUNK at a time, draining after each, then close: all by the
    monotonic deadline (asyncio.TimeoutError past it; ConnectionError if the client closed)."""
    for piece in pieces:
        view = memoryview(piece)
        for offset in range(0, len(view), HTTP_WRITE_CHUNK):
            if writer.is_closing():
                raise ConnectionError("closed by the client")
            writer.write(view[offset:offset + HTTP_WRITE_CHUNK])
            await asyncio.wait_for(writer.drain(), max(deadline - time.monotonic(), 0))
    writer.close()
    await asyncio.wait_for(writer.wait_closed(), max(deadline - time.monotonic(), 0))


def metrics_tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The server side of HTTPS for /metrics and /sd; StartError (one line) for files it cannot use."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise StartError(f"cannot use the TLS certificate and key for /metrics: "
                         f"{getattr(error, 'strerror', None) or error}") from None
    return context


class MetricsServer:
    """GET /metrics and /sd over HTTP or HTTPS, on its own daemon thread and asyncio event loop.

    Why not http.server: ThreadingHTTPServer starts a thread per connection (1,000 idle sockets,
    1,000 threads) and a bounded pool lets a few idle sockets lock scrapes out. Here an idle
    socket costs a file descriptor and a little memory, never a thread; a request runs only once
    its whole head has arrived, and rendering, the one costly step, runs on one worker thread.
    snapshot() is called there: it must be safe from any thread and return (nodes, counters).
    """

    def __init__(self, host: str, port: int, snapshot, version: str, *, token: str | None = None,
                 open_access: bool = False, tls_cert: str | None = None, tls_key: str | None = None,
                 sd_port: int = DEFAULT_SD_PORT, log=None):
        self.host, self.port = host, port
        self._snapshot, self._version = snapshot, version
        # Its own guard, so guessing here is as slow as over gRPC, but a Prometheus scraping with
        # a stale token every second does not lock the workers on its host out of joining.
        self._guard = TokenGuard(None if open_access else token)
        self._tls_files = (tls_cert, tls_key) if tls_cert else None
        self._sd_port = sd_port
        self._log = log
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._renderer: concurrent.futures.ThreadPoolExecutor | None = None
        self._open: dict = {}  # writer -> True while it is still sending its head; insertion-ordered
        self._busy: set = set()  # writers whose request is being rendered or answered
        self._problems: dict = {}  # kind -> count, for logging sparingly

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def scheme(self) -> str:
        return "https" if self._tls_files else "http"

    @property
    def needs_token(self) -> bool:
        return self._guard.token is not None

    def start(self) -> None:
        """Listen and serve on a background thread; StartError (one line) if that cannot be done."""
        context = metrics_tls_context(*self._tls_files) if self._tls_files else None
        sock = self._bind()
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._on_loop_exception)
        self._renderer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cares-metrics-render")
        self._thread = threading.Thread(target=self._loop.run_forever, name="cares-metrics", daemon=True)
        self._thread.start()
        tls_limits = {}
        if context:
            # A TLS client gets as long for its handshake as for its request head, and as long to
            # answer our goodbye (Python 3.11+; 3.10 does not wait for it).
            tls_limits["ssl_handshake_timeout"] = HTTP_HEAD_TIMEOUT_S
            if sys.version_info >= (3, 11):
                tls_limits["ssl_shutdown_timeout"] = HTTP_HEAD_TIMEOUT_S
        serving = asyncio.start_server(self._serve_connection, sock=sock, ssl=context, limit=HTTP_HEAD_LIMIT,
                                       backlog=HTTP_BACKLOG, **tls_limits)
        try:
            self._server = asyncio.run_coroutine_threadsafe(serving, self._loop).result(timeout=10)
        except Exception as error:
            sock.close()
            self.stop()
            raise StartError(f"cannot serve /metrics on {self.address}: {error}") from None

    def _bind(self) -> socket.socket:
        """The listening socket; '::' (or '') listens on IPv4 too, as the gRPC port does."""
        host = self.host or "::"
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(host, self.port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE)[0]
        except OSError:
            raise StartError(f"cannot listen on {self.address} for /metrics: host name not found") from None
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
            sock.listen(HTTP_BACKLOG)
        except OSError as error:
            sock.close()
            why = f"port {self.port} is already in use" if error.errno == errno.EADDRINUSE else error.strerror
            raise StartError(f"cannot listen on {self.address} for /metrics: {why or error}") from None
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        return sock

    def stop(self) -> None:
        """Stop serving and end the thread; open connections are dropped."""
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shut_down(), loop).result(timeout=5)
            except Exception:  # stopping anyway; the thread is a daemon
                pass
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=5)
        if not loop.is_running():
            loop.close()
        self._renderer.shutdown(wait=False, cancel_futures=True)

    async def _shut_down(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1)

    # -- one connection, one request -----------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._make_room()
        self._open[writer] = True
        answered = False
        try:
            response = await self._respond(reader, writer)
            if response:
                await self._send(writer, response)
            answered = True
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass  # the client went away, broke TLS or was too slow: nothing more to say
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug: count and log it, never a traceback on the terminal
            self._note("bug", Level.ERROR, f"/metrics request failed: {type(error).__name__}: {error}")
        finally:
            self._open.pop(writer, None)
            self._busy.discard(writer)
            if answered:
                writer.close()
            else:
                writer.transport.abort()  # cut off: drop what is buffered at once

    def _make_room(self) -> None:
        """At the connection limit, drop the oldest connection still sending its head."""
        if len(self._open) < HTTP_MAX_CONNECTIONS:
            return
        oldest = next((writer for writer, reading in self._open.items() if reading), None)
        if oldest is not None:
            self._open.pop(oldest)
            oldest.transport.abort()
            self._note("evicted", Level.WARN, "/metrics: too many open connections; dropped idle ones")

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> list | None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HTTP_HEAD_TIMEOUT_S)
        except asyncio.LimitOverrunError:
            return _error(431, f"request head over {HTTP_HEAD_LIMIT} bytes")
        except asyncio.TimeoutError:
            self._note("slow", Level.WARN, f"/metrics: dropped requests not sent within {HTTP_HEAD_TIMEOUT_S:.0f} s")
            return _error(408, "request not received in time")
        except asyncio.IncompleteReadError:
            return None
        self._open[writer] = False
        try:
            request = parse_request_head(head)
        except ValueError as error:
            return _error(400, str(error))
        head_only = request.method == "HEAD"
        if request.path not in ("/metrics", "/sd"):
            return _error(404, "not found: cares serves /metrics and /sd", head_only=head_only)
        if request.method not in ("GET", "HEAD"):
            return _error(405, f"method not allowed: use {_ALLOWED_METHODS}", (f"Allow: {_ALLOWED_METHODS}",))
        if self.needs_token:
            authorization = request.headers.get("authorization")
            try:
                await self._guard.verify(bearer_token(authorization), peer_host_of(writer))
            except Refusal as refusal:
                return self._unauthorized(authorization, refusal, head_only)
        if len(self._busy) >= HTTP_MAX_BUSY:
            self._note("busy", Level.WARN, "/metrics: refused requests while too many were under way")
            return _error(503, "too many requests under way", ("Retry-After: 1",), head_only)
        self._busy.add(writer)  # until the answer is written (_serve_connection lets go)
        return await self._render(request, head_only)

    def _unauthorized(self, authorization: str | None, refusal: Refusal, head_only: bool) -> list:
        if refusal.reason is RefusalReason.THROTTLED:
            self._note("throttled", Level.WARN, "/metrics: refused requests from addresses that sent too many "
                                                "wrong tokens")
            return _error(refusal.reason.http, refusal.message, (f"Retry-After: {TOKEN_LOCKOUT_S:.0f}",), head_only)
        if authorization and " " not in authorization.strip():
            # Prometheus 2.42 sends http_sd_configs' credentials without their "Bearer " (its
            # docs say Bearer is the default; it is not there): say so, as Prometheus only logs 401.
            self._note("bare_token", Level.WARN, "/metrics: refused an Authorization header without 'Bearer '; "
                                                 "in Prometheus' http_sd_configs set authorization.type: Bearer")
        else:
            self._note("unauthorized", Level.WARN, "/metrics: refused requests without the cluster token")
        return _error(RefusalReason.WRONG_TOKEN.http, "this cluster needs Authorization: Bearer <token>",
                      ('WWW-Authenticate: Bearer realm="cares"',), head_only)

    async def _render(self, request: HttpRequest, head_only: bool) -> list:
        """The page for a valid request, rendered on the render thread from one snapshot."""
        if request.path == "/sd":
            try:
                port = parse_sd_port(request.query, self._sd_port)
            except ValueError as error:
                return _error(400, str(error), head_only=head_only)
            page, content_type = functools.partial(self._sd_page, port), SD_CONTENT_TYPE
        else:
            page, content_type = self._metrics_page, METRICS_CONTENT_TYPE
        gzipped = accepts_gzip(request.headers.get("accept-encoding"))
        try:
            body = await asyncio.get_running_loop().run_in_executor(self._renderer, self._build, page, gzipped)
        except Exception as error:
            self._note("render", Level.ERROR, f"/metrics could not be rendered: {type(error).__name__}: {error}")
            return _error(500, "internal error; see the orchestrator's log", head_only=head_only)
        extra = ("Content-Encoding: gzip", "Vary: Accept-Encoding") if gzipped else ("Vary: Accept-Encoding",)
        return http_response(200, body, content_type, extra, head_only)

    @staticmethod
    def _build(page, gzipped: bool) -> list:
        with collection_deferred():
            chunks = page()
        return gzip_chunks(chunks) if gzipped else chunks

    def _metrics_page(self) -> list:
        nodes, counters = self._snapshot()
        return render_metrics_chunks(nodes, counters, self._version)

    def _sd_page(self, port: int) -> list:
        nodes, _ = self._snapshot()
        return render_sd_chunks(nodes, port)

    async def _send(self, writer: asyncio.StreamWriter, pieces: list) -> None:
        """Write a slice at a time, waiting for room after each: a slow reader holds a slice or
        two of buffer, not the page. Then close, which flushes what is left (and says goodbye to
        a TLS client). All of it within the write deadline; past it, ConnectionError."""
        try:
            await write_in_slices(writer, pieces, time.monotonic() + HTTP_WRITE_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._note("slow_reader", Level.WARN, "/metrics: dropped clients too slow to read their answer")
            raise ConnectionError("write deadline passed") from None

    # -- telling the orchestrator's log, sparingly ------------------------------------

    def _note(self, kind: str, level: Level, text: str) -> None:
        """Log the 1st, 10th, 100th... problem of a kind: a flood becomes a few lines."""
        count = self._problems[kind] = self._problems.get(kind, 0) + 1
        if self._log is not None and _is_power_of_ten(count):
            self._log(level, text if count == 1 else f"{text} ({count} so far)")

    def _on_loop_exception(self, loop, context: dict) -> None:
        """asyncio's own error reports (a transport failing mid-handshake...) go to the log, not stderr."""
        error = context.get("exception")
        self._note("loop", Level.WARN, f"/metrics server: {context.get('message', 'error')}"
                                       + (f": {type(error).__name__}: {error}" if error else ""))


# ---------------------------------------------------------------------------
# 4c. The Orchestrator: 3, 4 and 4b put together, and their life (start, the
#     periodic sweep, housekeeping and detail requests, stop). OrchestratorConfig
#     is what the command line and the create form fill in.
# ---------------------------------------------------------------------------

class Orchestrator:
    """The gRPC server, its registry and the liveness sweep, running on the gRPC loop."""

    def __init__(self, listen: str = DEFAULT_LISTEN, *, token: str | None = None, tls_cert: bytes | None = None,
                 tls_key: bytes | None = None, heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
                 max_nodes: int = DEFAULT_MAX_NODES, forget_after_s: float | None = DEFAULT_FORGET_AFTER_S,
                 state_dir: str | None = None, on_event: list[str] | None = None, alerts: tuple = (),
                 metrics_listen: str | None = None, metrics_open: bool = False,
                 tls_files: tuple[str, str] | None = None, history_days: int = DEFAULT_HISTORY_DAYS):
        self.listen_host, port = parse_address(listen, allow_port_zero=True)
        heartbeat_ms = clamp_heartbeat_ms(heartbeat_ms)
        self.registry = NodeRegistry(max_nodes=max_nodes, heartbeat_interval=heartbeat_ms / 1000.0)
        self.registry.alert_rules = tuple(alerts)
        self.state_dir = state_dir
        self.state: StateFile | None = None
        self.history_days = history_days  # 0: keep none (and none without a state directory)
        self.history: HistoryStore | None = None
        self._saved_changes, self._saved_at = -1, -math.inf
        self._forgot_at = -math.inf
        self.on_event = on_event
        self.hooks: HookRunner | None = None  # started with the orchestrator
        guard = TokenGuard(token)
        self.metrics: MetricsServer | None = None
        if metrics_listen:
            host, metrics_port = parse_address(metrics_listen, allow_port_zero=True)
            cert, key = tls_files or (None, None)
            self.metrics = MetricsServer(host, metrics_port, self.metrics_snapshot, VERSION, token=token,
                                         open_access=metrics_open, tls_cert=cert, tls_key=key,
                                         log=lambda level, text: self.registry.events.add(level, text))
        self.token = token
        self.tls = (tls_key, tls_cert) if tls_cert else None
        self.port = port
        self.forget_after_s = forget_after_s
        self.servicer = ClusterServicer(self.registry, guard, heartbeat_ms)
        self._asked_ms = heartbeat_ms
        self._status = StatusServicer(self.registry, guard, self.watch_detail, lambda: self.history)
        self._server = None
        self._tasks: list[asyncio.Task] = []
        self._interval_lock: asyncio.Lock | None = None
        self._stall_reported_at = -math.inf
        self.join_hosts: list[str] = []

    @property
    def address(self) -> str:
        return format_address(self.listen_host, self.port)

    @property
    def heartbeat_ms(self) -> int:
        """The interval last asked of workers, at once (the UI steps from it); the streams and the
        registry's silence limit follow on the gRPC loop."""
        return self._asked_ms

    def start(self) -> None:
        """Listen and serve on a background thread; StartError if the address cannot be used."""
        # Other threads (the dashboard, /metrics renders, the state writer) hold the GIL for up to
        # the switch interval before the gRPC loop gets it back: 5 ms by default, paid by every
        # heartbeat that arrives meanwhile. 1 ms keeps the loop's tail short for a little switching.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        raise_open_file_limit()
        if not run_on_grpc_loop(self._bind(), timeout=10):
            # Asked here, not on the event loop: finding out why may mean a DNS lookup.
            raise StartError(explain_bind_failure(self.listen_host, self.port))
        try:
            # The known nodes come back before the first worker is served: one that rejoins at
            # once must find its row (and its owner's claim), not make a new one.
            self._open_state(self.address)  # the bound address: port 0 becomes the port it got
            if self.on_event:
                self.hooks = HookRunner(self.on_event, self.registry.events)
            run_on_grpc_loop(self._serve(), timeout=10)
            self.join_hosts = join_addresses(self.listen_host, self.port, psutil.net_if_addrs())
            self.registry.events.add(Level.INFO, f"Orchestrator listening on {self.address}.")
            if self.metrics is not None:
                self.metrics.start()
                access = "Bearer token required" if self.metrics.needs_token else "open"
                self.registry.events.add(Level.INFO, f"Prometheus metrics on {self.metrics.scheme}://"
                                                     f"{self.metrics.address}/metrics and /sd ({access}).")
        except BaseException:  # /metrics cannot listen, SIGTERM mid-start: leave no port held
            self.stop(0.1)
            raise

    def metrics_snapshot(self) -> tuple[list[Node], dict]:
        """What /metrics renders: the nodes and the counters in the names it exports. Called on the
        metrics server's render thread."""
        counters = self.registry.counters()
        refused = {reason.label: 0 for reason in RefusalReason if reason.is_join}
        for (what, reason), count in counters["refusals"].items():
            if what.is_join and reason.is_join:
                refused[reason.label] += count
        return self.registry.snapshot(with_history=False), {
            "heartbeats_received": counters["heartbeats_received"], "samples_dropped": counters["samples_dropped"],
            "joins": counters["joins_accepted"], "joins_refused": refused}

    def _open_state(self, listen: str) -> None:
        """Bring back the nodes known before a restart, as Missing until they rejoin."""
        if self.state_dir is None:
            return
        directory = usable_state_dir(self.state_dir)
        if directory is None:
            self.registry.events.add(Level.WARN, f"Cannot write to the state directory {self.state_dir}: "
                                                 f"known nodes will not survive a restart.")
            return
        self.state = StateFile(directory, listen, self.registry.events)
        if self.history_days > 0:
            self.history = HistoryStore(directory, listen, self.registry.events, self.history_days)
            self.registry.history_sink, self.registry.on_forget = self.history.add, self.history.forget
        restored = self.registry.restore(self.state.load())
        if restored:
            self.registry.events.add(Level.INFO, f"{restored} known node(s) from {self.state.path} are Missing "
                                                 f"until they rejoin.")

    async def _bind(self) -> bool:
        """Bind the gRPC server (not serving yet); False when the address cannot be bound."""
        server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_ClusterServiceServicer_to_server(self.servicer, server)
        pb_grpc.add_StatusServiceServicer_to_server(self._status, server)
        try:
            if self.tls:
                port = server.add_secure_port(self.address, grpc.ssl_server_credentials([self.tls]))
            else:
                port = server.add_insecure_port(self.address)
        except RuntimeError:
            port = 0
        if not port:
            await server.stop(None)
            return False
        self.port = port
        self._server = server
        return True

    async def _serve(self) -> None:
        await self._server.start()
        self._interval_lock = asyncio.Lock()
        self._tasks = [asyncio.ensure_future(self._every(lambda: self.registry.heartbeat_interval / 2,
                                                         self._sweep, "liveness sweep")),
                       asyncio.ensure_future(self._every(lambda: HOUSEKEEPING_S, self._housekeeping,
                                                         "housekeeping")),
                       asyncio.ensure_future(self._every(lambda: detail_period(self.registry.heartbeat_interval),
                                                         self._ask_for_detail, "detail requests"))]

    async def _every(self, period, step, name: str) -> None:
        """Run step every period() seconds for as long as the orchestrator runs. An exception in a
        step is logged (sparingly) and the next step runs as usual: a background task never
        ends silently, or the sweep's death would leave silent nodes Active forever."""
        failures = 0
        while True:
            slept = period()
            await asyncio.sleep(slept)
            try:
                step(slept)
            except Exception as error:
                failures += 1
                if _is_power_of_ten(failures):
                    self.registry.events.add(Level.ERROR, sanitize_text(
                        f"The {name} failed ({failures} time(s) so far), and keeps running: "
                        f"{type(error).__name__}: {error}", ERROR_TEXT_LIMIT))

    def _sweep(self, period: float) -> None:
        # The period this sweep slept, not the one in force now: after a shorter interval was
        # asked, the old sleep's length is no stall.
        stall = self.registry.clock.tick(period)
        if stall >= STALL_REPORT_S and time.monotonic() - self._stall_reported_at > 60.0:
            self._stall_reported_at = time.monotonic()
            self.registry.events.add(Level.WARN, f"The orchestrator was stalled for {stall:.1f} s; "
                                                 f"nodes were given that much more time to be heard from.")
        self.servicer.end_expired_streams(self.registry.expire())

    def _ask_for_detail(self, period: float) -> None:
        watched = self.registry.detail_watched()
        if watched:  # nobody looking: nothing sent, nothing asked of any worker
            self.servicer.ask_for_detail(watched)

    def watch_detail(self, node_id: str) -> None:
        """Someone looks at node_id's detail (its detail view, each redraw; `status --top`): keep
        asking its worker for DETAIL_LAPSE_INTERVALS more periods, and ask at once the first time.
        Any thread."""
        seconds = DETAIL_LAPSE_INTERVALS * detail_period(self.registry.heartbeat_interval)
        if self.registry.detail_watch.watch(node_id, seconds) and self._server is not None:
            grpc_loop().call_soon_threadsafe(self._ask_for_detail, 0.0)

    def _housekeeping(self, period: float) -> None:
        self.registry.refusals.flush()
        self.registry.announce_missing()
        # Forgetting after hours needs no look every second (scanning 10,000 nodes took the loop
        # 7 ms): at most a tenth of --forget-after late, and never more than FORGET_CHECK_S.
        if self.forget_after_s and \
                time.monotonic() - self._forgot_at >= min(FORGET_CHECK_S, self.forget_after_s / 10):
            self._forgot_at = time.monotonic()
            self.registry.forget_gone(older_than_s=self.forget_after_s)
        self._save_state()

    def _save_state(self, now: float | None = None) -> None:
        """Hand the inventory to the state file's writer: soon after nodes change, else once a minute."""
        if self.state is None:
            return
        now = time.monotonic() if now is None else now
        changed = self.registry.changes != self._saved_changes
        if now - self._saved_at >= (STATE_SAVE_S if changed else STATE_REFRESH_S):
            self._saved_changes, self._saved_at = self.registry.changes, now
            self.state.save(self.registry.inventory)

    def forget_gone(self) -> int:
        """Forget every Disconnected and Missing node (the dashboard's x)."""
        return self.registry.forget_gone()

    def set_heartbeat_interval(self, milliseconds: int) -> concurrent.futures.Future:
        """Ask every worker to heartbeat at a new interval. Returns at once (the UI thread calls
        this); the future completes when every stream was told."""
        self._asked_ms = clamp_heartbeat_ms(milliseconds)
        return asyncio.run_coroutine_threadsafe(self._change_interval(self._asked_ms), grpc_loop())

    async def _change_interval(self, milliseconds: int) -> None:
        async with self._interval_lock:  # one change at a time
            seconds = milliseconds / 1000.0
            self.registry.heartbeat_interval = max(self.registry.heartbeat_interval, seconds)
            self.servicer.interval_ms = milliseconds
            await self.servicer.tell_everyone_interval(timeout=1.0)
            # Shorten the silence limit only after workers were told, so none is lost for obeying late.
            self.registry.heartbeat_interval = seconds
        self.registry.events.add(Level.INFO, f"Heartbeat interval set to {seconds:.2f} s.")

    def stop(self, grace: float = 1.0) -> None:
        """Tell every worker we are shutting down, then stop serving."""
        if self._server is None:
            return
        try:
            run_on_grpc_loop(self._stop(grace), timeout=grace + 5)
        except Exception as error:  # the process is exiting either way; say why it was not clean
            self.registry.events.add(Level.WARN, f"Unclean shutdown: {error!r}")
        self._server = None
        if self.metrics is not None:
            self.metrics.stop()
        if self.state is not None:
            self._save_state(now=math.inf)
            self.state.flush(timeout=2.0)
        if self.history is not None:
            self.history.stop(timeout=5.0)
        self.registry.events.add(Level.INFO, "Orchestrator stopped.")

    async def _stop(self, grace: float) -> None:
        for task in self._tasks:
            task.cancel()
        await self.servicer.say_shutdown(timeout=grace / 2)
        await self._server.stop(grace / 2)


@dataclasses.dataclass
class OrchestratorConfig:
    """How an orchestrator is started, from the command line or the TUI's create form."""

    listen: str = DEFAULT_LISTEN
    token: str | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS
    max_nodes: int = DEFAULT_MAX_NODES
    forget_after_s: float | None = DEFAULT_FORGET_AFTER_S
    # Where the inventory is kept, as on the command line; None keeps nothing on disk.
    state_dir: str | None = dataclasses.field(default_factory=lambda: default_state_dir())
    on_event: list | None = None  # the --on-event command, split
    alerts: tuple = ()
    metrics_listen: str | None = None
    metrics_open: bool = False
    tls_files: tuple | None = None  # (certificate, key) paths: /metrics serves HTTPS with them
    history_days: int = DEFAULT_HISTORY_DAYS  # --history-days; 0 keeps none

    def create(self) -> Orchestrator:
        return Orchestrator(self.listen, token=self.token, tls_cert=self.tls_cert, tls_key=self.tls_key,
                            heartbeat_ms=self.heartbeat_ms, max_nodes=self.max_nodes,
                            forget_after_s=self.forget_after_s, state_dir=self.state_dir, on_event=self.on_event,
                            alerts=self.alerts, metrics_listen=self.metrics_listen, metrics_open=self.metrics_open,
                            tls_files=self.tls_files, history_days=self.history_days)


# ---------------------------------------------------------------------------
# 5. The worker client (join, then stream metrics; reconnect forever) and the
#    status client.
#    Holds: how gRPC errors read to a person, the worker's identity (node ID,
#    secret, ID lock), WorkerClient (join, stream, obey commands, answer detail
#    requests), WorkerConfig, and the status client (fetch_status,
#    fetch_node_detail, fetch_node_history). Talks to: 2 (the samplers), 4 (the
#    one gRPC loop, message conversions, safe_detail: what a peer sends is made
#    safe the same way on both sides).
# ---------------------------------------------------------------------------

def describe_rpc_error(error: grpc.RpcError) -> str:
    """One short line for a failed call, e.g. 'orchestrator unreachable (connection refused)'."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        lowered = details.lower()
        for needle, reason in (
            ("connection refused", "connection refused"),
            ("ping timeout", "no answer to keepalive pings"),
            ("dns resolution failed", "host name not found"),
            ("errors resolving", "host name not found"),
            ("socket closed", "it closed the connection; if it uses TLS, pass --tls-ca"),
            ("certificate_verify_failed", "its TLS certificate is not signed by --tls-ca"),
            ("wrong_version_number", "TLS handshake failed; is the orchestrator using TLS?"),
            ("handshake", "TLS handshake failed"),
            ("deadline", "timed out"),
            ("timeout", "timed out"),
        ):
            if needle in lowered:
                return f"orchestrator unreachable ({reason})"
        return "orchestrator unreachable"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "the orchestrator did not answer in time"
    reason = refusal_reason(error)
    if reason is RefusalReason.THROTTLED:
        return sanitize_text(f"the orchestrator refused: {details.splitlines()[0]}", ERROR_TEXT_LIMIT)
    if reason is RefusalReason.WRONG_TOKEN or (reason is None and code == grpc.StatusCode.UNAUTHENTICATED):
        return "the orchestrator rejected the join token"
    first_line = details.splitlines()[0] if details else ""
    name = code.name if code is not None else "error"
    return sanitize_text(f"{name}: {first_line}" if first_line else name, ERROR_TEXT_LIMIT)


@dataclasses.dataclass(frozen=True)
class ConnectionState:
    """What a worker tells its screen, its log and systemd about its link, replaced whole on
    every change so a reader on another thread never sees half of one."""

    phase: ConnectionPhase
    target: str = ""
    detail: str = ""  # while retrying, the last error
    retry_at: float = 0.0  # monotonic time of the next attempt while retrying
    heartbeat_interval: float = DEFAULT_HEARTBEAT_MS / 1000.0

    def describe(self, now: float | None = None) -> str:
        """One line for a status bar or systemd, e.g. 'retrying in 3 s: orchestrator unreachable
        (connection refused)' or 'connected to 10.0.0.5:50051, heartbeat every 1.0 s'."""
        if self.phase is ConnectionPhase.RETRYING:
            wait = max(self.retry_at - (time.monotonic() if now is None else now), 0.0)
            text = f"retrying in {math.ceil(wait)} s"
            return f"{text}: {self.detail}" if self.detail else text
        if self.phase is ConnectionPhase.CONNECTED:
            return f"connected to {self.target}, heartbeat every {self.heartbeat_interval:.1f} s"
        if self.phase is ConnectionPhase.CONNECTING:
            return f"connecting to {self.target}"
        return self.phase.value


class ConnectionPhase(enum.Enum):
    """Where a worker's link to its orchestrator stands; the values are what its screen says."""

    CONNECTING = "connecting"
    CONNECTED = "connected"
    RETRYING = "retrying"
    STOPPED = "stopped"


def resolve_future(future: asyncio.Future) -> None:
    """Wake whoever awaits future, unless it is already done (a timer and a command may both try)."""
    if not future.done():
        future.set_result(None)


class OrchestratorShutdown(Exception):
    pass


class CommandFlood(Exception):
    """The orchestrator kept sending commands faster than a worker reads them."""


class SamplingFailed(Exception):
    """This machine's metrics could not be read (psutil raised): the session ends and is retried."""


def backoff_delay(failures: int, rng: random.Random | None = None) -> float:
    """Jittered exponential backoff: 0.5 s, 1 s, 2 s, 4 s, then 5 s, each scaled by 0.5-1.0."""
    ceiling = min(0.5 * (2 ** min(failures, 10)), MAX_BACKOFF_S)
    return ceiling * (rng or random).uniform(0.5, 1.0)


def token_metadata(token: str | None) -> tuple:
    return ((TOKEN_METADATA_KEY, token),) if token else ()


def _channel_for(target: str, tls_ca: bytes | None, options):
    if tls_ca is not None:
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca),
                                       options=options)
    return grpc.aio.insecure_channel(target, options=options)


# -- who the worker is: a node ID stable across restarts, and the secret that makes it its own --

def machine_identity() -> str:
    """systemd's /etc/machine-id (or D-Bus's copy): fixed for the life of an installation and
    different between properly set-up clones. "" where neither is readable."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii", errors="replace") as file:
                value = file.read(200).strip()
        except OSError:
            continue
        if value:
            return value
    return ""


def default_node_id(hostname: str, machine_id: str, user: str) -> str:
    """The short host name plus 6 hex digits of a hash of the machine identity, host name and
    user name: the same on every start, different for machines that share a host name (cloned
    VMs, 'localhost') and for two users of one machine. The name, not the uid: a systemd
    service's dynamic user keeps its name ("cares") but not always its number."""
    short = re.sub(r"[^A-Za-z0-9._-]", "-", hostname.split(".")[0])[:56].strip("-.") or "node"
    digest = sha256(f"cares-node-id\0{machine_id}\0{hostname}\0{user}".encode()).hexdigest()
    return f"{short}-{digest[:6]}"


def user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def default_state_dir() -> str:
    """Where cares keeps what must survive a restart: systemd's StateDirectory= ($STATE_DIRECTORY),
    else $XDG_STATE_HOME/cares, else ~/.local/state/cares."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "cares")


def usable_state_dir(path: str | None) -> str | None:
    """path, created 0700 if missing, when this process can write there; None otherwise."""
    if not path:
        return None
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK | os.X_OK) else None


@dataclasses.dataclass
class NodeIdentity:
    node_id: str
    secret: str
    note: str = ""  # why the identity is weaker than usual, for one WARN line; "" when all is well
    lock: object = dataclasses.field(default=None, repr=False)  # held open for the life of the process


def claim_identity(requested: str | None, state_dir: str | None) -> NodeIdentity:
    """The node ID this worker runs as, and its node secret.

    The ID is --node-id, else default_node_id(); a lock file in the state directory keeps two
    workers of one user on one host apart: the second running takes ID-2, the third ID-3, so each
    keeps its ID across restarts as long as they start in the same order. The secret is kept
    in the state directory too (0600), so a restarted worker reclaims its ID from the orchestrator
    and no other worker can. StartError when --node-id is already taken on this host."""
    base = requested or default_node_id(socket.gethostname(), machine_identity(), user_name())
    directory = usable_state_dir(state_dir)
    if directory is None:
        note = (f"no writable state directory ({state_dir}): joining without a node secret, so the orchestrator "
                f"does not reserve this node ID for this worker" if state_dir else "")
        return NodeIdentity(base, "", note)
    for ordinal in range(1, 100):
        node_id = base if ordinal == 1 else f"{base[:60]}-{ordinal}"
        lock = _try_lock(os.path.join(directory, f"worker-{node_id}.lock"))
        if lock is not None:
            secret, problem = _node_secret(os.path.join(directory, f"worker-{node_id}.secret"))
            note = f"{problem}: joining without one, so the orchestrator does not reserve this node ID" \
                if problem else ""
            return NodeIdentity(node_id, secret, note, lock=lock)
        if requested:
            raise StartError(f"another cares worker on this host already runs as node '{requested}'")
    raise StartError("99 cares workers already run on this host; pass --node-id")


def _try_lock(path: str):
    """An open file holding an exclusive lock on path, or None when another process holds it;
    StartError when the file cannot be opened at all (another user's, from a run under sudo)."""
    try:
        file = open(path, "a+")
    except OSError as error:
        raise StartError(f"cannot use {path}: {os_error_text(error)}; remove it, or pass "
                         f"--state-dir") from None
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        file.close()
        return None
    return file


def _node_secret(path: str) -> tuple[str, str]:
    """The secret stored at path, or a new one stored there (0600, never readable by others),
    and "" or why none could be kept. A secret that would not outlive this process is not used
    ("" is sent): the orchestrator would hold the ID for it, and this worker, restarted with a
    new one, would be refused its own ID."""
    try:
        with open(path, encoding="ascii") as file:
            secret = file.read(100).strip()
        if re.fullmatch(r"[0-9a-f]{32}", secret):
            return secret, ""
    except (OSError, ValueError):
        pass
    secret = random_hex(16)
    try:
        replace_file(path, lambda file: file.write((secret + "\n").encode("ascii")))
    except OSError as error:  # a full or read-only disk
        return "", f"cannot keep a node secret in {path} ({os_error_text(error)})"
    return secret, ""


# -- the worker ------------------------------------------------------------

class WorkerClient:
    """Joins an orchestrator and streams this machine's metrics to it, reconnecting forever."""

    def __init__(self, target: str, node_id: str, sampler: LocalSampler, *, token: str | None = None,
                 tls_ca: bytes | None = None, secret: str = "", labels: dict | None = None,
                 detail_offer: DetailOffer = DetailOffer()):
        self.target = target
        self.node_id = node_id
        self.sampler = sampler
        self.labels = dict(labels or {})
        self.events = EventLog()
        self._secret = secret
        self._metadata = token_metadata(token)
        self._tls_ca = tls_ca
        self._interval = DEFAULT_HEARTBEAT_MS / 1000.0
        self._state = ConnectionState(ConnectionPhase.CONNECTING, target)
        self._state_lock = threading.Lock()
        self._main_task = None
        self._call = None
        self._sender = None
        self._writing: asyncio.Future | None = None  # the sender's write in flight (see _send_metrics)
        self._session_id = ""
        self._sequence = 0
        self._stream_opened_at: float | None = None
        self._interval_wake: asyncio.Future | None = None  # resolved early when the interval changes
        # Repeated failures, flaps and interval changes: said once, then summarised per minute.
        self._repeats = RepeatSummary(WORKER_REPEAT_SUMMARY_S)
        self._stopping = False
        self.identity: NodeIdentity | None = None  # set by WorkerConfig.create; holds the ID lock
        self.detail = DetailResponder(detail_offer, self._say)

    @property
    def state(self) -> ConnectionState:
        with self._state_lock:
            return self._state

    def _set_state(self, phase: ConnectionPhase, detail: str = "", retry_at: float = 0.0) -> None:
        state = ConnectionState(phase, self.target, detail, retry_at, self._interval)
        with self._state_lock:
            self._state = state

    def start(self) -> None:
        run_on_grpc_loop(self._begin())

    async def _begin(self) -> None:
        self._main_task = asyncio.ensure_future(self._run())

    def stop(self, goodbye: bool = True, timeout: float = 2.0) -> None:
        """Leave the cluster: say goodbye on an open stream, then stop the background loop."""
        if self._main_task is None:
            return
        try:
            run_on_grpc_loop(self._leave(goodbye), timeout=timeout + 1)
        except Exception as error:  # the worker is exiting either way; note why it was not clean
            self.events.add(Level.WARN, f"Could not say goodbye: {error!r}")
        self._main_task = None
        self._set_state(ConnectionPhase.STOPPED)
        if self.identity is not None and self.identity.lock is not None:
            self.identity.lock.close()  # another worker may now run under this ID

    async def _leave(self, goodbye: bool) -> None:
        self._stopping = True
        call, sender = self._call, self._sender
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        writing, self._writing = self._writing, None
        if writing is not None:  # the sample being written goes out before the goodbye (bounded)
            await asyncio.gather(asyncio.wait_for(writing, 1.0), return_exceptions=True)
        if goodbye and call is not None and self.state.phase is ConnectionPhase.CONNECTED:
            try:
                await asyncio.wait_for(self._say_goodbye(call), 1.0)
            except (asyncio.TimeoutError, grpc.RpcError):
                pass
            else:
                self.events.add(Level.INFO, "Left the cluster.")
        self._main_task.cancel()
        await asyncio.gather(self._main_task, return_exceptions=True)

    def join_message(self) -> pb.NodeInfo:
        return pb.NodeInfo(
            node_id=self.node_id, hostname=socket.gethostname()[:HOSTNAME_LIMIT], cpu_count=self.sampler.cpu_count,
            memory_total_bytes=self.sampler.memory_total_bytes,
            platform="-".join(os.uname()[i] for i in (0, 2, 4))[:PLATFORM_LIMIT],  # platform.system() etc.
            cares_version=VERSION, node_secret=self._secret, labels=self.labels,
            detail_offer=pb.DetailOffer(processes=self.detail.offer.processes,
                                        command_lines=self.detail.offer.command_lines))

    def _next_metrics(self, metrics: Metrics | None = None, **fields) -> pb.NodeMetrics:
        """The next message of this session's stream: identity, sequence number and send time filled in."""
        self._sequence += 1
        identity = dict(node_id=self.node_id, session_id=self._session_id, sequence=self._sequence,
                        sent_at_ms=int(time.time() * 1000), **fields)
        return metrics_message(metrics, **identity) if metrics is not None else pb.NodeMetrics(**identity)

    async def _say_goodbye(self, call) -> None:
        await call.write(self._next_metrics(leaving=True))
        await call.done_writing()
        await call.code()

    def _say(self, level: Level, key, text: str) -> None:
        """Log text unless the same key was said within the last minute (then it is counted)."""
        if self._repeats.note(key, time.monotonic()):
            self.events.add(level, text)

    def _say_repeats(self, force: bool = False) -> None:
        """Summarise what was said more than once, for windows that ended (or all, with force)."""
        now = time.monotonic() + (self._repeats.window_s if force else 0.0)
        for key, repeats, seconds in self._repeats.due(now):
            what = "the orchestrator changed the heartbeat interval" if key == "interval" else f"'{key}'"
            self.events.add(Level.INFO if key == "interval" else Level.WARN,
                            f"Repeated: {what}, {repeats} more time(s) in the last "
                            f"{min(seconds, self._repeats.window_s):.0f} s.")

    async def _run(self) -> None:
        failures = 0
        while True:
            self._set_state(ConnectionPhase.CONNECTING)
            delay, level = None, Level.WARN
            try:
                await self._connect_and_stream()
                detail = "the orchestrator closed the stream"
            except OrchestratorShutdown as shutdown:
                detail = str(shutdown) or "the orchestrator is shutting down"
                failures, delay, level = 0, backoff_delay(0), Level.INFO
            except CommandFlood as flood:
                detail, delay = str(flood), REJECTED_TOKEN_BACKOFF_S
            except SamplingFailed as failure:
                detail = str(failure)
            except grpc.RpcError as error:
                detail = describe_rpc_error(error)
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    delay = REJECTED_TOKEN_BACKOFF_S
            except Exception as error:  # keep the worker alive whatever the network did
                detail = sanitize_text(f"unexpected {type(error).__name__}: {error}", ERROR_TEXT_LIMIT)
            if self._stopping:
                return
            opened_at, self._stream_opened_at, self._session_id = self._stream_opened_at, None, ""
            # Only a stream that lived a full silence limit resets the backoff: an orchestrator that
            # accepts joins and drops every stream at once must not get a join storm.
            if opened_at is not None and time.monotonic() - opened_at >= MISSED_HEARTBEATS * self._interval:
                failures = 0
            if delay is None:
                delay = backoff_delay(failures)
                failures += 1
            text = f"{'Disconnected' if opened_at is not None else 'Cannot join'}: {detail}; retrying."
            self._say(level, text, text)
            self._say_repeats()
            self._set_state(ConnectionPhase.RETRYING, detail, time.monotonic() + delay)
            await asyncio.sleep(delay)

    async def _connect_and_stream(self) -> None:
        async with _channel_for(self.target, self._tls_ca, WORKER_OPTIONS) as channel:
            stub = pb_grpc.ClusterServiceStub(channel)
            ack = await stub.JoinCluster(self.join_message(), metadata=self._metadata, timeout=5.0)
            self._session_id = ack.session_id
            self._sequence = 0
            self._interval = clamp_heartbeat_ms(ack.heartbeat_interval_ms) / 1000.0
            call = stub.Heartbeat(metadata=((NODE_METADATA_KEY, self.node_id),
                                            (SESSION_METADATA_KEY, self._session_id)))
            self._call = call
            self._stream_opened_at = time.monotonic()
            self._sender = asyncio.ensure_future(self._send_metrics(call))
            self._set_state(ConnectionPhase.CONNECTED)
            text = f"Joined {self.target} as '{self.node_id}'."
            self._say(Level.INFO, text, text)
            commands, sender = asyncio.ensure_future(self._obey_commands(call)), self._sender
            try:
                # Either side ends the session: a sender that failed (a sample that raised) must
                # not leave a worker that looks connected and sends nothing.
                await asyncio.wait((commands, sender), return_when=asyncio.FIRST_COMPLETED)
                if sender.done() and not sender.cancelled() and isinstance(sender.exception(), SamplingFailed):
                    sender.result()  # the reason, whatever the orchestrator then says about the silence
                if not commands.done():
                    # If the call itself ended, its read says why in a moment, in gRPC's words.
                    await asyncio.wait((commands,), timeout=2.0)
                    if not commands.done():
                        sender.result()
                commands.result()
            finally:
                self._sender = self._call = None
                writing, self._writing = self._writing, None
                tasks = [task for task in (commands, sender, writing) if task is not None]
                for task in tasks:
                    task.cancel()
                # Collect their ends (a write on a finished call fails), or asyncio reports them as never retrieved.
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _obey_commands(self, call) -> None:
        """Follow the orchestrator's commands. An interval command only records the interval and
        wakes the sender, which sends at most one sample per interval, so a burst costs a read
        each. An orchestrator that keeps sending (more than FLOOD_COMMANDS in FLOOD_WINDOW_S; a
        person pressing +/- sends a few) is left, and tried again REJECTED_TOKEN_BACKOFF_S later:
        reading a flood, even without acting on it, took a worker a third of a core."""
        recent: collections.deque[float] = collections.deque(maxlen=FLOOD_COMMANDS)
        while True:
            command = await call.read()
            if command is grpc.aio.EOF:
                return
            recent.append(time.monotonic())
            if len(recent) == FLOOD_COMMANDS and recent[-1] - recent[0] < FLOOD_WINDOW_S:
                raise CommandFlood(f"the orchestrator flooded this worker with commands "
                                   f"({FLOOD_COMMANDS} in under {FLOOD_WINDOW_S:g} s)")
            kind = command.WhichOneof("command")
            if kind == "set_heartbeat_interval_ms":
                interval = clamp_heartbeat_ms(command.set_heartbeat_interval_ms) / 1000.0
                if interval != self._interval:
                    self._interval = interval
                    if self._interval_wake is not None:
                        resolve_future(self._interval_wake)
                    self._set_state(ConnectionPhase.CONNECTED)
                    self._say(Level.INFO, "interval", f"Heartbeat interval is now {interval:.2f} s.")
            elif kind == "shutdown":
                raise OrchestratorShutdown(sanitize_text(command.shutdown.reason, ERROR_TEXT_LIMIT))
            elif kind == "request_detail":
                self.detail.asked(self._interval)

    async def _send_metrics(self, call) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.sampler.warmup_left())
        while True:
            # On the loop: nothing a sample reads waits on a disk or a mount (/proc is made as it
            # is read; statvfs has a thread of its own), and the screen holds the sampler's lock
            # one sample long. An executor hop a beat cost more than the sample itself.
            try:
                sample = self.sampler.sample()
            except Exception as error:
                raise SamplingFailed(sanitize_text(f"cannot read this machine's metrics "
                                                   f"({type(error).__name__}: {error})", ERROR_TEXT_LIMIT)) from None
            message = self._next_metrics(sample)
            detail = await self.detail.snapshot_if_asked(loop, self._interval)
            if detail is not None:
                message.detail.CopyFrom(detail)
            # Shielded: a cancel landing inside a write cancels the whole call, so a worker
            # stopped mid-write (_leave) would never get its goodbye out and be lost, not left.
            self._writing = asyncio.ensure_future(call.write(message))
            await asyncio.shield(self._writing)
            sent_at = loop.time()
            if sent_at - self._stream_opened_at >= WORKER_REPEAT_SUMMARY_S:
                self._say_repeats()
            # Sleep until the next sample is due at the interval in force; a new interval wakes
            # the sleep to reschedule from the last sample, so it takes effect at once without
            # ever sending faster than one sample per interval. A future and a timer, which is
            # what asyncio.sleep is made of: wait_for(event.wait()) made and cancelled a task a beat.
            while (delay := sent_at + self._interval - loop.time()) > 0:
                self._interval_wake = wake = loop.create_future()
                timer = loop.call_later(delay, resolve_future, wake)
                try:
                    await wake
                finally:
                    timer.cancel()


class DetailResponder:
    """A worker's side of on-demand detail. Offered at join; the DetailSampler is built only once
    an orchestrator asks (nobody asking: no sampler, no /proc walks). However often it is asked, a
    request only moves the lapse time: the sender takes at most one snapshot per detail period, and
    none once the asking has lapsed."""

    def __init__(self, offer: DetailOffer, say):
        self.offer = offer
        self.sampler: DetailSampler | None = None
        self.until = 0.0  # monotonic time the last request lapses
        self.sent_at = -math.inf
        self._say = say  # WorkerClient._say: one line, repeats summarised

    def asked(self, interval: float) -> None:
        """A DetailRequest arrived (on the gRPC loop)."""
        now = time.monotonic()
        self.until = now + DETAIL_LAPSE_INTERVALS * detail_period(interval)
        if self.sampler is None:
            self.sampler = DetailSampler(self.offer.command_lines, self.offer.processes)
        if now - self.sent_at > DETAIL_STALE_S:
            # A first reading now, so the snapshot sent with the next sample has rates.
            self.sent_at = now
            asyncio.get_running_loop().run_in_executor(None, self.sampler.prime)

    async def snapshot_if_asked(self, loop, interval: float) -> pb.NodeDetail | None:
        """A snapshot for this sample, while asked and at most one per detail period, taken on an
        executor thread; one that fails costs the detail, never the heartbeat."""
        now = time.monotonic()
        if self.sampler is None or now >= self.until or now - self.sent_at < detail_period(interval) - 0.05:
            return None
        self.sent_at = now
        try:
            return await loop.run_in_executor(None, self.sampler.snapshot)
        except Exception as error:
            self._say(Level.WARN, "detail", sanitize_text(f"Cannot take a detail snapshot "
                                                          f"({type(error).__name__}: {error}).", ERROR_TEXT_LIMIT))
            return None


@dataclasses.dataclass
class WorkerConfig:
    """How a worker is started, from the command line or the TUI's join form."""

    target: str = f"127.0.0.1:{DEFAULT_PORT}"
    token: str | None = None
    tls_ca: bytes | None = None
    node_id: str | None = None  # --node-id; None for this host's default
    labels: dict = dataclasses.field(default_factory=dict)
    # Where the node secret and the ID lock are kept, as on the command line; None keeps nothing.
    state_dir: str | None = dataclasses.field(default_factory=lambda: default_state_dir())
    detail_offer: DetailOffer = DetailOffer()  # --no-processes, --share-cmdlines

    def create(self, sampler: LocalSampler) -> WorkerClient:
        """The worker, under its claimed identity; StartError when that ID already runs here."""
        identity = claim_identity(self.node_id, self.state_dir)
        client = WorkerClient(self.target, identity.node_id, sampler, token=self.token, tls_ca=self.tls_ca,
                              secret=identity.secret, labels=self.labels, detail_offer=self.detail_offer)
        client.identity = identity  # keeps the lock held for as long as the worker lives
        if identity.note:
            client.events.add(Level.WARN, f"Node '{identity.node_id}': {identity.note}.")
        return client


# -- the status client ---------------------------------------------------

# `status` may receive pages of up to STATUS_PAGE_BYTES (plus one row); the 64 KiB cap is for
# what the orchestrator receives from strangers, not for what an operator asks of it.
# Each status call has its own channel and subchannel pool: a call made while the orchestrator was
# not up yet must not leave the next one in the shared pool's reconnect backoff (about a second).
STATUS_CLIENT_OPTIONS = [option for option in WORKER_OPTIONS if option[0] != "grpc.max_receive_message_length"] \
    + [("grpc.max_receive_message_length", 4 * STATUS_PAGE_BYTES), ("grpc.use_local_subchannel_pool", 1)]


def fetch_status(target: str, *, token: str | None = None, tls_ca: bytes | None = None,
                 timeout: float = 5.0) -> list[dict]:
    """The orchestrator's node table as plain dicts (the `status --json` rows), fetched a page at a time."""

    async def call():
        deadline = time.monotonic() + timeout
        rows, after = [], ""
        async with _channel_for(target, tls_ca, STATUS_CLIENT_OPTIONS) as channel:
            stub = pb_grpc.StatusServiceStub(channel)
            # Bounded, whatever an orchestrator answers: pages must move forward.
            while len(rows) < STATUS_MAX_NODES:
                reply = await stub.ListNodes(
                    pb.ListNodesRequest(page_after_node_id=after, page_size=STATUS_PAGE_NODES),
                    metadata=token_metadata(token), timeout=max(deadline - time.monotonic(), 0.01))
                rows.extend(reply.nodes)
                following = reply.next_page_after_node_id
                if not following or following <= after:
                    break
                after = following
        return rows

    rows = run_on_grpc_loop(call(), timeout=timeout + 5)
    return [status_row(node) for node in rows]


def one_status_call(target: str, tls_ca: bytes | None, timeout: float, call):
    """call(StatusServiceStub) awaited on a channel of its own, from any thread but the gRPC loop."""
    async def run():
        async with _channel_for(target, tls_ca, STATUS_CLIENT_OPTIONS) as channel:
            return await call(pb_grpc.StatusServiceStub(channel))

    return run_on_grpc_loop(run(), timeout=timeout + 5)


def fetch_node_detail(target: str, node_id: str, *, token: str | None = None, tls_ca: bytes | None = None,
                      timeout: float = DETAIL_REPLY_WAIT_S + 5) -> NodeDetailReply:
    """One node's row and a fresh detail snapshot, asked of its worker through the orchestrator."""
    reply = one_status_call(target, tls_ca, timeout, lambda stub: stub.GetNodeDetail(
        pb.NodeDetailRequest(node_id=node_id), metadata=token_metadata(token), timeout=timeout))
    offer = (DetailOffer(reply.detail_offer.processes, reply.detail_offer.command_lines)
             if reply.HasField("detail_offer") else None)
    detail = safe_detail(reply.detail, offer) if reply.HasField("detail") else None
    return NodeDetailReply(status_row(reply), offer, detail, _finite_or_none(reply.detail_at_unix_s, 3) or None)


def fetch_node_history(target: str, node_id: str, span: HistoryRange, *, token: str | None = None,
                       tls_ca: bytes | None = None, timeout: float = 10.0) -> dict:
    """One node's history as `status NODE --history RANGE --json` prints it (made safe: what an
    orchestrator sends is untrusted too)."""
    reply = one_status_call(target, tls_ca, timeout, lambda stub: stub.GetNodeHistory(
        pb.NodeHistoryRequest(node_id=node_id, range_s=span.seconds), metadata=token_metadata(token), timeout=timeout))
    known = {name for name, _ in HISTORY_METRICS}
    return {"node_id": sanitize_text(reply.node_id, 63), "kept": reply.kept, "history_days": reply.history_days,
            "range": span.value, "bucket_s": reply.bucket_s, "end": reply.end_unix_s,
            "buckets": [{"start": bucket.start_unix_s, "samples": bucket.samples,
                         **{name: {"avg": _finite_or_none(bucket.average[name], 3),
                                   "max": _finite_or_none(bucket.maximum.get(name, math.nan), 3)}
                            for name in sorted(bucket.average) if name in known}}
                        for bucket in reply.buckets[:10_000]],
            "events": [{"at": _finite_or_none(event.at_unix_s, 3), "kind": sanitize_text(event.kind, 16),
                        "text": sanitize_text(event.text, 300)} for event in reply.events[:10_000]]}


@dataclasses.dataclass(frozen=True)
class NodeDetailReply:
    """What `status NODE --top` got: the node's row, what its worker shares and the snapshot (made safe)."""

    row: dict
    offer: DetailOffer | None  # None: the worker is older than on-demand detail
    detail: object  # pb.NodeDetail, or None when none arrived
    detail_at: float | None


def detail_json(detail) -> dict:
    """A NodeDetail (made safe) as `status --top --json` prints it; rates per second, sizes in bytes."""
    return {"window_s": round(detail.window_s, 3), "process_count": detail.process_count,
            "own_processes_only": detail.own_processes_only, "left_out": detail.left_out,
            "processes": [{"pid": p.pid, "user": p.user, "name": p.name, "command_line": p.command_line or None,
                           "cpu_percent": round(p.cpu_percent, 1), "rss_bytes": p.rss_bytes,
                           "io_bytes_per_s": None if p.io_unknown else round(p.io_bytes_per_s, 1),
                           "state": p.state, "threads": p.threads} for p in detail.processes],
            "mounts": [{"mountpoint": m.mountpoint, "device": m.device, "fstype": m.fstype, "used_bytes": m.used_bytes,
                        "total_bytes": m.total_bytes, "used_percent": round(m.used_percent, 1)} for m in detail.mounts],
            "interfaces": [{"name": i.name, "receive_bytes_per_s": round(i.receive_bytes_per_s, 1),
                            "transmit_bytes_per_s": round(i.transmit_bytes_per_s, 1), "errors_in": i.errors_in,
                            "errors_out": i.errors_out, "drops_in": i.drops_in, "drops_out": i.drops_out,
                            "up": i.up, "speed_mbps": i.speed_mbps or None} for i in detail.interfaces],
            "sensors": [{"kind": SENSOR_KINDS.get(r.kind, "unknown"), "chip": r.chip, "label": r.label,
                         "value": round(r.value, 1), "high": r.high or None, "critical": r.critical or None}
                        for r in detail.sensors],
            "containers": [{"id": c.id, "name": c.name, "engine": c.engine, "cpu_percent": round(c.cpu_percent, 1),
                            "memory_bytes": c.memory_bytes or None, "pids": c.pids} for c in detail.containers]}


SENSOR_KINDS = {pb.TEMPERATURE_CELSIUS: "temperature_celsius", pb.FAN_RPM: "fan_rpm"}


def status_row(node: pb.NodeStatus) -> dict:
    """One node as `status --json` prints it. What an orchestrator sends is untrusted too: no
    terminal controls, no NaN (invalid JSON), and null for what it does not know."""
    latest = node.latest if node.HasField("latest") else None
    status = NodeStatus.of_row(node.state, node.status)
    metrics = {name: None for name in METRIC_NAMES}
    if latest is not None:
        metrics.update(metrics_from_message(latest)._asdict())
    return {"node_id": sanitize_text(node.node_id, 63), "address": sanitize_text(node.address, 64),
            "status": status.value if status is not None else sanitize_text(node.status, 12),
            "cpu_percent": _finite_or_none(node.cpu_percent, 1) if node.HasField("cpu_percent") else None,
            "memory_percent": _finite_or_none(node.memory_percent, 1) if node.HasField("memory_percent") else None,
            "last_seen": _finite_or_none(node.last_seen_unix_s, 3) if node.last_seen_unix_s else None,
            "hostname": sanitize_text(node.hostname, HOSTNAME_LIMIT),
            "joined_at": _finite_or_none(node.joined_at_unix_s, 3),
            "labels": {sanitize_text(key, 63): sanitize_text(value, 128) for key, value in node.labels.items()},
            "platform": sanitize_text(node.platform, PLATFORM_LIMIT), "version": sanitize_text(node.cares_version, 32),
            "cpu_count": node.cpu_count or None, "memory_total_bytes": node.memory_total_bytes or None,
            "left": node.left, "alerts": [sanitize_text(alert, 60) for alert in node.alerts[:MAX_ALERTS_SHOWN]],
            "metrics": {name: _finite_or_none(value, 3) if value is not None else None
                        for name, value in metrics.items()}}


def _finite_or_none(value: float, digits: int) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


# ---------------------------------------------------------------------------
# 6. The TUI: asciimatics scenes for the mode menu, the create and join forms,
#    the worker view, the orchestrator dashboard, a node's detail view and the
#    key help. First the model and the pure parts (glyphs, layout, rows, filter,
#    sorting, graphs), tested without a terminal; then the scenes, whose frames
#    prepare what to show in _update and whose widgets only render it.
#    Talks to: 3 (registry snapshots, events, history), 4c (the Orchestrator it
#    shows and steers), 5 (the worker it shows). Loaded only with a screen.
# ---------------------------------------------------------------------------

class View(enum.Enum):
    """What the TUI shows; the values name its asciimatics scenes."""

    MENU = "menu"
    CREATE = "create"
    JOIN = "join"
    WORKER = "worker"
    DASHBOARD = "dashboard"
    DETAIL = "detail"
    HELP = "help"


@dataclasses.dataclass(frozen=True)
class Glyphs:
    """The characters the TUI draws with: Unicode, or plain ASCII under a non-UTF-8 locale."""

    eighths: str  # partial bar cells, from empty to seven eighths
    full: str
    sparks: str  # graph levels, lowest first
    up: str
    down: str
    ellipsis: str
    dash: str  # a value never measured
    unicode: bool


UNICODE_GLYPHS = Glyphs(" ▏▎▍▌▋▊▉", "█", "▁▂▃▄▅▆▇█", "▲", "▼", "…", "–", True)
ASCII_GLYPHS = Glyphs("        ", "|", "_.-=#", "^", "v", "~", "-", False)


def bar_text(percent: float, width: int, glyphs: Glyphs = UNICODE_GLYPHS) -> str:
    """A width-cell bar: eighth-block resolution in Unicode, '|' like htop in ASCII."""
    if width <= 0:
        return ""
    filled = clamp_percent(percent) / 100.0 * width
    if not glyphs.unicode:
        cells = int(filled + 0.5)
        return glyphs.full * cells + " " * (width - cells)
    full = int(filled)
    eighths = int((filled - full) * 8 + 0.5)
    if eighths == 8:
        full, eighths = full + 1, 0
    text = glyphs.full * full
    if full < width and eighths:
        text += glyphs.eighths[eighths]
    return text.ljust(width)


def bar_level(percent: float | None) -> str:
    """'low', 'medium' or 'high', the colour band of a load bar."""
    percent = clamp_percent(percent or 0.0)
    if percent < 60.0:
        return Style.LOW
    if percent < 85.0:
        return Style.MEDIUM
    return Style.HIGH


def sparkline(values, width: int, glyphs: Glyphs = UNICODE_GLYPHS, top: float = 100.0) -> str:
    """The last width values (0-top) as a one-line chart, right-aligned; gaps (NaN) stay blank."""
    if width <= 0:
        return ""
    ticks = glyphs.sparks
    chars = [" " if math.isnan(value) else
             ticks[max(round(min(max(value, 0.0), top) / top * len(ticks)) - 1, 0)]
             for value in list(values)[-width:]]
    return "".join(chars).rjust(width)


def graph_rows(values, width: int, height: int, glyphs: Glyphs = UNICODE_GLYPHS, top: float = 100.0) -> list[str]:
    """The last width values as a chart height rows tall, top row first; each column is one
    value, its top cell drawn in eighths (Unicode) or a full block (ASCII)."""
    if width <= 0 or height <= 0:
        return []
    recent = list(values)[-width:]
    columns = [0.0 if math.isnan(value) else min(max(value, 0.0), top) / top * height for value in recent]
    rows = []
    for level in range(height - 1, -1, -1):
        cells = []
        for filled in columns:
            part = filled - level
            if part >= 1.0:
                cells.append(glyphs.full)
            elif part > 0.0 and glyphs.unicode:
                cells.append(glyphs.sparks[max(int(part * 8) - 1, 0)])
            elif part >= 0.5:
                cells.append(glyphs.full)
            else:
                cells.append(" ")
        rows.append("".join(cells).rjust(width))
    return rows


def format_rate(bytes_per_s: float | None, glyphs: Glyphs = UNICODE_GLYPHS) -> str:
    """A byte rate in at most 6 cells: '512B', '12.3K', '1.2G' (per second)."""
    if bytes_per_s is None or math.isnan(bytes_per_s):
        return glyphs.dash
    for unit in ("B", "K", "M", "G", "T"):
        if bytes_per_s < 1000 or unit == "T":
            return f"{bytes_per_s:.0f}{unit}" if unit == "B" or bytes_per_s >= 100 else f"{bytes_per_s:.1f}{unit}"
        bytes_per_s /= 1024.0
    return glyphs.dash


def format_uptime(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    days, hours, minutes = seconds // 86400, seconds % 86400 // 3600, seconds % 3600 // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


def format_number(value: float | None, glyphs: Glyphs = UNICODE_GLYPHS, digits: int = 2) -> str:
    return glyphs.dash if value is None else f"{value:.{digits}f}"


class SortKey(enum.Enum):
    NODE_ID = "node ID"
    HOST = "host"
    STATUS = "status"
    CPU = "CPU"
    MEMORY = "memory"
    LOAD = "load"


class Column(enum.Enum):
    """The node table's columns, in the order they are drawn."""

    NODE_ID = "NODE ID"
    HOST = "HOST"
    LABELS = "LABELS"
    STATUS = "STATUS"
    CPU = "CPU"
    MEMORY = "MEMORY"
    LOAD = "LOAD"
    DISK = "DISK"
    NET = "NET RX/TX"
    SPARK = "CPU LAST 60s"
    SEEN = "LAST SEEN"


PERCENT_WIDTH = 7  # " 100.0%" after each bar
# Beyond the four every width keeps (ID, status, CPU, memory), columns join as space allows,
# most useful first: (column, cells). The bars take what is left, at least MIN_BAR each.
OPTIONAL_COLUMNS = ((Column.HOST, 18), (Column.SEEN, 9), (Column.LOAD, 6), (Column.DISK, 6), (Column.LABELS, 18),
                    (Column.NET, 15), (Column.SPARK, 30))
MIN_BAR = 8
SORT_OF_COLUMN = {Column.NODE_ID: SortKey.NODE_ID, Column.HOST: SortKey.HOST, Column.STATUS: SortKey.STATUS,
                  Column.CPU: SortKey.CPU, Column.MEMORY: SortKey.MEMORY, Column.LOAD: SortKey.LOAD}


@dataclasses.dataclass(frozen=True)
class TableLayout:
    """The node table's columns and their widths (CPU and memory: bar plus percentage)."""

    columns: tuple  # (Column, cells) pairs, in drawing order
    bar: int

    def width_of(self, column: Column) -> int:
        return next((cells for shown, cells in self.columns if shown is column), 0)


def table_layout(width: int) -> TableLayout:
    """Fit the node table into width cells: ID, status, CPU and memory always; then host, last
    seen, load, disk, network and the CPU graph while the bars stay at least MIN_BAR wide."""
    node_id = max(12, min(24, width // 6))
    fixed = {Column.NODE_ID: node_id, Column.STATUS: 12}
    chosen = dict(fixed)
    for column, cells in OPTIONAL_COLUMNS:
        trial = {**chosen, column: cells}
        spare = width - sum(trial.values()) - (len(trial) + 1) - 2 * PERCENT_WIDTH
        if spare // 2 >= MIN_BAR + (6 if column is Column.SPARK else 0):
            chosen = trial
    spare = width - sum(chosen.values()) - (len(chosen) + 1) - 2 * PERCENT_WIDTH
    bar = max(min(spare // 2, 30 if Column.SPARK not in chosen else 24), 4)
    if Column.SPARK in chosen:
        chosen[Column.SPARK] = min(HISTORY_SAMPLES, width - sum(chosen.values()) + chosen[Column.SPARK]
                                   - (len(chosen) + 1) - 2 * (bar + PERCENT_WIDTH))
    chosen[Column.CPU] = chosen[Column.MEMORY] = bar + PERCENT_WIDTH
    return TableLayout(tuple((column, chosen[column]) for column in Column if column in chosen), bar)


def table_header(layout: TableLayout, sort_key: SortKey, reverse: bool, glyphs: Glyphs = UNICODE_GLYPHS) -> str:
    arrow = glyphs.down if reverse else glyphs.up
    return " ".join(fit(column.value + (arrow if SORT_OF_COLUMN.get(column) is sort_key else ""), cells,
                        glyphs.ellipsis) for column, cells in layout.columns)


def node_row(node: Node, layout: TableLayout, now: float, glyphs: Glyphs = UNICODE_GLYPHS,
             alerting: bool = False) -> list[tuple[str, str]]:
    """One table row as (text, Style) segments. A node gone (Disconnected, Missing) keeps its last
    values, dimmed."""
    live = node.status is NodeStatus.ACTIVE
    plain = Style.TEXT if node.status.live else Style.DIM
    metrics = node.metrics or Metrics()
    status_style = Style.for_status(node.status, alerting)
    segments = []
    for column, cells in layout.columns:
        if column is Column.NODE_ID:
            segments.append((fit(node.node_id, cells, glyphs.ellipsis), plain))
        elif column is Column.HOST:
            segments.append((fit(node.hostname or host_of(node.address), cells, glyphs.ellipsis), plain))
        elif column is Column.LABELS:
            labels = ",".join(f"{key}={value}" for key, value in sorted(node.labels.items()))
            segments.append((fit(labels, cells, glyphs.ellipsis), plain))
        elif column is Column.STATUS:
            status = node.status.value + ("!" if alerting else "")
            segments.append((fit(status, cells, glyphs.ellipsis), status_style))
        elif column in (Column.CPU, Column.MEMORY):
            value = metrics.cpu_percent if column is Column.CPU else metrics.memory_percent
            segments.append((bar_text(value or 0.0, layout.bar, glyphs), bar_level(value) if live else Style.DIM))
            segments.append((format_percent(value, glyphs.unicode).rjust(PERCENT_WIDTH), plain))
        elif column is Column.LOAD:
            segments.append((format_number(metrics.load_average_1m, glyphs).rjust(cells), plain))
        elif column is Column.DISK:
            segments.append((format_percent(metrics.root_fs_used_percent, glyphs.unicode).rjust(cells),
                             bar_level(metrics.root_fs_used_percent) if live and metrics.root_fs_used_percent
                             is not None else plain))
        elif column is Column.NET:
            segments.append(((format_rate(metrics.net_receive_bytes_per_s, glyphs) + "/"
                              + format_rate(metrics.net_transmit_bytes_per_s, glyphs)).rjust(cells), plain))
        elif column is Column.SPARK:
            cpu = node.history.cpu if node.history is not None else ()
            segments.append((sparkline(cpu, cells, glyphs), Style.LOW if live else Style.DIM))
        elif column is Column.SEEN:
            seen = format_age(now - node.last_seen) if node.last_seen else glyphs.dash
            segments.append((fit(seen, cells, glyphs.ellipsis), plain))
        segments.append((" ", plain))
    # Neighbours of one style as one segment: each is a print on every redraw, for every row shown.
    merged = [segments[0]]
    for text, style in itertools.islice(segments, 1, len(segments) - 1):
        if style is merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, style)
        else:
            merged.append((text, style))
    return merged


_STATUS_ORDER = {NodeStatus.ACTIVE: 0, NodeStatus.JOINING: 1, NodeStatus.DISCONNECTED: 2, NodeStatus.MISSING: 3}


def sort_nodes(nodes: list[Node], key: SortKey, reverse: bool = False) -> list[Node]:
    """Sort for the table; CPU, memory and load put the busiest first unless reversed, and nodes
    that sent nothing last."""
    def busiest_first(name):
        def sort_value(node):
            value = getattr(node.metrics, name) if node.metrics is not None else None
            return (value is None, -(value or 0.0), node.node_id)
        return sort_value
    keys = {SortKey.NODE_ID: _NODE_ID,
            SortKey.HOST: lambda node: (node.hostname.lower(), node.node_id),
            SortKey.STATUS: lambda node: (_STATUS_ORDER[node.status], node.node_id),
            SortKey.CPU: busiest_first("cpu_percent"), SortKey.MEMORY: busiest_first("memory_percent"),
            SortKey.LOAD: busiest_first("load_average_1m")}
    return sorted(nodes, key=keys[key], reverse=reverse)


def node_matches(node: Node, query: str) -> bool:
    """The `/` filter: KEY=VALUE matches a label exactly; anything else is a case-insensitive
    substring of the node ID, its host name, or any label's KEY=VALUE."""
    query = query.strip()
    if not query:
        return True
    key, sep, value = query.partition("=")
    if sep and key in node.labels:
        return node.labels[key] == value
    return query.lower() in (node.search_text or search_text(node))


@dataclasses.dataclass(frozen=True)
class ClusterSummary:
    counts: dict  # NodeStatus -> how many
    cpu_percent: float | None  # mean over Active nodes that sent a sample
    memory_percent: float | None

    def describe(self) -> str:
        return ", ".join(f"{self.counts[status]} {status.value.lower()}" for status in _STATUS_ORDER
                         if self.counts[status] or status in (NodeStatus.ACTIVE, NodeStatus.DISCONNECTED))


_CPU_PERCENT, _MEMORY_PERCENT = operator.attrgetter("cpu_percent"), operator.attrgetter("memory_percent")


def summarize(nodes: list[Node]) -> ClusterSummary:
    """Counts per status and the mean CPU and memory of the Active nodes that sent a sample (no
    invented zeros). This runs on every redraw, over every node: its loops are list methods and
    builtins, in C."""
    statuses = [node.status for node in nodes]
    counts = {status: statuses.count(status) for status in NodeStatus}  # compared in C: an Enum hashes in Python
    # Each node's sample read once: the dashboard reads the registry's own nodes while they change.
    measured = [metrics for node in nodes if node.status is NodeStatus.ACTIVE and (metrics := node.metrics) is not None]
    if not measured:
        return ClusterSummary(counts, None, None)
    return ClusterSummary(counts, sum(map(_CPU_PERCENT, measured)) / len(measured),
                          sum(map(_MEMORY_PERCENT, measured)) / len(measured))


HEARTBEAT_STEPS_MS = (500, 1000, 2000, 5000)


def next_heartbeat_ms(current_ms: int, longer: bool) -> int | None:
    """The next heartbeat interval step up or down from current_ms, None at either end."""
    if longer:
        return min((ms for ms in HEARTBEAT_STEPS_MS if ms > current_ms), default=None)
    return max((ms for ms in HEARTBEAT_STEPS_MS if ms < current_ms), default=None)


@dataclasses.dataclass
class TableState:
    """Where the user is in the node table; kept across redraws, resizes and the detail view."""

    sort_key: SortKey = SortKey.NODE_ID
    reverse: bool = False
    selected: str = ""  # node ID of the selected row, so the selection follows the node
    scroll: int = 0  # index of the first row shown
    query: str = ""  # the `/` filter
    editing_query: bool = False


@dataclasses.dataclass(frozen=True)
class TableView:
    """What the node table shows this redraw."""

    rows: list  # the visible nodes, in order
    first: int  # index of rows[0] among the matching nodes
    matching: int
    total: int
    selected_index: int  # index among the matching nodes, -1 when none


def prepare_table(nodes: list[Node], state: TableState, height: int) -> TableView:
    """Filter, sort and scroll for a table height rows tall; keeps the selection on its node
    (or the nearest row) and the selected row in view."""
    query = state.query.strip()
    matching = sort_nodes([node for node in nodes if node_matches(node, query)] if query else nodes,
                          state.sort_key, state.reverse)
    index, state.scroll = selection_in_view(matching, _NODE_ID, state.selected, state.scroll, height)
    state.selected = matching[index].node_id if index >= 0 else ""
    return TableView(matching[state.scroll: state.scroll + max(height, 1)], state.scroll, len(matching), len(nodes),
                     index)


_NODE_ID = operator.attrgetter("node_id")


def selection_in_view(items: list, key, selected, scroll: int, height: int) -> tuple[int, int]:
    """(the selected item's index, the scroll that keeps it in a view height rows tall), for the
    node table and the process table alike: the selection follows its key (a node ID, a PID) as
    the rows re-sort; when its item is gone, the row at the scroll is taken; -1 for no items."""
    index = next((i for i, item in enumerate(items) if key(item) == selected), -1)
    if index < 0 and items:
        index = min(max(scroll, 0), len(items) - 1)
    height = max(height, 1)
    scroll = min(max(scroll, index - height + 1, 0), index if index >= 0 else 0)
    return index, max(min(scroll, len(items) - height), 0)


def move_selection(state: TableState, view: TableView, step: int) -> None:
    """Move the selection step rows (negative: up), within the matching rows."""
    if view.matching == 0 or view.selected_index < 0:
        return
    target = min(max(view.selected_index + step, 0), view.matching - 1)
    if view.first <= target < view.first + len(view.rows):
        state.selected = view.rows[target - view.first].node_id
    else:  # off screen: scroll there; prepare_table picks the node
        state.selected, state.scroll = "", target


class ColourMode(enum.Enum):
    NONE = "none"          # NO_COLOR is set: attributes only
    BASIC = "basic"        # 8 colours (TERM=xterm, linux)
    EXTENDED = "extended"  # 256 colours: a readable grey for rows that are gone


def colour_mode(colours: int, environment=os.environ) -> ColourMode:
    if environment.get("NO_COLOR"):  # no-color.org: set and not empty
        return ColourMode.NONE
    return ColourMode.EXTENDED if colours >= 256 else ColourMode.BASIC


# -- a node's detail: sections, the process table, the other lists -------------

class DetailSection(enum.Enum):
    """What the lower half of a node's detail view shows; Tab and 1-4 switch."""

    GRAPHS = "graphs"
    PROCESSES = "processes"
    DISKS_NETWORK = "disks & network"
    CONTAINERS_SENSORS = "containers & sensors"


class ProcessOrder(enum.Enum):
    """How the process table is sorted, as in htop and btop: biggest first."""

    CPU = "CPU"
    MEMORY = "memory"
    IO = "I/O"


_PROCESS_SORT = {ProcessOrder.CPU: lambda p: (p.cpu_percent, p.rss_bytes),
                 ProcessOrder.MEMORY: lambda p: (p.rss_bytes, p.cpu_percent),
                 ProcessOrder.IO: lambda p: (p.io_bytes_per_s, p.cpu_percent)}


@dataclasses.dataclass
class DetailState:
    """Where the user is in a node's detail view; reset when another node is opened."""

    node_id: str = ""
    section: DetailSection = DetailSection.GRAPHS
    order: ProcessOrder = ProcessOrder.CPU
    selected_pid: int = 0  # the selection follows the process, as the node table's follows the node
    scroll: int = 0
    span: HistoryRange = HistoryRange.LIVE  # what the graphs cover (t / T)


@dataclasses.dataclass(frozen=True)
class ProcessView:
    rows: list  # the ProcessSamples shown, in order
    first: int
    count: int
    selected_index: int


def ordered_processes(detail, order: ProcessOrder) -> list:
    return sorted(detail.processes, key=_PROCESS_SORT[order], reverse=True) if detail is not None else []


def prepare_processes(detail, state: DetailState, height: int) -> ProcessView:
    """Sort the snapshot's processes, keep the selection on its PID and in view."""
    processes = ordered_processes(detail, state.order)
    index, state.scroll = selection_in_view(processes, _PID, state.selected_pid, state.scroll, height)
    state.selected_pid = processes[index].pid if index >= 0 else 0
    return ProcessView(processes[state.scroll:state.scroll + max(height, 1)], state.scroll, len(processes), index)


_PID = operator.attrgetter("pid")


def move_process_selection(state: DetailState, view: ProcessView, step: int, detail) -> None:
    if view.count == 0 or view.selected_index < 0:
        return
    target = min(max(view.selected_index + step, 0), view.count - 1)
    state.selected_pid = ordered_processes(detail, state.order)[target].pid


PROCESS_HEADER = f"{'PID':>7} {'USER':<9} {'CPU%':>6} {'RSS':>9} {'I/O/s':>6} S {'THR':>4}  COMMAND"
_STATE_LETTERS = {"running": "R", "sleeping": "S", "disk-sleep": "D", "stopped": "T", "tracing-stop": "t",
                  "zombie": "Z", "dead": "X", "idle": "I", "parked": "P", "waking": "W", "locked": "L"}


def process_line(process, glyphs: Glyphs = UNICODE_GLYPHS) -> str:
    """One row of the process table, htop's columns; the command line where the worker shares it."""
    io = glyphs.dash if process.io_unknown else format_rate(process.io_bytes_per_s, glyphs)
    state = _STATE_LETTERS.get(process.state, (process.state[:1] or "?").upper())
    command = process.command_line or process.name
    return (f"{process.pid:>7} {fit(process.user, 9, glyphs.ellipsis):<9} {process.cpu_percent:>6.1f} "
            f"{format_bytes(process.rss_bytes):>9} {io:>6} {state} {process.threads:>4}  {command}")


MOUNT_HEADER = f"{'MOUNTED ON':<24} {'DEVICE':<18} {'TYPE':<6} {'USED':>9} {'SIZE':>9} {'USE%':>6}"
INTERFACE_HEADER = f"{'INTERFACE':<14} {'LINK':<5} {'RX/s':>6} {'TX/s':>6} {'ERR IN/OUT':>12} {'DROP IN/OUT':>12}"
CONTAINER_HEADER = f"{'CONTAINER / GROUP':<32} {'ENGINE':<10} {'CPU%':>6} {'MEMORY':>9} {'PIDS':>5}"


def mount_line(mount, glyphs: Glyphs = UNICODE_GLYPHS) -> str:
    return (f"{fit(mount.mountpoint, 24, glyphs.ellipsis):<24} {fit(mount.device, 18, glyphs.ellipsis):<18} "
            f"{fit(mount.fstype, 6, glyphs.ellipsis):<6} {format_bytes(mount.used_bytes):>9} "
            f"{format_bytes(mount.total_bytes):>9} {format_percent(mount.used_percent, glyphs.unicode):>6}")


def interface_line(nic, glyphs: Glyphs = UNICODE_GLYPHS) -> str:
    link = "up" if nic.up else "down"
    speed = f"  {nic.speed_mbps} Mb/s" if nic.speed_mbps else ""
    return (f"{fit(nic.name, 14, glyphs.ellipsis):<14} {link:<5} {format_rate(nic.receive_bytes_per_s, glyphs):>6} "
            f"{format_rate(nic.transmit_bytes_per_s, glyphs):>6} {f'{nic.errors_in}/{nic.errors_out}':>12} "
            f"{f'{nic.drops_in}/{nic.drops_out}':>12}{speed}")


def sensor_line(sensor, glyphs: Glyphs = UNICODE_GLYPHS) -> str:
    unit = (" °C" if glyphs.unicode else " C") if sensor.kind == pb.TEMPERATURE_CELSIUS else " RPM"
    limits = ", ".join(f"{name} {value:.0f}" for name, value in (("high", sensor.high), ("critical", sensor.critical))
                       if value)
    return f"{fit(f'{sensor.chip} {sensor.label}'.strip(), 32, glyphs.ellipsis):<32} {sensor.value:>7.1f}{unit}" + \
        (f"  ({limits})" if limits else "")


def container_line(container, glyphs: Glyphs = UNICODE_GLYPHS) -> str:
    memory = format_bytes(container.memory_bytes) if container.memory_bytes else glyphs.dash
    return (f"{fit(container.name or container.id, 32, glyphs.ellipsis):<32} {container.engine:<10} "
            f"{container.cpu_percent:>6.1f} {memory:>9} {container.pids:>5}")


def detail_notice(version: str, offer: DetailOffer | None, status: NodeStatus, detail, detail_at: float,
                  now: float) -> str:
    """The one line above the detail sections: where the data comes from, or why there is none."""
    if offer is None:
        return (f"This node runs cares {version or 'older than 0.4'}, which cannot send processes, disks or "
                f"containers on demand (0.4 and later can).")
    if detail is None:
        return ("Asking the worker for processes, disks and containers..." if status.live
                else f"No detail: the node is {status.value}.")
    age = "" if status.live else f" (from {format_age(now - detail_at)}, the node is {status.value})"
    processes = ("processes not shared (--no-processes)" if not offer.processes else
                 f"{detail.process_count} processes"
                 + (" (its own user's only: the worker's sandbox hides the rest)" if detail.own_processes_only else "")
                 + ", command lines " + ("shared (--share-cmdlines)" if offer.command_lines else "not shared (names only)"))
    cut = f", {detail.left_out} entries left out to fit" if detail.left_out else ""
    return f"Snapshot {format_age(now - detail_at)}{age}: {processes}{cut}."


EVENT_MARKS = {"joined": "J", "rejoined": "R", "left": "L", "lost": "X", "threshold": "!", "recovered": "+",
               "missing": "?"}
EVENT_MARKS_LEGEND = "  ".join(f"{mark} {kind}" for kind, mark in EVENT_MARKS.items())


def history_lines(series: HistorySeries, width: int, height: int, glyphs: Glyphs = UNICODE_GLYPHS) -> list:
    """A node's history as (text, style) lines: CPU and memory graphs height rows tall, network in
    and out, min/avg/max of each, and a time axis with the node's events marked where they fell."""
    label = series.span.value
    lines = []
    for name, metric in (("CPU", "cpu_percent"), ("Mem", "memory_percent")):
        rows = graph_rows(series.values(metric, width), width, height, glyphs, 100.0)
        for index, row in enumerate(rows):
            lines.append(((f"{name} {label}" if index == height - 1 else "").ljust(10) + row, Style.LOW))
        summary = series.summary(metric)
        lines.append(("".ljust(10) + (f"min {summary[0]:.1f}  avg {summary[1]:.1f}  max {summary[2]:.1f} %"
                                      if summary else f"no samples in the last {label}"), Style.DIM))
    rates = [series.values(metric, width) for metric in ("net_receive_bytes_per_s", "net_transmit_bytes_per_s")]
    top = max([value for values in rates for value in values if not math.isnan(value)] + [1.0])
    for name, values in zip(("Net in", "Net out"), rates):
        lines.append((name.ljust(10) + graph_rows(values, width, 1, glyphs, top)[0], Style.LOW))
    axis = [" "] * width
    for at, kind, _ in series.events:
        axis[series.column(at, width)] = EVENT_MARKS.get(kind, "*")
    lines.append(("events".ljust(10) + "".join(axis), Style.BOLD))
    left, right = f"-{label}", "now"
    lines.append(("".ljust(10) + left + right.rjust(max(width - len(left), 0)), Style.DIM))
    lines.append(("".ljust(10) + f"network scale {format_rate(top, glyphs)}/s  {EVENT_MARKS_LEGEND}", Style.DIM))
    return lines


def detail_section_lines(detail, section: DetailSection, glyphs: Glyphs = UNICODE_GLYPHS) -> list[tuple[str, str]]:
    """(text, style) lines of the sections that are plain lists: disks & network, containers & sensors."""
    lines: list[tuple[str, str]] = []

    def block(title: str, header: str, entries, line, empty: str):
        if lines:
            lines.append(("", Style.TEXT))
        lines.append((title, Style.BOLD))
        if not entries:
            lines.append((f"  {empty}", Style.DIM))
            return
        if header:
            lines.append((header, Style.HEADER))
        lines.extend((line(entry, glyphs), Style.TEXT) for entry in entries)

    if detail is None:
        return lines
    if section is DetailSection.DISKS_NETWORK:
        block("Mounts", MOUNT_HEADER, detail.mounts, mount_line, "none reported")
        block("Interfaces", INTERFACE_HEADER, detail.interfaces, interface_line, "none but loopback")
    elif section is DetailSection.CONTAINERS_SENSORS:
        block("Containers and services (cgroup v2, busiest first)", CONTAINER_HEADER, detail.containers,
              container_line, "none (no cgroup v2 groups with processes, or not readable)")
        block("Sensors", "", detail.sensors, sensor_line, "none reported (common in virtual machines)")
    return lines


class Style(str, enum.Enum):
    """Every style the TUI draws with; styles_for() gives each one its colours in every colour
    mode. A str enum, so a row builder's (text, style) pairs still read as their names; a style
    that is not one of these is a KeyError at its first draw, and the tests draw every view."""

    TEXT = "text"
    BOLD = "bold"
    DIM = "dim"
    HEADER = "header"
    SELECTED = "selected"
    ACTIVE = "active"
    JOINING = "joining"
    GONE = "gone"
    ALERT = "alert"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    WARN = "WARN"
    ERROR = "ERROR"
    INVALID = "invalid"

    @staticmethod
    def for_level(level: Level) -> "Style":
        return {Level.WARN: Style.WARN, Level.ERROR: Style.ERROR}.get(level, Style.TEXT)

    @staticmethod
    def for_status(status: NodeStatus, alerting: bool = False) -> "Style":
        if status is NodeStatus.ACTIVE:
            return Style.ALERT if alerting else Style.ACTIVE
        return Style.JOINING if status is NodeStatus.JOINING else Style.GONE


def styles_for(mode: ColourMode, screen) -> dict:
    """(foreground, attribute, background) of every Style, with screen's (asciimatics' Screen)
    colour numbers. Text and backgrounds keep the terminal's own colours, so light themes stay
    readable; colour only marks levels and states. Rows that are gone are grey where 256 colours
    allow it, else plain (never bold black, which is invisible where bold is not bright)."""
    default, normal, bold, reverse = screen.COLOUR_DEFAULT, screen.A_NORMAL, screen.A_BOLD, screen.A_REVERSE
    if mode is ColourMode.NONE:
        plain, strong, inverse = (default, normal, default), (default, bold, default), (default, reverse, default)
        chosen = {Style.BOLD: strong, Style.HEADER: inverse, Style.SELECTED: inverse, Style.ACTIVE: strong,
                  Style.ALERT: strong, Style.HIGH: strong, Style.WARN: strong, Style.ERROR: strong,
                  Style.INVALID: strong}
        return {style: chosen.get(style, plain) for style in Style}
    grey = 244 if mode is ColourMode.EXTENDED else default
    red, green, yellow, cyan = screen.COLOUR_RED, screen.COLOUR_GREEN, screen.COLOUR_YELLOW, screen.COLOUR_CYAN
    return {
        Style.TEXT: (default, normal, default),
        Style.BOLD: (default, bold, default),
        Style.DIM: (grey, normal, default),
        Style.HEADER: (default, reverse, default),
        Style.SELECTED: (screen.COLOUR_BLACK, normal, cyan),
        Style.ACTIVE: (green, bold, default),
        Style.JOINING: (cyan, normal, default),
        Style.GONE: (red, normal, default),
        Style.ALERT: (red, bold, default),
        Style.LOW: (green, normal, default),
        Style.MEDIUM: (yellow, normal, default),
        Style.HIGH: (red, bold, default),
        Style.WARN: (yellow, normal, default),
        Style.ERROR: (red, bold, default),
        Style.INVALID: (red, bold, default),
    }


def widget_palette(styles: dict) -> dict:
    """asciimatics' own widget colours (the create and join forms) in the same scheme; its
    palette has many names, which the ones not listed here take plain."""
    plain, inverse = styles[Style.TEXT], styles[Style.HEADER]
    return collections.defaultdict(lambda: plain, {
        "label": styles[Style.BOLD], "focus_edit_text": inverse, "invalid": styles[Style.INVALID],
        "disabled": styles[Style.DIM], "title": styles[Style.BOLD]})


class TerminalKey(enum.Enum):
    """Keys that are not characters, by asciimatics' names; their codes are asciimatics' own,
    read from its Screen when the TUI loads (see load_tui), so this module need not import it."""

    UP = "KEY_UP"
    DOWN = "KEY_DOWN"
    PAGE_UP = "KEY_PAGE_UP"
    PAGE_DOWN = "KEY_PAGE_DOWN"
    HOME = "KEY_HOME"
    END = "KEY_END"
    ESCAPE = "KEY_ESCAPE"
    BACK = "KEY_BACK"
    TAB = "KEY_TAB"
    BACK_TAB = "KEY_BACK_TAB"

    @property
    def code(self) -> int:
        return _TERMINAL_KEY_CODES[self]


_TERMINAL_KEY_CODES: dict = {}  # TerminalKey -> asciimatics' key code, filled by load_tui
MOVE_KEYS = (TerminalKey.UP, TerminalKey.DOWN, TerminalKey.PAGE_UP, TerminalKey.PAGE_DOWN, TerminalKey.HOME,
             TerminalKey.END)
# Ctrl-C arrives as a key because the screen is opened with catch_interrupt.
QUIT_KEYS = (ord("q"), ord("Q"), 3)
ENTER_KEYS = (10, 13)


def move_step(key: int, page: int) -> int:
    """The rows one of MOVE_KEYS moves a selection or a list by: one, a page, or to either end."""
    page = max(page, 1)
    return {TerminalKey.UP.code: -1, TerminalKey.DOWN.code: 1, TerminalKey.PAGE_UP.code: -page,
            TerminalKey.PAGE_DOWN.code: page, TerminalKey.HOME.code: -10**9, TerminalKey.END.code: 10**9}[key]


def key_code(key) -> int:
    """The code asciimatics reports for a key: a TerminalKey, a one-character string or a code."""
    if isinstance(key, TerminalKey):
        return key.code
    return ord(key) if isinstance(key, str) else key


@dataclasses.dataclass(frozen=True)
class KeyCommand:
    """One binding: the keys, how the help spells them, what they do, and the frame method
    (named by action) that does it. The help and the bindings are both read from the tables below."""

    keys: tuple  # TerminalKey, characters or codes
    shown: str
    does: str
    action: str = ""  # "" for keys handled outside the frame (q quits in the screen's quit_on_key)
    hint: str = ""  # its words on the view's bottom line, if any


DASHBOARD_KEYS = (
    KeyCommand(MOVE_KEYS, "Up/Down, PgUp/PgDn, Home/End",
               "select a node (the table scrolls with it); a click selects too", "move_by_key", "Up/Down select"),
    KeyCommand(ENTER_KEYS, "Enter, double click", "open the selected node's details (Esc returns)", "open_detail",
               "Enter details"),
    KeyCommand(("/",), "/", "filter: part of an ID, host or label, or KEY=VALUE; Enter keeps it, Esc clears it",
               "start_filter", "/ filter"),
    KeyCommand((TerminalKey.ESCAPE,), "Esc", "clear the filter", "clear_filter"),
    KeyCommand(tuple("nhscml"), "n h s c m l", "sort by node ID, host, status, CPU, memory, load", "sort_by_key",
               "n h s c m l sort"),
    KeyCommand(("r",), "r", "reverse the sort", "reverse_sort", "r reverse"),
    KeyCommand(("x",), "x", "forget Disconnected and Missing nodes", "forget_gone", "x forget gone"),
    KeyCommand(("+", "-"), "+ / -", f"longer / shorter heartbeat ({HEARTBEAT_STEPS_MS[0] / 1000:g}-"
                                    f"{HEARTBEAT_STEPS_MS[-1] / 1000:g} s), sent to every worker", "step_heartbeat",
               "+/- heartbeat"),
    KeyCommand(("?",), "?", "this help", "open_help", "? help"),
    KeyCommand(QUIT_KEYS, "q, Ctrl-C", "quit: workers are told the orchestrator is shutting down", "", "q quit"),
)
DETAIL_KEYS = (
    KeyCommand((TerminalKey.TAB, TerminalKey.BACK_TAB, "1", "2", "3", "4"), "Tab, Shift-Tab, 1-4",
               "show the graphs, the processes, the disks and network, or the containers and sensors",
               "choose_section", "Tab or 1-4 section"),
    KeyCommand(("t", "T"), "t / T", "the graphs' range: 60 s live, then 1 h, 24 h, 7 d, 30 d of history",
               "step_range", "t/T graph range"),
    KeyCommand(("c", "m", "i"), "c m i", "sort the processes by CPU, memory or disk I/O", "order_processes",
               "c m i sort processes"),
    KeyCommand(MOVE_KEYS, "Up/Down, PgUp/PgDn, Home/End", "select a process, scroll a list", "move_by_key",
               "Up/Down select"),
    KeyCommand((TerminalKey.ESCAPE, TerminalKey.BACK, "b"), "Esc", "back to the node table", "back", "Esc back"),
    KeyCommand(QUIT_KEYS, "q, Ctrl-C", "quit", "", "q quit"),
)
SORT_KEYS = dict(zip("nhscml", (SortKey.NODE_ID, SortKey.HOST, SortKey.STATUS, SortKey.CPU, SortKey.MEMORY,
                               SortKey.LOAD)))
PROCESS_ORDER_KEYS = {"c": ProcessOrder.CPU, "m": ProcessOrder.MEMORY, "i": ProcessOrder.IO}


def key_bindings(commands) -> dict:
    """key code -> KeyCommand for a table (the first command that names a key has it)."""
    bindings = {}
    for command in commands:
        if command.action:
            for key in command.keys:
                bindings.setdefault(key_code(key), command)
    return bindings


def key_line(commands, first=("q quit", "Esc back")) -> str:
    """A view's bottom line, from its key table: the hints of its commands, quit and back first."""
    hints = [command.hint for command in commands if command.hint]
    return "  ".join(sorted(hints, key=lambda hint: first.index(hint) if hint in first else len(first)))


def key_character(code: int) -> str:
    """The character of a key code, or "" for keys that are not one."""
    return chr(code) if 0 <= code <= sys.maxunicode else ""

MIN_WIDTH, MIN_HEIGHT = 70, 18
# The screen's loop wakes this often with nothing to do (asciimatics' own loop wakes every 50 ms:
# 0.3 % of a core for a dashboard that shows nothing new); a key or a click wakes it at once.
TICK_S = 0.25
# Live data is redrawn once a second.
REDRAW_FRAMES = round(1.0 / TICK_S)
# A redraw forced by a key or a mouse event reuses the list of nodes read this recently.
NODES_MAX_AGE_S = 0.25
# The detail view's history graphs are read from SQLite again this often.
HISTORY_REDRAW_S = 5.0
# What reading or writing a terminal fails with once its pty or ssh session is gone.
TERMINAL_GONE_ERRORS = frozenset({errno.EIO, errno.ENXIO, errno.EBADF, errno.ENOTTY})


class TerminationRequested(BaseException):
    """SIGTERM or SIGHUP while the screen is up: leave it the same way q does. Raised by the
    signal handler wherever the main thread is, so not an Exception: the `except Exception`
    that keeps a redraw alive must not swallow it."""


def _raise_termination(signum, frame):
    raise TerminationRequested()


@dataclasses.dataclass
class FormState:
    """What the create or join form holds, kept across screen rebuilds."""

    address: str
    token: str = ""
    error: str = ""


# kind: (title, address label, what Enter does)
FORM_TEXTS = {
    View.CREATE: ("Create a new cluster", "Listen address: ", "start the orchestrator"),
    View.JOIN: ("Join an existing cluster", "Orchestrator address: ", "join"),
}


class TuiApp:
    """The TUI's model: which view shows, and the state each view keeps across redraws and resizes."""

    def __init__(self, orchestrator_config: OrchestratorConfig | None = None,
                 worker_config: WorkerConfig | None = None):
        self.view = View.MENU
        self.configs = {View.CREATE: orchestrator_config or OrchestratorConfig(),
                        View.JOIN: worker_config or WorkerConfig()}
        self.orchestrator: Orchestrator | None = None
        self.worker: WorkerClient | None = None
        self.sampler: LocalSampler | None = None
        self.menu_choice = 0
        self.forms = {View.CREATE: FormState(self.configs[View.CREATE].listen, self.configs[View.CREATE].token or ""),
                      View.JOIN: FormState(self.configs[View.JOIN].target, self.configs[View.JOIN].token or "")}
        self.table = TableState()
        self.detail_node = ""  # node ID the detail view shows
        self.detail = DetailState()  # its section, process order and selection
        self.help_returns_to = View.DASHBOARD
        self.local_history = NodeHistory()

    def submit(self, kind: View, address: str, token: str = "") -> bool:
        """Check a create or join form and act on it; on failure its error says why."""
        form = self.forms[kind]
        form.address, form.token = address, token
        try:
            if token and not is_valid_token(token):
                raise ValueError(TOKEN_RULE)
            if kind is View.CREATE:
                self.start_orchestrator(dataclasses.replace(
                    self.configs[kind], listen=format_address(*parse_address(address, allow_port_zero=True)),
                    token=token or None))
            else:
                self.start_worker(dataclasses.replace(self.configs[kind], target=parse_target(address),
                                                      token=token or None))
        except (ValueError, StartError) as error:
            form.error = str(error)
            return False
        form.error = ""
        return True

    def start_orchestrator(self, config: OrchestratorConfig) -> None:
        """Start serving (StartError if the address cannot be used) and switch to the dashboard."""
        orchestrator = config.create()
        orchestrator.start()
        self.orchestrator = orchestrator
        self.view = View.DASHBOARD

    def start_worker(self, config: WorkerConfig) -> None:
        """Start the worker (StartError if its node ID already runs here) and switch to its view."""
        self.sampler = LocalSampler()
        self.worker = config.create(self.sampler)
        self.worker.start()
        self.view = View.WORKER

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.orchestrator is not None:
            self.orchestrator.stop()

    def run(self, start=None) -> int:
        """Own the terminal until the user quits; rebuild the scenes on every resize. SIGTERM, and
        SIGHUP (the terminal or ssh session is gone), leave the way q does: workers say goodbye,
        an orchestrator tells its workers. start() starts what the command line asked for (it may
        raise StartError): here, so that a signal that comes before the screen is up, while
        asciimatics is still being imported, also finds a worker that leaves, not one killed."""
        # curses waits ESCDELAY ms after an Escape for the rest of a key sequence: 1 s by default,
        # which makes Esc (leave a view, clear the filter) feel broken. Local terminals and ssh
        # deliver sequences well within 25 ms; a user's own setting wins.
        os.environ.setdefault("ESCDELAY", "25")
        previous = {signum: signal.signal(signum, _raise_termination) for signum in (signal.SIGTERM, signal.SIGHUP)}
        try:
            if start is not None:
                start()
            return self._show()
        except TerminationRequested:
            return 0
        finally:
            # A second hangup (the kernel and the terminal each send one) or SIGTERM must not cut
            # the goodbye short: ignored while shutting down (bounded), the old handlers back after.
            for signum in previous:
                signal.signal(signum, signal.SIG_IGN)
            try:
                self.shutdown()
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)

    def _show(self) -> int:
        scenes = load_tui()
        try:
            with written_a_redraw_at_a_time(sys.stdout):
                while True:
                    try:
                        scenes.Screen.wrapper(lambda screen: scenes.play(self, screen), catch_interrupt=True,
                                              unicode_aware=locale_is_utf8())
                        return 0
                    except scenes.ResizeScreenError:
                        continue
        except scenes.curses_error as error:
            raise RuntimeFailure(f"this terminal cannot show the dashboard ({error}); run with --headless") from None
        except OSError as error:
            if error.errno not in TERMINAL_GONE_ERRORS:
                raise
            # The terminal went away under the screen (EIO on a closed pty): leave cleanly all the same.
            return 0


@contextlib.contextmanager
def written_a_redraw_at_a_time(stream):
    """The screen's text held back until asciimatics flushes, once a redraw. It writes each escape
    sequence and character on its own: under PYTHONUNBUFFERED=1 or -u (containers often set it)
    every one was a system call, about 1,100 a second for a dashboard of 1,000 nodes, and over ssh
    as many small packets. The stream's own settings come back when the screen closes."""
    try:
        settings = {"line_buffering": stream.line_buffering, "write_through": stream.write_through}
        stream.reconfigure(line_buffering=False, write_through=False)
    except (AttributeError, ValueError, OSError):  # not a text file, or closed: write as it is
        settings = None
    try:
        yield
    finally:
        if settings is not None:
            try:
                stream.reconfigure(**settings)
            except (ValueError, OSError):  # the terminal is gone: what was held back goes nowhere
                pass


def locale_is_utf8(environment=os.environ, python_chose_utf8: bool | None = None) -> bool:
    """Whether the user's locale says the terminal takes UTF-8 (else the screen is drawn in ASCII).

    The locale variables are read in POSIX order (LC_ALL, LC_CTYPE, LANG). Python itself turns a C
    or POSIX locale into UTF-8 (PEP 538 and 540: UTF-8 mode comes on unasked, LC_CTYPE=C.UTF-8 is
    set for children), which says nothing about the terminal; asciimatics, asking Python, would
    draw block glyphs on a terminal whose locale is LANG=C."""
    if python_chose_utf8 is None:
        asked = environment.get("PYTHONUTF8") or sys._xoptions.get("utf8") not in (None, "0")
        python_chose_utf8 = bool(sys.flags.utf8_mode) and not asked
    for name in ("LC_ALL", "LC_CTYPE", "LANG"):
        value = environment.get(name, "")
        if name == "LC_CTYPE" and python_chose_utf8 and value == "C.UTF-8":
            continue  # Python's coercion, not the user's
        if value:
            return value.replace("-", "").lower().split("@")[0].endswith(".utf8")
    return False


_tui_scenes = None


def load_tui():
    """The TUI's scenes, defined on first use: importing asciimatics (and curses and wcwidth)
    costs a process 10 MB, which a headless worker or orchestrator never needs."""
    global _tui_scenes
    if _tui_scenes is None:
        _tui_scenes = _define_tui()
    return _tui_scenes


# -- what each pane draws -------------------------------------------------
# Mixins of the asciimatics Pane widgets that load_tui() defines: each render() draws, with the
# pane's put() and put_segments(), what its frame prepared in _update (frame.shown).

class KeyLineView:
    """The bottom line: what the keys do, or what the frame says there (the filter being typed)."""

    def __init__(self, text: str):
        super().__init__(1)
        self._text = text

    def render(self):
        self.put(fit(getattr(self._frame, "bottom_line", "") or self._text, self._w), 0, 0, Style.HEADER)


class EventsView:
    """The newest events that fit, oldest at the top (frame.shown.events)."""

    def render(self):
        self.put(fit("Events", self._w), 0, 0, Style.HEADER)
        for row, event in enumerate(self.shown.events[-(self._h - 1):] if self._h > 1 else ()):
            self.put(format_event(event), 0, 1 + row, Style.for_level(event.level))


class MenuView:
    OPTIONS = ("[1] Create a new cluster (Orchestrator)", "[2] Join an existing cluster (Worker)")

    def render(self):
        self.put(f"cares {VERSION} - pick a role", 2, 0, Style.BOLD)
        for index, option in enumerate(self.OPTIONS):
            chosen = index == self._frame.app.menu_choice
            self.put((" > " if chosen else "   ") + option + " ", 2, 2 + index, Style.SELECTED if chosen else Style.TEXT)
        self.put("Up/Down and Enter to choose, 1 or 2 as shortcuts, q to quit", 2, 5, Style.DIM)


@dataclasses.dataclass
class WorkerShown:
    sample: Metrics
    state: ConnectionState
    events: list


class WorkerView:
    """This machine's metrics, as the worker sends them, and the connection to the orchestrator."""

    def render(self):
        worker, sample, glyphs = self._frame.app.worker, self.shown.sample, self.glyphs
        self.put(f"cares worker - node {worker.node_id} - orchestrator {worker.target}", 0, 0, Style.BOLD)
        state = self.shown.state
        style = {ConnectionPhase.CONNECTED: Style.ACTIVE, ConnectionPhase.RETRYING: Style.WARN}.get(state.phase,
                                                                                                     Style.TEXT)
        self.put(state.describe(), 0, 1, style)
        if worker.labels:
            self.put("labels: " + " ".join(f"{key}={value}" for key, value in sorted(worker.labels.items())),
                     0, 2, Style.DIM)
        bar_width = max(min(self._w - 50, 40), 10)
        history = self._frame.app.local_history
        lines = metric_lines(sample, self._frame.app.sampler.cpu_count, glyphs, bar_width)
        lines.append(("CPU 60s", [(sparkline(history.cpu, min(HISTORY_SAMPLES, bar_width), glyphs), Style.LOW)]))
        lines.append(("Mem 60s", [(sparkline(history.memory, min(HISTORY_SAMPLES, bar_width), glyphs), Style.LOW)]))
        for row, (name, segments) in enumerate(lines):
            x = self.put(f"{name:<9}", 0, 4 + row, Style.BOLD)
            self.put_segments(segments, 4 + row, x)


@dataclasses.dataclass
class DashboardShown:
    summary: ClusterSummary
    layout: TableLayout
    table: TableView
    rows: list  # segments of each visible row
    events: list
    now: float


class DashboardHeaderView:
    def render(self):
        orchestrator, shown, glyphs = self._frame.app.orchestrator, self.shown, self.glyphs
        access = "open cluster (no join token)" if not orchestrator.token else "join token required"
        self.put(f"cares orchestrator - listening on {orchestrator.address} - heartbeat "
                 f"{orchestrator.registry.heartbeat_interval:.2f} s - {access}", 0, 0, Style.BOLD)
        self.put("Join with: cares worker " + "  or  ".join(orchestrator.join_hosts), 0, 1)
        x = self.put(f"Nodes: {shown.summary.describe()}", 0, 2)
        table = shown.table
        if self._frame.app.table.query:
            x = self.put(f"   {table.matching} of {table.total} shown", x, 2, Style.BOLD)
        bar_width = max(min((self._w - x - 34) // 2, 20), 5)
        for label, value in (("   Cluster CPU ", shown.summary.cpu_percent),
                             ("   Memory ", shown.summary.memory_percent)):
            x = self.put(label, x, 2)
            x = self.put(bar_text(value or 0.0, bar_width, glyphs), x, 2, bar_level(value))
            x = self.put(format_percent(value, glyphs.unicode).rjust(7), x, 2)


class NodeTableView:
    """Column titles, then the rows the frame prepared; the selected one highlighted."""

    @property
    def rows(self) -> int:
        return self._height - 1

    def render(self):
        shown, app = self.shown, self._frame.app
        header = table_header(shown.layout, app.table.sort_key, app.table.reverse, self.glyphs)
        table = shown.table
        if table.matching > len(table.rows):
            place = f"{table.first + 1}-{table.first + len(table.rows)} of {table.matching}"
            header = fit(header, self._w - len(place) - 1) + " " + place
        self.put(fit(header, self._w), 0, 0, Style.HEADER)
        if not table.rows:
            hint = ("No node matches the filter - Esc clears it" if app.table.query else
                    f"Waiting for workers - join with: cares worker {app.orchestrator.join_hosts[0]}")
            self.put(hint, 2, 2, Style.DIM)
            return
        for row, (node, segments) in enumerate(zip(table.rows, shown.rows)):
            selected = table.first + row == table.selected_index
            self.put_segments(segments, 1 + row, style=Style.SELECTED if selected else None)


@dataclasses.dataclass
class DetailShown:
    node: Node | None
    events: list
    now: float
    state: DetailState
    notice: str = ""
    processes: ProcessView | None = None  # the process section's rows
    lines: list = dataclasses.field(default_factory=list)  # the list sections' (text, style) lines
    history: list | None = None  # the graphs' (text, style) lines over a span beyond the live 60 s


SECTION_TOP = 12  # the row a detail section starts at, below the join lines and the metrics


class DetailView:
    """Everything the node said at join, every metric, then one section: graphs (live 60 s or
    history), its processes, its disks and interfaces, or its containers and sensors."""

    def render(self):
        node, glyphs = self.shown.node, self.glyphs
        if node is None:
            self.put(f"Node '{self._frame.app.detail_node}' is no longer known (forgotten).", 0, 0, Style.BOLD)
            return
        x = self.put(f"Node {node.node_id}  ", 0, 0, Style.BOLD)
        x = self.put(node.status.value, x, 0, Style.for_status(node.status))
        seen = format_age(self.shown.now - node.last_seen) if node.last_seen else "never"
        self.put(f"  last sample {seen}", x, 0)
        half = self._w // 2
        for row, (name, text) in enumerate(join_lines(node, self.shown.now)):
            x = self.put(f"{name:<10}", 0, 2 + row, Style.BOLD)
            self.put(fit(text, half - x - 1, glyphs.ellipsis), x, 2 + row, Style.TEXT)
        for row, (name, segments) in enumerate(metric_lines(node.metrics or Metrics(), node.cpu_count, glyphs,
                                                           max(min(self._w - half - 44, 20), 6))):
            x = self.put(f"{name:<9}", half, 2 + row, Style.BOLD)
            self.put_segments(segments, 2 + row, x)
        state = self.shown.state
        x = 0
        for index, section in enumerate(DetailSection, 1):
            name = section.value.capitalize() + (f" {state.span.value}" if section is DetailSection.GRAPHS else "")
            x = self.put(f" {index} {name} ", x, 10, Style.SELECTED if section is state.section else Style.DIM) + 1
        if state.section is DetailSection.GRAPHS:
            if self.shown.history is not None:
                self._lines(self.shown.history, SECTION_TOP - 1)
            else:
                self._graphs(node, SECTION_TOP)
            return
        self.put(self.shown.notice, 0, SECTION_TOP - 1, Style.DIM)
        if state.section is DetailSection.PROCESSES:
            self._processes(SECTION_TOP)
        else:
            self._lines(self.shown.lines, SECTION_TOP)

    def _lines(self, lines: list, top: int) -> None:
        for row, (text, style) in enumerate(lines[:max(self._h - top, 0)]):
            self.put(text.ljust(self._w) if style is Style.HEADER else text, 0, top + row, style)

    def _processes(self, top: int) -> None:
        view, state = self.shown.processes, self.shown.state
        if view is None or not view.count:
            return
        self.put(PROCESS_HEADER.ljust(self._w), 0, top, Style.HEADER)
        self.put(f" sorted by {state.order.value} ", max(self._w - 20, 0), top, Style.HEADER)
        for row, process in enumerate(view.rows):
            style = Style.SELECTED if process.pid == state.selected_pid else Style.TEXT
            self.put(process_line(process, self.glyphs).ljust(self._w), 0, top + 1 + row, style)

    def _graphs(self, node: Node, top: int) -> None:
        history, glyphs = node.history or NodeHistory(), self.glyphs
        width = min(HISTORY_SAMPLES, self._w - 12)
        net_top = max(list(history.net_receive) + list(history.net_transmit) + [1.0],
                      key=lambda value: 0.0 if math.isnan(value) else value)
        rows_left = self._h - top
        height = max(min((rows_left - 2) // 2, 5), 1)
        y = top
        for name, series, scale, rows in (("CPU 60s", history.cpu, 100.0, height),
                                          ("Mem 60s", history.memory, 100.0, height),
                                          ("Net in", history.net_receive, net_top, 1),
                                          ("Net out", history.net_transmit, net_top, 1)):
            for index, line in enumerate(graph_rows(series, width, rows, glyphs, scale)):
                self.put(f"{name if index == rows - 1 else '':<10}", 0, y, Style.BOLD)
                self.put(line, 10, y, Style.LOW)
                y += 1
        self.put(f"{'':<10}network scale: {format_rate(net_top, glyphs)}/s", 0, y, Style.DIM)


class HelpView:
    def render(self):
        y = 0
        for title, commands in (("Keys in the node table", DASHBOARD_KEYS), ("Keys in a node's details", DETAIL_KEYS)):
            self.put(title, 0, y, Style.BOLD)
            for command in commands:
                y += 1
                x = self.put(f"  {command.shown:<30}", 0, y, Style.BOLD)
                self.put(command.does, x, y)
            y += 2
        self.put("Rows: Active (green), Joining (cyan), Disconnected and Missing (red, last values kept); "
                 "bars green < 60 % <= yellow < 85 % <= red.", 0, y, Style.DIM)


# -- what each frame does: prepare in _update, act on keys ----------------------
# Mixins of the asciimatics Frames that load_tui() defines; those add the widgets (in their
# __init__), app, shown, glyphs and show(view), which leaves for another view.

class MenuLogic:
    """The first screen: create a cluster or join one."""

    def on_key(self, key: int) -> bool:
        if key in (TerminalKey.UP.code, TerminalKey.DOWN.code):
            self.app.menu_choice = 1 - self.app.menu_choice
            return True
        if key in (ord("1"), ord("2")):
            self.app.menu_choice = key - ord("1")
        elif key not in ENTER_KEYS:
            return False
        self.show((View.CREATE, View.JOIN)[self.app.menu_choice])


class AddressLogic:
    """The create and join forms: an address and an optional join token, checked before use."""

    takes_text = True

    def on_key(self, key: int) -> bool:
        if key in ENTER_KEYS:
            self.save()
            if self.app.submit(self.kind, self.data["address"], self.data["token"]):
                self.show(self.app.view)
            self._error.text = sanitize_text(self.app.forms[self.kind].error, 200)
            return True
        if key == TerminalKey.ESCAPE.code:
            self.save()
            self.app.forms[self.kind].address = self.data["address"]
            self.show(View.MENU)
        return False


class WorkerLogic:
    ROWS = 4 + 10  # title, state, labels, blank, then the metric lines and two graphs

    def _update(self, frame_no):
        app = self.app
        if app.worker is not None:
            # Redraws come with key presses too: the history keeps one point a second.
            sample = app.sampler.sample()
            app.local_history.add(sample, time.monotonic(), 1.0)
            self.shown = WorkerShown(sample, app.worker.state, app.worker.events.tail(self.canvas.height))
        super()._update(frame_no)


class CommandKeys:
    """on_key for a frame whose keys are a KeyCommand table (commands; its frame class makes
    the bindings from it): the command's action method is called with the key; it returns False
    to pass the key on."""

    commands: tuple = ()
    bindings: dict = {}

    def on_key(self, key: int) -> bool:
        command = self.bindings.get(key)
        if command is None:
            return False
        return getattr(self, command.action)(key) is not False


_REORDERED = object()  # a dashboard's rows were reordered or filtered since they were shown


class DashboardLogic(CommandKeys):
    """The orchestrator's live view: header, node table, event log, key line. The frame's
    __init__ sets _table (the NodeTable pane)."""

    commands = DASHBOARD_KEYS

    def _start(self) -> None:
        self._nodes, self._nodes_read_at = [], -math.inf
        self._summary = summarize([])
        # Selection moves asked since the last redraw: applied there, to the view they were
        # asked of (_moved_in), so a held arrow key moves every step without a redraw per key.
        self._moves, self._moved_in = 0, None

    @property
    def bottom_line(self) -> str:
        table = self.app.table
        if table.editing_query:
            return f"Filter: {table.query}_   (ID, host or label text, or KEY=VALUE; Enter keeps, Esc clears)"
        return ""

    def _update(self, frame_no):
        orchestrator = self.app.orchestrator
        if orchestrator is not None:
            # One list of the nodes per redraw (reused for a moment when keys or the mouse force
            # redraws), shared by the header and the table; graphs only for the rows shown.
            now = time.monotonic()
            if now - self._nodes_read_at > NODES_MAX_AGE_S:
                self._nodes = orchestrator.registry.nodes_now()
                self._summary = summarize(self._nodes)
                self._nodes_read_at = now
            self._apply_moves()
            layout = table_layout(self.canvas.width)
            table = prepare_table(self._nodes, self.app.table, self._table.rows)
            if layout.width_of(Column.SPARK):
                histories = orchestrator.registry.histories(node.node_id for node in table.rows)
                rows = [dataclasses.replace(node, history=histories.get(node.node_id)) for node in table.rows]
            else:
                rows = table.rows
            wall = time.time()
            self.shown = DashboardShown(
                self._summary, layout, table,
                [node_row(node, layout, wall, self.glyphs, bool(node.alerting)) for node in rows],
                orchestrator.registry.events.tail(self.canvas.height), wall)
        super()._update(frame_no)

    def on_key(self, key: int) -> bool:
        if self.app.table.editing_query:
            return self._edit_query(key)
        return super().on_key(key)  # asciimatics redraws after the keys it was given: _update shows it

    # -- the actions of DASHBOARD_KEYS ---------------------------------------

    def move_by_key(self, key: int) -> None:
        self._move(move_step(key, self._table.rows - 1))

    def open_detail(self, key: int) -> bool:
        if not self._settle_selection():
            return False
        self.app.detail_node = self.app.table.selected
        self.show(View.DETAIL)

    def start_filter(self, key: int) -> None:
        self.app.table.editing_query = True

    def clear_filter(self, key: int) -> bool:
        if not self.app.table.query:
            return False
        self._reorder(query="")

    def open_help(self, key: int) -> None:
        self.app.help_returns_to = View.DASHBOARD
        self.show(View.HELP)

    def sort_by_key(self, key: int) -> None:
        self._reorder(sort_key=SORT_KEYS[key_character(key)])

    def reverse_sort(self, key: int) -> None:
        self._reorder(reverse=not self.app.table.reverse)

    def forget_gone(self, key: int) -> bool:
        if self.app.orchestrator is None:
            return False
        self.app.orchestrator.forget_gone()
        self._nodes_read_at = -math.inf

    def step_heartbeat(self, key: int) -> bool:
        orchestrator = self.app.orchestrator
        if orchestrator is None:
            return False
        step = next_heartbeat_ms(orchestrator.heartbeat_ms, longer=key == ord("+"))
        if step is not None:
            orchestrator.set_heartbeat_interval(step)

    # -- selection, sorting and the filter -------------------------------------

    def _move(self, step: int) -> None:
        """Ask for a selection move of step rows, in the view on screen or, after a key that
        reordered or filtered the rows, in that new order (built once, here)."""
        if self._moved_in is None:
            if self.shown is None:
                return
            self._moved_in = self.shown.table
        elif self._moved_in is _REORDERED:
            self._moved_in = prepare_table(self._nodes, self.app.table, self._table.rows)
        self._moves += step

    def _apply_moves(self) -> None:
        if self._moves and self._moved_in not in (None, _REORDERED):
            move_selection(self.app.table, self._moved_in, self._moves)
        self._moves, self._moved_in = 0, None

    def _settle_selection(self) -> str:
        """The selected node once the moves asked so far are made (Enter acts on it at once)."""
        moved = bool(self._moves)
        self._apply_moves()
        if moved and not self.app.table.selected:  # moved off screen: the rebuilt view picks it
            prepare_table(self._nodes, self.app.table, self._table.rows)
        return self.app.table.selected

    def _reorder(self, **change) -> None:
        """Change the sort or the filter: moves asked before it happen in the order they were asked in."""
        self._apply_moves()
        for name, value in change.items():
            setattr(self.app.table, name, value)
        self._moved_in = _REORDERED

    def _edit_query(self, key: int) -> bool:
        table = self.app.table
        if key in ENTER_KEYS:
            table.editing_query = False
        elif key == TerminalKey.ESCAPE.code:
            self._reorder(query="", editing_query=False)
        elif key in (TerminalKey.BACK.code, 127, 8):
            self._reorder(query=table.query[:-1])
        elif key in (TerminalKey.UP.code, TerminalKey.DOWN.code):
            self._move(-1 if key == TerminalKey.UP.code else 1)
        elif 32 <= key <= sys.maxunicode and sanitize_text(chr(key)) == chr(key) and len(table.query) < 100:
            self._reorder(query=table.query + chr(key), scroll=0)
        elif key == 3:
            return False  # Ctrl-C still quits
        return True

    def on_click(self, y: int, double: bool) -> bool:
        """A click on a row selects it; a double click opens its details."""
        if self.shown is None:
            return False
        row = y - self._table._y - 1
        if not 0 <= row < len(self.shown.table.rows):
            return False
        self.app.table.selected = self.shown.table.rows[row].node_id
        self._moves, self._moved_in = 0, None  # a click wins over arrow presses not yet shown
        if double:
            self.app.detail_node = self.app.table.selected
            self.show(View.DETAIL)
        return True


class DetailLogic(CommandKeys):
    """A node's detail view. The frame's __init__ sets _pane (the DetailPane)."""

    commands = DETAIL_KEYS

    def _start(self) -> None:
        self._safe = (None, None)  # (the NodeDetail as sent, made safe): made safe once per snapshot
        self._series, self._series_at = None, -math.inf  # history read from SQLite, reused for a while

    def _update(self, frame_no):
        orchestrator = self.app.orchestrator
        if orchestrator is not None:
            node_id, state = self.app.detail_node, self.app.detail
            if state.node_id != node_id:
                state = self.app.detail = DetailState(node_id=node_id, section=state.section)
            node = orchestrator.registry.get(node_id)
            # Looking is asking: the worker sends detail while this view is open, and stops on
            # its own a few intervals after it closes.
            if node is not None:
                orchestrator.watch_detail(node_id)
            detail = None
            if node is not None and node.detail is not None:
                if self._safe[0] is not node.detail:
                    self._safe = (node.detail, safe_detail(node.detail, node.detail_offer))
                detail = self._safe[1]
            now = time.time()
            shown = DetailShown(node, orchestrator.registry.events.tail(self.canvas.height, node_id), now, state)
            if node is not None:
                shown.notice = detail_notice(node.version, node.detail_offer, node.status, detail, node.detail_at, now)
                if state.section is DetailSection.GRAPHS and state.span is not HistoryRange.LIVE:
                    shown.history = self._history_lines(orchestrator, node_id, state.span)
                if state.section is DetailSection.PROCESSES:
                    shown.processes = prepare_processes(detail, state, self._process_rows)
                elif state.section is not DetailSection.GRAPHS:
                    lines = detail_section_lines(detail, state.section, self.glyphs)
                    state.scroll = min(state.scroll, max(len(lines) - (self._pane._h - SECTION_TOP), 0))
                    shown.lines = lines[state.scroll:]
            self.shown = shown
        super()._update(frame_no)

    def _history_lines(self, orchestrator, node_id: str, span: HistoryRange) -> list:
        store = orchestrator.history
        if store is None:
            return [("No history beyond the live 60 s: this orchestrator keeps none (--history-days 0 or "
                     "--no-state). t returns to 60 s.", Style.DIM)]
        series = self._series
        if series is None or (series.node_id, series.span) != (node_id, span) or \
                time.monotonic() - self._series_at > HISTORY_REDRAW_S:
            series, self._series_at = store.series(node_id, span), time.monotonic()
            self._series = series
        width = max(min(self.canvas.width - 12, 120), 10)
        height = max(min((self._pane._h - SECTION_TOP - 8) // 2, 5), 1)
        return [(f"History {span.value} ({series.bucket_s // 60} min buckets; t/T change the range, "
                 f"a blank is a gap)", Style.DIM)] + history_lines(series, width, height, self.glyphs)

    @property
    def _process_rows(self) -> int:
        return max(self._pane._h - SECTION_TOP - 1, 1) if self._pane._h else 1

    # -- the actions of DETAIL_KEYS ----------------------------------------------

    def back(self, key: int) -> bool:
        self.show(View.DASHBOARD)
        return False

    def choose_section(self, key: int) -> None:
        state, sections = self.app.detail, list(DetailSection)
        if key in (TerminalKey.TAB.code, TerminalKey.BACK_TAB.code):
            step = 1 if key == TerminalKey.TAB.code else -1
            state.section = sections[(sections.index(state.section) + step) % len(sections)]
        else:
            state.section = sections[int(key_character(key)) - 1]
        state.scroll = 0

    def step_range(self, key: int) -> None:
        state, spans = self.app.detail, list(HistoryRange)
        state.section, state.scroll = DetailSection.GRAPHS, 0
        state.span = spans[(spans.index(state.span) + (1 if key == ord("t") else -1)) % len(spans)]

    def order_processes(self, key: int) -> None:
        self.app.detail.section, self.app.detail.order = DetailSection.PROCESSES, PROCESS_ORDER_KEYS[key_character(key)]

    def move_by_key(self, key: int) -> None:
        state, shown = self.app.detail, self.shown
        if shown is None or shown.node is None:
            return
        step = move_step(key, self._process_rows - 1)
        if state.section is DetailSection.PROCESSES and shown.processes is not None:
            move_process_selection(state, shown.processes, step, self._safe[1])
        elif state.section is not DetailSection.GRAPHS:
            state.scroll = max(state.scroll + step, 0)


class HelpLogic:
    def on_key(self, key: int) -> bool:
        if key in (TerminalKey.ESCAPE.code, ord("?")) + ENTER_KEYS:
            self.show(self.app.help_returns_to)
        return False


def _define_tui():
    """Import asciimatics and define what must subclass it: the Pane widget, the AppFrame, the
    scenes' frames (each a mixin from above plus its widgets) and play(); see load_tui()."""
    from asciimatics.effects import Effect
    from asciimatics.event import KeyboardEvent, MouseEvent
    from asciimatics.exceptions import NextScene, ResizeScreenError, StopApplication
    from asciimatics.scene import Scene
    from asciimatics.screen import Screen
    from asciimatics.widgets import Frame, Label, Layout, Text, Widget
    from curses import error as curses_error

    _TERMINAL_KEY_CODES.update({key: getattr(Screen, key.value) for key in TerminalKey})

    _INK = re.compile(r"[^ ]+(?: [^ ]+)*")  # text between runs of two or more spaces

    class Pane(Widget):
        """A read-only widget that renders what its frame prepared in _update (frame.shown).

        It prints only the rows that changed since its last redraw when its frame keeps the
        canvas between redraws (AppFrame.keeps_canvas): asciimatics prints character by
        character, about 4,000 a redraw for a dashboard of 1,000 nodes, and most rows (the
        events, the headers, nodes that sent nothing new) are what they were a second before."""

        def __init__(self, height: int, live: bool = True):
            super().__init__(None, tab_stop=False)
            self._height = height
            self._live = live
            # Row -> [(x, text, colours, cells)]: what render() put there, this redraw and the last one.
            self._drawing: dict[int, list] = {}
            self._drawn: dict[int, list] = {}

        @property
        def frame_update_count(self):
            return REDRAW_FRAMES if self._live else 0

        @property
        def shown(self):
            return self._frame.shown

        @property
        def glyphs(self) -> Glyphs:
            return self._frame.glyphs

        def put(self, text: str, x: int, y: int, style: Style = Style.TEXT) -> int:
            """Draw text at (x, y) inside this pane, clipped to it; return the x after it."""
            if y >= self._h or x >= self._w or y < 0:
                return x
            if not self.glyphs.unicode:  # a non-UTF-8 terminal: ASCII only, whatever the data holds
                text = text.encode("ascii", "replace").decode("ascii")
            width = min(self._w - x, display_width(text))
            self._drawing.setdefault(y, []).append((x, fit(text, width, self.glyphs.ellipsis),
                                                    self._frame.styles[style], width))
            return x + width

        def put_segments(self, segments, y: int, x: int = 0, style: Style | None = None) -> int:
            for text, segment_style in segments:
                x = self.put(text, x, y, style or segment_style)
            return x

        def update(self, frame_no):
            self._drawing = {}
            self.render()
            drawn, self._drawn = self._drawn, self._drawing
            canvas, keeps, cleared = self._frame.canvas, self._frame.keeps_canvas, self._frame.palette["background"]
            for y in drawn.keys() | self._drawn.keys():
                line = self._drawn.get(y)
                if keeps:
                    if line == drawn.get(y):
                        continue
                    canvas.clear_buffer(*cleared, self._x, self._y + y, self._w, 1)
                reach = 0  # where the text put on this row so far ends
                for x, text, colours, width in line or ():
                    colour, attr, background = colours
                    # The row was just cleared to spaces of this attribute and background, which
                    # look the same in any colour: the padding of every column is there already,
                    # unless an earlier text on the row reached this far.
                    if (attr, background) == cleared[1:] and x >= reach and width == len(text):
                        for ink in _INK.finditer(text):
                            canvas.print_at(ink.group(), self._x + x + ink.start(), self._y + y,
                                            colour, attr, background)
                    else:
                        canvas.print_at(text, self._x + x, self._y + y, colour, attr, background)
                    reach = max(reach, x + width)

        @abc.abstractmethod
        def render(self) -> None:
            """Draw the frame's prepared content with put()."""

        def reset(self):
            self._drawn = {}  # the frame's canvas was cleared: every row is drawn again

        def process_event(self, event):
            return event

        def required_height(self, offset, width):
            return self._height

        @property
        def value(self):
            return None

    class AppFrame(Frame):
        """A full-screen, borderless, one-column Frame bound to the app model. Its mixin
        prepares frame.shown in _update; its panes only render it."""

        takes_text = False  # True when the frame has text fields, which must see every key first
        # True when the frame holds only panes, which then redraw just the rows that changed: its
        # canvas is cleared only when new (asciimatics clears it before every redraw).
        keeps_canvas = True
        _cleared = False

        def __init__(self, screen, app: TuiApp, view: View, data: dict | None = None, reduce_cpu: bool = False):
            super().__init__(screen, screen.height, screen.width, data=data, has_border=False, can_scroll=False,
                             name=view.value, reduce_cpu=reduce_cpu)
            self.app = app
            self.glyphs = UNICODE_GLYPHS if screen.unicode_aware else ASCII_GLYPHS
            self.styles = styles_for(colour_mode(screen.colours), Screen)
            self.palette = widget_palette(self.styles)
            self.shown = None
            self.column = Layout([1], fill_frame=True)
            self.add_layout(self.column)

        def _clear(self):
            if not (self.keeps_canvas and self._cleared):
                super()._clear()
                self._cleared = True

        def reset(self):
            self._cleared = False  # asciimatics gives the frame a new canvas, and its panes forget their rows
            super().reset()

        def set_theme(self, theme):
            """Keep our palette: asciimatics re-applies its named theme (a blue background) when
            Screen.set_scenes clones the start scene's frame, and ours depends on the terminal."""
            if getattr(self, "styles", None) is None:
                super().set_theme(theme)
            else:
                self.palette = widget_palette(self.styles)

        def on_key(self, key: int) -> bool:
            """Act on a key this view uses and return True; False passes it on."""
            return False

        def on_click(self, y: int, double: bool) -> bool:
            return False

        def process_event(self, event):
            # Keys nobody uses go back to the screen, whose unhandled-input handler quits on q and
            # Ctrl-C; a Frame without text fields would otherwise swallow them.
            if isinstance(event, KeyboardEvent):
                if self.on_key(event.key_code):
                    return None
                if not self.takes_text:
                    return event
            elif isinstance(event, MouseEvent) and event.buttons and \
                    self.on_click(event.y, bool(event.buttons & MouseEvent.DOUBLE_CLICK)):
                return None
            return super().process_event(event)

        def show(self, view: View):
            self.app.view = view
            raise NextScene(view.value)

        def lay_out(self, *widgets) -> None:
            """The column top to bottom, then fixed: a frame's __init__ ends here."""
            for widget in widgets:
                self.column.add_widget(widget)
            self.fix()

    class KeyedFrame(AppFrame):
        """A frame whose keys are its logic's KeyCommand table (commands): the bindings and the
        key line are both made from it, so neither can drift from the other."""

        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__(**kwargs)
            cls.bindings = key_bindings(cls.commands)

        def __init__(self, screen, app: TuiApp, view: View):
            super().__init__(screen, app, view)
            self._start()
            self.key_line = KeyLine(key_line(self.commands))

    # The panes: what each draws is its mixin's; that it is a widget, this.
    class KeyLine(KeyLineView, Pane): pass  # noqa: E701
    class EventPane(EventsView, Pane): pass  # noqa: E701
    class MenuPane(MenuView, Pane): pass  # noqa: E701
    class WorkerPane(WorkerView, Pane): pass  # noqa: E701
    class DashboardHeader(DashboardHeaderView, Pane): pass  # noqa: E701
    class NodeTable(NodeTableView, Pane): pass  # noqa: E701
    class DetailPane(DetailView, Pane): pass  # noqa: E701
    class HelpPane(HelpView, Pane): pass  # noqa: E701

    class MenuFrame(MenuLogic, AppFrame):
        def __init__(self, screen, app: TuiApp):
            super().__init__(screen, app, View.MENU)
            self.lay_out(MenuPane(7, live=False))

    class SafeText(Text):
        """A Text field that refuses characters which could rewrite the terminal (bidi overrides and the like)."""

        def process_event(self, event):
            if (isinstance(event, KeyboardEvent) and event.key_code >= 32
                    and (event.key_code > sys.maxunicode or sanitize_text(chr(event.key_code)) == "?")):
                return None
            return super().process_event(event)

    class AddressFrame(AddressLogic, AppFrame):
        keeps_canvas = False  # asciimatics' own fields and labels draw on a cleared canvas

        def __init__(self, screen, app: TuiApp, kind: View):
            form = app.forms[kind]
            # reduce_cpu: asciimatics' steady cursor; a blinking one redraws the form every 5 ticks.
            super().__init__(screen, app, kind, data={"address": form.address, "token": form.token}, reduce_cpu=True)
            self.kind = kind
            title, address_label, action = FORM_TEXTS[kind]
            layout = self.column
            layout.add_widget(Label(title))
            layout.add_widget(Label(""))
            layout.add_widget(SafeText(address_label, name="address", max_length=300))
            layout.add_widget(SafeText("Join token (optional): ", name="token", hide_char="*", max_length=256))
            layout.add_widget(Label(""))
            self._error = Label(sanitize_text(form.error, 200))
            self._error.custom_colour = "invalid"  # asciimatics' palette name, not a Style
            layout.add_widget(self._error)
            layout.add_widget(Label(f"Enter to {action}, Tab to move between fields, Esc for the menu, "
                                    "Ctrl-C to quit"))
            self.fix()

    class WorkerFrame(WorkerLogic, AppFrame):
        def __init__(self, screen, app: TuiApp):
            super().__init__(screen, app, View.WORKER)
            self.lay_out(WorkerPane(self.ROWS), EventPane(max(screen.height - self.ROWS - 1, 2)),
                         KeyLine("q quit (says goodbye to the orchestrator)"))

    class DashboardFrame(DashboardLogic, KeyedFrame):
        def __init__(self, screen, app: TuiApp):
            super().__init__(screen, app, View.DASHBOARD)
            log_height = max(4, screen.height // 4)
            self._table = NodeTable(screen.height - 3 - log_height - 1)
            self.lay_out(DashboardHeader(3), self._table, EventPane(log_height), self.key_line)

    class DetailFrame(DetailLogic, KeyedFrame):
        def __init__(self, screen, app: TuiApp):
            super().__init__(screen, app, View.DETAIL)
            events = max(3, screen.height - 27)
            self._pane = DetailPane(screen.height - events - 1)
            self.lay_out(self._pane, EventPane(events), self.key_line)

    class HelpFrame(HelpLogic, AppFrame):
        def __init__(self, screen, app: TuiApp):
            super().__init__(screen, app, View.HELP)
            self.lay_out(HelpPane(screen.height - 1, live=False), KeyLine("Esc or ? to go back  q quit"))

    class TooSmallNotice(Effect):
        """Shown instead of a layout that does not fit; resizing brings the real view back."""

        def reset(self):
            pass

        def _update(self, frame_no):
            message = f"terminal too small (need {MIN_WIDTH}x{MIN_HEIGHT}); enlarge it or press q"
            self._screen.print_at(fit(message, self._screen.width, "~"), 0, 0)

        @property
        def stop_frame(self):
            return 0

    def quit_on_key(event) -> None:
        """The screen's handler for keys no view used."""
        if isinstance(event, KeyboardEvent) and event.key_code in QUIT_KEYS:
            raise StopApplication("quit")

    def draw_next(screen) -> None:
        """One turn of the screen's loop (events, then a redraw when one is due), with the garbage
        collector paused. A redraw makes thousands of short-lived objects that die by reference
        counting. Were they to set off a collection, it would scan, on this thread, every young object
        of the gRPC loop as well: the loop frees about as many objects as it makes, so on its own it
        seldom reaches a collection, and its streams' live coroutines, futures and samples (about
        20,000 at 1,000 nodes on a 1 s heartbeat) wait in the young generation. Measured at 1,000
        nodes: a third of the main thread's collections took 10-22 ms, and the process collected for
        1.05 s a minute (0.29 s headless); 0.37 s with the pause."""
        with collection_deferred():
            screen.draw_next_frame()

    def play(app: TuiApp, screen) -> None:
        """Show the scenes for the current view on this screen, until quit or resize."""
        if screen.width < MIN_WIDTH or screen.height < MIN_HEIGHT:
            scenes = [Scene([TooSmallNotice(screen)], -1, name="too-small")]
        else:
            scenes = [Scene([MenuFrame(screen, app)], -1, name=View.MENU.value),
                      Scene([AddressFrame(screen, app, View.CREATE)], -1, name=View.CREATE.value),
                      Scene([AddressFrame(screen, app, View.JOIN)], -1, name=View.JOIN.value),
                      Scene([WorkerFrame(screen, app)], -1, name=View.WORKER.value),
                      Scene([DashboardFrame(screen, app)], -1, name=View.DASHBOARD.value),
                      Scene([DetailFrame(screen, app)], -1, name=View.DETAIL.value),
                      Scene([HelpFrame(screen, app)], -1, name=View.HELP.value)]

        def current_scene():
            return next((scene for scene in scenes if scene.name == app.view.value), scenes[0])

        # Screen.play's loop, with our tick: draw, then wait for input until the next tick is due.
        screen.set_scenes(scenes, unhandled_input=quit_on_key, start_scene=current_scene())
        try:
            while True:
                due = time.monotonic() + TICK_S
                draw_next(screen)
                if screen.has_resized():
                    scene = current_scene()
                    scene.exit()
                    raise ResizeScreenError("Screen resized", scene)
                screen.wait_for_input(max(due - time.monotonic(), 0.0))
        except StopApplication:
            return

    return types.SimpleNamespace(
        Screen=Screen, ResizeScreenError=ResizeScreenError, curses_error=curses_error, play=play, draw_next=draw_next,
        quit_on_key=quit_on_key,
        styles_for=lambda mode: styles_for(mode, Screen), MenuFrame=MenuFrame, AddressFrame=AddressFrame,
        WorkerFrame=WorkerFrame, DashboardFrame=DashboardFrame, DetailFrame=DetailFrame, HelpFrame=HelpFrame,
        TooSmallNotice=TooSmallNotice)


def join_lines(node: Node, now: float) -> list[tuple[str, str]]:
    """What a node said about itself at join, for its detail view."""
    joined = time.strftime("%Y-%m-%d %H:%M", time.localtime(node.joined_at)) if node.joined_at else "?"
    memory = format_bytes(node.memory_total_bytes) if node.memory_total_bytes else "?"
    labels = " ".join(f"{key}={value}" for key, value in sorted(node.labels.items())) or "(none)"
    return [("Address", node.address or "?"), ("Host", node.hostname or "?"), ("Platform", node.platform or "?"),
            ("Version", node.version or "?"), ("Hardware", f"{node.cpu_count or '?'} CPUs, {memory} memory"),
            ("Joined", f"{joined} ({format_age(now - node.joined_at)})" if node.joined_at else "?"),
            ("Labels", labels)]


def metric_lines(metrics: Metrics, cpu_count: int, glyphs: Glyphs, bar_width: int) -> list[tuple[str, list]]:
    """Every metric of a sample as (name, segments) lines: the worker view and the detail view."""
    def bar(value, note=""):
        if value is None:
            return [(glyphs.dash, Style.DIM)]
        return [(bar_text(value, bar_width, glyphs), bar_level(value)),
                (format_percent(value, glyphs.unicode).rjust(7) + (f"  {note}" if note else ""), Style.TEXT)]
    memory_note = (f"{format_bytes(metrics.memory_used_bytes)} / {format_bytes(metrics.memory_total_bytes)}"
                   if metrics.memory_used_bytes is not None and metrics.memory_total_bytes else "")
    disk_note = f"of {format_bytes(metrics.root_fs_size_bytes)}" if metrics.root_fs_size_bytes else ""
    loads = (metrics.load_average_1m, metrics.load_average_5m, metrics.load_average_15m)
    uptime = (format_uptime(time.time() - metrics.boot_time_unix_s) if metrics.boot_time_unix_s
              else glyphs.dash)
    return [("CPU", bar(metrics.cpu_percent, f"{cpu_count} CPUs" if cpu_count else "")),
            ("Memory", bar(metrics.memory_percent, memory_note)),
            ("Swap", bar(metrics.swap_percent)),
            ("Root FS", bar(metrics.root_fs_used_percent, disk_note)),
            ("Load", [(" ".join(format_number(load, glyphs) for load in loads) + "  (1, 5, 15 min)", Style.TEXT)]),
            ("Uptime", [(uptime, Style.TEXT)]),
            ("Disk", [(f"read {format_rate(metrics.disk_read_bytes_per_s, glyphs)}/s  "
                       f"write {format_rate(metrics.disk_write_bytes_per_s, glyphs)}/s", Style.TEXT)]),
            ("Network", [(f"in {format_rate(metrics.net_receive_bytes_per_s, glyphs)}/s  "
                          f"out {format_rate(metrics.net_transmit_bytes_per_s, glyphs)}/s", Style.TEXT)])]


# ---------------------------------------------------------------------------
# 7. Running without a screen: log lines written off the serving path, the
#    signals a headless process answers, and what it tells systemd.
#    Holds: LineWriter, log styles, StopSignals, SdNotifier, serve_headless and
#    serve_worker_headless. Talks to: 3 (events), 4c and 5 (what it runs).
# ---------------------------------------------------------------------------

class LogStyle(enum.Enum):
    """How a headless process writes an event as a line."""

    TEXT = "text"          # "2026-11-28 04:48:48 [WARN] Node 'web1' lost: ..."
    JOURNALD = "journald"  # "<4>Node 'web1' lost: ...": journald adds the time and reads the priority
    JSON = "json"          # one JSON object per event, for log shippers


def under_journald(environ=None, fd: int = 2) -> bool:
    """True when fd (stderr) is the journal stream systemd connected: $JOURNAL_STREAM holds its
    "device:inode", and counts only while fd is still that file (a child whose stderr was
    redirected inherits the variable, not the stream)."""
    environ = os.environ if environ is None else environ
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(fd)
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def event_line(event: Event, style: LogStyle) -> str:
    """One line for one event (without the newline)."""
    if style is LogStyle.JOURNALD:
        return f"<{event.level.value}>{event.text}"
    if style is LogStyle.JSON:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.at)) + f".{int(event.at % 1 * 1000):03d}Z"
        record = {"ts": stamp, "level": event.level.name.lower(), "event": event.kind.value,
                  "node_id": event.node_id or None, "message": event.text}
        record.update({key: value for key, value in event.values.items() if key not in record})
        return json.dumps(record, ensure_ascii=True, allow_nan=False, default=str)
    return format_event(event, "%Y-%m-%d %H:%M:%S")


class LineWriter:
    """Writes log lines to a file descriptor from its own thread, so that a log which is slow,
    stopped (a paused pager, Ctrl-S), broken (a closed pipe) or full (a full disk) never blocks
    or breaks whoever logs: put() only appends to a bounded queue. Lines that do not fit, or
    cannot be written, are counted and reported once writing works again."""

    def __init__(self, fd: int = 2, capacity: int = LOG_QUEUE_LINES):
        self._fd = fd
        self._capacity = capacity
        self._queue: collections.deque[str] = collections.deque()
        self._ready = threading.Condition()
        self._writing = False
        self.dropped = 0
        self._drop_reason = ""
        threading.Thread(target=self._drain, name="cares-log", daemon=True).start()

    def put(self, line: str) -> None:
        """Queue one line; never blocks, never raises."""
        with self._ready:
            if len(self._queue) >= self._capacity:
                self.dropped += 1
                self._drop_reason = self._drop_reason or "the log was not being read"
                return
            self._queue.append(line)
            self._ready.notify()

    def flush(self, timeout: float) -> bool:
        """Wait up to timeout for the queue to be written (at exit); False if it was not."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while self._queue or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ready.wait(left)
        return True

    def _drain(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                lines = list(self._queue)
                self._queue.clear()
                dropped, reason = self.dropped, self._drop_reason
                self._writing = True
            if dropped:
                lines.insert(0, f"cares: {dropped} log line(s) were dropped ({reason}).")
            error = self._write("".join(line + "\n" for line in lines))
            with self._ready:
                self._writing = False
                if error is None:
                    self.dropped -= dropped
                    if not self.dropped:
                        self._drop_reason = ""
                else:
                    self.dropped += len(lines) - (1 if dropped else 0)
                    self._drop_reason = error
                self._ready.notify_all()

    def _write(self, text: str) -> str | None:
        """Write all of text, or return why not (the OS's words: broken pipe, no space left...)."""
        data = text.encode("utf-8", "backslashreplace")
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as error:
            return os_error_text(error)
        return None


class StopSignals:
    """SIGINT and SIGTERM ask a headless process to stop. SIGHUP is only noted: the terminal or
    ssh session that started it went away, which changes nothing for a process that has no
    screen, so it keeps serving (stop it with SIGTERM; for a lasting service use install-service).
    Handlers only set flags: the waiting thread does the logging, outside any signal handler."""

    def __init__(self):
        self._wake = threading.Event()
        self.stopping = False
        self._hangups = 0
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hangup)

    def _on_stop(self, signum, frame) -> None:
        self.stopping = True
        self._wake.set()

    def _on_hangup(self, signum, frame) -> None:
        self._hangups += 1
        self._wake.set()

    def wait(self, events: EventLog) -> None:
        """Block until asked to stop."""
        noted = 0
        while not self.stopping:
            self._wake.wait()
            self._wake.clear()
            if self._hangups != noted:
                noted = self._hangups
                events.add(Level.WARN, "SIGHUP: the terminal or session that started cares is gone; "
                                       "it keeps running headless (stop it with SIGTERM).")


# -- sd_notify -------------------------------------------------------------
#
# The protocol (sd_notify(3)): one datagram of newline-separated VAR=value lines to the
# AF_UNIX socket named in $NOTIFY_SOCKET ("@name" is Linux's abstract namespace). The
# kernel attaches our PID, which NotifyAccess=main checks, so it works from any thread.

STATUS_LIMIT = 200  # characters of STATUS= text; `systemctl status` shows one line


def notify_address(value: str) -> str | None:
    """The socket address $NOTIFY_SOCKET names, or None when there is none we can use."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # abstract namespace: a leading NUL instead of the "@"
    if value.startswith("/"):
        return value
    return None  # unset, or a form we do not speak (newer systemd also offers vsock:...)


def watchdog_interval_from(environ, pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, as sd_watchdog_enabled(3)
    advises. None when the unit has no WatchdogSec=, or when $WATCHDOG_PID names another
    process (the variables were inherited, not meant for us)."""
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


def status_line(text: str, limit: int = STATUS_LIMIT) -> str:
    """text as one line for systemd: a newline would end the STATUS= assignment and start another."""
    return sanitize_text(" ".join(str(text).split()), limit)


class SdNotifier:
    """Tells systemd how the service is doing. Every method is safe to call without systemd
    (it then does nothing), from any thread, and from an asyncio loop: the socket is
    non-blocking, and a failure is counted in `failures` and never raised, because a broken
    notify socket must not break the worker or the orchestrator."""

    def __init__(self, environ=None, pid: int | None = None):
        environ = os.environ if environ is None else environ
        self.address = notify_address(environ.get("NOTIFY_SOCKET", ""))
        self._watchdog_s = watchdog_interval_from(environ, os.getpid() if pid is None else pid)
        self._next_watchdog = 0.0
        self._last_status = None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self.sent = 0
        self.failures = 0
        self.last_error = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send VAR=value lines as one datagram; True if the kernel took it."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._socket.setblocking(False)  # a full queue drops the message, never blocks
                # sendto() each time rather than connect() once: after `systemctl daemon-reexec`
                # the path names a new socket, and a connected socket would keep the dead one.
                self._socket.sendto(message, self.address)
            except Exception as error:  # OSError mostly; nothing here may reach the caller
                self.failures += 1
                self.last_error = getattr(error, "strerror", None) or str(error)
                return False
            self.sent += 1
            return True

    def ready(self, status: str | None = None) -> bool:
        """The service is up: systemd finishes `systemctl start` and starts ordering after us."""
        return self.send("READY=1", *self._status_lines(status))

    def status(self, text: str) -> bool:
        """What `systemctl status` shows, e.g. "connected to 10.0.0.5:50051". Repeats are
        skipped, so this can be called from a periodic tick."""
        line = status_line(text)
        if line == self._last_status:
            return True
        self._last_status = line
        return self.send("STATUS=" + line)

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WatchdogSec=), or None when no watchdog runs."""
        return self._watchdog_s

    def watchdog_if_due(self, now: float | None = None) -> bool:
        """Ping if watchdog_interval() has passed since the last ping: call it from every tick
        of the loop whose stall should get the process restarted."""
        if self._watchdog_s is None:
            return False
        now = time.monotonic() if now is None else now
        if now < self._next_watchdog:
            return False
        self._next_watchdog = now + self._watchdog_s
        return self.watchdog()

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun: systemd shows "deactivating" and stops expecting watchdog pings."""
        return self.send("STOPPING=1", *self._status_lines(status))

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _status_lines(self, status: str | None) -> list[str]:
        if status is None:
            return []
        self._last_status = status_line(status)
        return ["STATUS=" + self._last_status]


def log_to_stderr(events: EventLog, style: LogStyle) -> LineWriter:
    writer = LineWriter(2)
    events.subscribe(lambda event: writer.put(event_line(event, style)))
    return writer


def serve_headless(orchestrator: Orchestrator, style: LogStyle = LogStyle.TEXT) -> int:
    """What `cares orchestrator --headless` runs once its options are parsed: serve until SIGTERM
    or SIGINT, logging events to stderr and telling systemd how it goes, then tell every worker
    and stop. StartError if it cannot listen."""
    events = orchestrator.registry.events
    writer = log_to_stderr(events, style)
    signals = StopSignals()
    notifier = SdNotifier()
    try:
        orchestrator.start()
        events.add(Level.INFO, "Workers can join with: cares worker " + " | ".join(orchestrator.join_hosts))
        if not orchestrator.token:
            events.add(Level.WARN, "Open cluster: anyone who can reach this port can join "
                                   "(set --token or CARES_TOKEN).")
        notifier.ready(f"listening on {orchestrator.address}")
        tell_systemd_from_the_loop(notifier, lambda: orchestrator_status(orchestrator))
        signals.wait(events)
        notifier.stopping("telling workers and stopping")
        orchestrator.stop()
    finally:
        writer.flush(LOG_FLUSH_AT_EXIT_S)
    return 0


def orchestrator_status(orchestrator: Orchestrator) -> str:
    counts = orchestrator.registry.status_counts()
    return (f"listening on {orchestrator.address}; {counts[NodeStatus.ACTIVE]} of {sum(counts.values())} "
            f"nodes active")


def tell_systemd_from_the_loop(notifier: SdNotifier, status) -> None:
    """Under systemd, a task on the gRPC loop sends STATUS= (status() each second, repeats
    skipped) and WATCHDOG=1: the loop that serves is the one whose stall must get cares restarted."""
    if not notifier.enabled:
        return

    async def tell_forever():
        while True:
            try:
                notifier.status(status())
                notifier.watchdog_if_due()
            except Exception:  # a status that cannot be worked out must not end the pings
                notifier.watchdog_if_due()
            await asyncio.sleep(1.0)
    asyncio.run_coroutine_threadsafe(tell_forever(), grpc_loop())


def raise_open_file_limit() -> None:
    """Lift the soft open-files limit to the hard one: one socket per worker, and the usual soft
    limit of 1024 would refuse workers past about a thousand."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 1 << 20)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def serve_worker_headless(client: WorkerClient, style: LogStyle = LogStyle.TEXT) -> int:
    """What `cares worker --headless` runs: stream until SIGTERM or SIGINT, then say goodbye.
    READY=1 once it runs, not once it joined: an orchestrator away must not time the start out."""
    writer = log_to_stderr(client.events, style)
    signals = StopSignals()
    notifier = SdNotifier()
    try:
        client.events.add(Level.INFO, f"Worker '{client.node_id}' joining {client.target}.")
        client.start()
        notifier.ready(client.state.describe())
        tell_systemd_from_the_loop(notifier, lambda: client.state.describe())
        signals.wait(client.events)
        notifier.stopping("saying goodbye")
        client.stop()
    finally:
        writer.flush(LOG_FLUSH_AT_EXIT_S)
    return 0


# ---------------------------------------------------------------------------
# 8. Running as a service: the systemd unit install-service writes, and what
#    uninstall-service removes. Checked by systemd's own parser in the tests.
#    Holds: where things go, the unit text and its sandbox, the checks before
#    installing, install and uninstall. Talks to: 1 (addresses, labels), 3
#    (DetailOffer for the worker's flags); it starts nothing itself but systemctl.
# ---------------------------------------------------------------------------

class ServiceError(Exception):
    """install-service, uninstall-service or their input went wrong; the message is one line.
    usage=True for bad input (exit code 2), False when the work itself failed (exit code 1)."""

    def __init__(self, message: str, usage: bool = False):
        super().__init__(message)
        self.usage = usage


# -- where install-service puts things -------------------------------------

ROLES = ("worker", "orchestrator")
SYSTEM_UNIT_DIR = "/etc/systemd/system"
SYSTEM_PYZ = "/usr/local/lib/cares/cares.pyz"
SYSTEM_CONFIG_DIR = "/etc/cares"
# Home directories are hidden from system services (ProtectHome=yes): nothing they run may live there.
HOME_PREFIXES = ("/home/", "/root/", "/run/user/")

# The unit file starts with comment lines naming every other file that install wrote and every
# directory it created, so uninstall removes exactly those, and a second install knows what it owns.
MANIFEST_FILE = "# cares-installed: "
MANIFEST_DIR = "# cares-created-dir: "


@dataclasses.dataclass(frozen=True)
class ServicePaths:
    """Where a system (or --user) install puts the unit, the copy of cares.pyz and the token
    file. The paths are the ones systemd will see; `root` prefixes them on disk only, so tests
    can install into a temporary directory and still check the real unit text."""

    user: bool
    unit_dir: str
    pyz: str
    config_dir: str
    root: str = "/"

    @classmethod
    def system(cls, root: str = "/") -> ServicePaths:
        return cls(False, SYSTEM_UNIT_DIR, SYSTEM_PYZ, SYSTEM_CONFIG_DIR, root)

    @classmethod
    def for_user(cls, home: str | None = None, environ=None, root: str = "/") -> ServicePaths:
        """~/.config/systemd/user (or $XDG_CONFIG_HOME/systemd/user, where `systemctl --user`
        looks too), ~/.local/lib/cares/cares.pyz and ~/.config/cares/ROLE.env."""
        environ = os.environ if environ is None else environ
        home = home or environ.get("HOME") or os.path.expanduser("~")
        if not os.path.isabs(home):
            raise ServiceError(f"cannot tell where your home directory is (HOME={home or 'unset'})")
        config = environ.get("XDG_CONFIG_HOME", "")
        config = config if os.path.isabs(config) else os.path.join(home, ".config")
        return cls(True, os.path.join(config, "systemd", "user"),
                   os.path.join(home, ".local", "lib", "cares", "cares.pyz"), os.path.join(config, "cares"), root)

    def unit_name(self, role: str) -> str:
        return f"cares-{role}.service"

    def unit_file(self, role: str) -> str:
        return os.path.join(self.unit_dir, self.unit_name(role))

    def env_file(self, role: str) -> str:
        return os.path.join(self.config_dir, f"{role}.env")

    def on_disk(self, path: str) -> str:
        return path if self.root == "/" else os.path.join(self.root, path.lstrip("/"))

    def systemctl(self, *words: str) -> list[str]:
        return ["systemctl", *(["--user"] if self.user else []), *words]


@dataclasses.dataclass
class Manifest:
    files: list[str] = dataclasses.field(default_factory=list)
    dirs: list[str] = dataclasses.field(default_factory=list)


def read_manifest(unit_text: str, paths: ServicePaths, role: str) -> Manifest:
    """The files and directories a unit file says install wrote, keeping only those this
    install could have written: a hand-edited unit must never make uninstall delete /etc/passwd."""
    allowed_files = {paths.pyz, paths.env_file(role)}
    allowed_dirs = owned_dir_candidates(paths, role)
    manifest = Manifest()
    for line in unit_text.splitlines():
        if line.startswith(MANIFEST_FILE) and line[len(MANIFEST_FILE):] in allowed_files:
            manifest.files.append(line[len(MANIFEST_FILE):])
        elif line.startswith(MANIFEST_DIR) and line[len(MANIFEST_DIR):] in allowed_dirs:
            manifest.dirs.append(line[len(MANIFEST_DIR):])
    return manifest


def owned_dir_candidates(paths: ServicePaths, role: str) -> set[str]:
    """Directories install may have had to create: the parents of its files (never /)."""
    candidates = set()
    for path in (paths.unit_file(role), paths.pyz, paths.env_file(role)):
        parent = os.path.dirname(path)
        while parent != os.path.dirname(parent):
            candidates.add(parent)
            parent = os.path.dirname(parent)
    return candidates


def written_by_install(unit_text: str, role: str) -> bool:
    """Whether a unit file is one install-service wrote (its first line says so): a unit of the
    same name written by hand is neither overwritten nor removed."""
    return unit_text.startswith(f"# cares-{role}.service, written by `cares install-service {role}`")


def manifest_header(role: str, manifest: Manifest) -> str:
    lines = [f"# cares-{role}.service, written by `cares install-service {role}` (cares {VERSION}).",
             f"# `cares uninstall-service {role}` removes this unit, the files and the (then empty)",
             "# directories listed below. Run install-service again to change it: edits here are overwritten."]
    lines += [MANIFEST_FILE + path for path in manifest.files]
    lines += [MANIFEST_DIR + path for path in manifest.dirs]
    return "\n".join(lines) + "\n\n"


# -- the unit file ---------------------------------------------------------

WATCHDOG_SEC = 30       # cares pings every 15 s; a loop stuck this long is killed and restarted
RESTART_SEC = 3         # short, but not a busy loop when the port is taken or the disk full
STOP_TIMEOUT_SEC = 15   # goodbye to the orchestrator plus the last log lines take about 1 s
ORCHESTRATOR_OPEN_FILES = 65536  # one socket per worker; services get a soft limit of 1024
USAGE_ERROR_EXIT = 2    # cares' exit code for bad options: restarting cannot fix those


def _check_unit_text(text: str, what: str) -> None:
    """Unit files are lines of UTF-8: a control character (a newline above all) in a value
    would end the setting and could start another one."""
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp"):
            raise ServiceError(f"{what} contains a control character: {text!r}", usage=True)


def exec_word(text: str) -> str:
    """One argument for ExecStart=, quoted by systemd's rules (systemd.syntax(7), not the shell's):
    "%" starts a specifier and "$" a variable even inside quotes, so they are doubled; a lone ";"
    would separate two commands; whitespace, quotes and backslashes need double quotes with
    C-style escapes."""
    _check_unit_text(text, "an argument")
    if text == ";":
        return "\\;"
    escaped = text.replace("%", "%%").replace("$", "$$")
    if text and not any(char.isspace() or char in "\"'\\" for char in text):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit_path(path: str) -> str:
    """An absolute path as the value of EnvironmentFile=, LoadCredential= and the like: those
    resolve "%" specifiers but take the rest of the line verbatim."""
    _check_unit_text(path, "a path")
    if not os.path.isabs(path):
        raise ServiceError(f"not an absolute path: {path}", usage=True)
    return path.replace("%", "%%")


def env_file_text(token: str) -> str:
    """CARES_TOKEN in EnvironmentFile= syntax: inside double quotes systemd, like a POSIX shell,
    takes a backslash before any of " \\ ` $ as that character (systemd.exec(5))."""
    _check_unit_text(token, "the token")
    quoted = re.sub(r'(["\\`$])', r"\\\1", token)
    return ("# The join token of this cares service, read by systemd when it starts the service.\n"
            f'CARES_TOKEN="{quoted}"\n')


# Credentials (systemd.exec(5)): systemd (root) reads the file at each start and hands the
# service a private read-only copy in $CREDENTIALS_DIRECTORY (%d), so the dynamic user can read
# a key that stays root-only on disk, wherever it lives (even in /root, hidden by ProtectHome=).
TLS_OPTIONS = {"--tls-ca": "tls-ca", "--tls-cert": "tls-cert", "--tls-key": "tls-key"}

# The sandbox, for system units. Each line says why; NOTES.md adds what was measured.
SYSTEM_SANDBOX = """\
# Sandbox (systemd.exec(5)); `systemd-analyze security cares-{role}.service` rates it.
# A user allocated at each start: no account to create or delete, no home, no privileges.
# Naming it "cares" lets a worker and an orchestrator on one host share it, and so their
# state and cache directories (two dynamic users would chown them back and forth).
# An old systemd without DynamicUser= fails on the missing user instead of running as root.
DynamicUser=yes
User=cares
# DynamicUser= implies these; they are spelled out to be read and reviewed.
NoNewPrivileges=yes
ProtectSystem=strict
RestrictSUIDSGID=yes
RemoveIPC=yes
PrivateTmp=yes
# cares reads no home directory: TLS files come in as credentials.
ProtectHome=yes
PrivateDevices=yes
PrivateIPC=yes
# Its own mount namespace (the options above make one anyway): mounts never leak to the host.
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
# Other users' processes disappear from /proc; the host-wide files psutil reads (/proc/stat,
# meminfo, loadavg, diskstats, net/dev, uptime) stay. ProcSubset=pid would hide those too.
ProtectProc=invisible
ProcSubset=all
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
# CPython, grpc's C core, protobuf's upb and psutil never map writable code (traced and run
# with the kernel's PR_SET_MDWE, see NOTES.md); a JIT would need this off.
MemoryDenyWriteExecute=yes
# gRPC over IPv4/IPv6; AF_UNIX for sd_notify and the journal; AF_NETLINK for the interface
# list (psutil.net_if_addrs) and for getaddrinfo.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# A call outside the list fails with EPERM (cares reports a one-line error) instead of killing.
SystemCallErrorNumber=EPERM
UMask=0077
"""

# User units: the options above that need a mount namespace (ProtectSystem=, ProtectHome=,
# PrivateTmp=, PrivateDevices=, ProtectKernel*=, ProtectProc=...) are silently ignored by a user
# manager up to systemd 252, and from 253 on they imply PrivateUsers=, whose user namespace
# many hosts restrict (the unit then fails to start). These rely on seccomp and prctl only,
# which an unprivileged user manager can apply everywhere.
# The user unit keeps exactly these lines of the system sandbox, so the two cannot drift apart.
USER_SANDBOX_OPTIONS = ("NoNewPrivileges", "RestrictSUIDSGID", "RestrictNamespaces", "RestrictRealtime",
                        "LockPersonality", "MemoryDenyWriteExecute", "RestrictAddressFamilies",
                        "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber", "UMask")
USER_SANDBOX = "# Sandbox (systemd.exec(5)): what an unprivileged user manager can enforce everywhere.\n" + "".join(
    line + "\n" for line in SYSTEM_SANDBOX.splitlines() if line.partition("=")[0] in USER_SANDBOX_OPTIONS)

DESCRIPTIONS = {"worker": "cares worker: streams this machine's metrics to an orchestrator",
                "orchestrator": "cares orchestrator: serves the workers of a cluster"}


def render_unit(role: str, exec_args: list[str], python: str, pyz: str, env_file: str | None, user: bool, *,
                tls_files: dict[str, str] | None = None, privileged_port: bool = False) -> str:
    """The text of cares-ROLE.service (without the manifest header).

    exec_args are cares' own arguments, starting with the role ("worker", "10.0.0.5:50051",
    "--headless", ...); never a token. tls_files maps --tls-ca/--tls-cert/--tls-key to files:
    a system unit loads them as credentials, a user unit passes the paths. privileged_port
    grants CAP_NET_BIND_SERVICE for a --listen port below 1024 (system units only)."""
    if role not in ROLES or not exec_args or exec_args[0] != role:
        raise ServiceError(f"exec_args must start with the role ({role})")
    if any(arg == "--token" or arg.startswith("--token=") for arg in exec_args):
        raise ServiceError("the token goes into the environment file, never onto the command line")
    for path in (python, pyz):
        unit_path(path)
    command = [python, pyz, *exec_args]
    credentials, credential_words = [], []
    for option, path in sorted((tls_files or {}).items()):
        if user:  # the user's own files, readable by the user's service as they are
            command += [option, path]
        else:
            credentials.append(f"LoadCredential={TLS_OPTIONS[option]}:{unit_path(path)}")
            credential_words.append(f"{option} %d/{TLS_OPTIONS[option]}")  # %d: $CREDENTIALS_DIRECTORY
    exec_start = " ".join([exec_word(arg) for arg in command] + credential_words)
    sections = [_unit_section(role, user), _service_section(role, exec_start, env_file, credentials),
                _sandbox_section(role, user, privileged_port), _install_section(user)]
    return "\n".join(sections)


def _unit_section(role: str, user: bool) -> str:
    lines = ["[Unit]", f"Description={DESCRIPTIONS[role]}"]
    if not user:  # a user manager cannot order itself after the system's targets
        lines += ["# Start once the network is up, so the first join or listen does not fail for nothing.",
                  "After=network-online.target", "Wants=network-online.target"]
    lines += ["# Never stop restarting: an orchestrator may be away for hours (RestartSec= paces the tries).",
              "StartLimitIntervalSec=0"]
    return "\n".join(lines) + "\n"


def _service_section(role: str, exec_start: str, env_file: str | None, credentials: list[str]) -> str:
    lines = ["[Service]",
             "# cares sends READY=1 once it serves (orchestrator) or streams (worker), STATUS= with its",
             "# connection state, WATCHDOG=1 from its event loop and STOPPING=1 when it shuts down.",
             "Type=notify", "NotifyAccess=main",
             f"ExecStart={exec_start}"]
    if env_file:
        lines += ["# CARES_TOKEN, from a file only its owner may read (0600), read by systemd: the token is",
                  "# never on a command line (ps, /proc/PID/cmdline) nor in this world-readable unit.",
                  f"EnvironmentFile={unit_path(env_file)}"]
    if credentials:
        lines += ["# TLS files: systemd (root) reads them at each start and hands the service a private copy",
                  "# in $CREDENTIALS_DIRECTORY (%d), so they may stay root-only, wherever they are.", *credentials]
    lines += ["# cares.pyz unpacks its C extensions here on first start (%C: /var/cache, or ~/.cache).",
              "CacheDirectory=cares", "Environment=CARES_CACHE_DIR=%C/cares",
              "# The worker's node secret and ID lock, the orchestrator's inventory ($STATE_DIRECTORY).",
              "StateDirectory=cares", "StateDirectoryMode=0700",
              "# If the watchdog fires (SIGABRT), Python prints every thread's stack to the journal first.",
              "Environment=PYTHONFAULTHANDLER=1",
              "Restart=always", f"RestartSec={RESTART_SEC}s",
              "# Exit code 2 is a usage error: restarting cannot fix it.",
              f"RestartPreventExitStatus={USAGE_ERROR_EXIT}",
              "# cares pings every WatchdogSec/2 from the event loop that does the work; a loop stuck",
              f"# for {WATCHDOG_SEC} s gets the process killed and restarted.",
              f"WatchdogSec={WATCHDOG_SEC}s", f"TimeoutStopSec={STOP_TIMEOUT_SEC}s"]
    if role == "orchestrator":
        lines += ["# One socket per worker: the default soft limit of 1024 would refuse joins past ~1000.",
                  f"LimitNOFILE={ORCHESTRATOR_OPEN_FILES}"]
    return "\n".join(lines) + "\n"


def _sandbox_section(role: str, user: bool, privileged_port: bool) -> str:
    if user:
        return USER_SANDBOX.format(role=role)
    if privileged_port:
        capabilities = ["# --listen uses a port below 1024: that one capability, nothing else.",
                        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "AmbientCapabilities=CAP_NET_BIND_SERVICE"]
    else:
        capabilities = ["# No capabilities at all.", "CapabilityBoundingSet=", "AmbientCapabilities="]
    return SYSTEM_SANDBOX.format(role=role) + "\n".join(capabilities) + "\n"


def _install_section(user: bool) -> str:
    return "[Install]\nWantedBy=" + ("default.target" if user else "multi-user.target") + "\n"


# -- what install-service checks first ---------------------------------------------------

TOKEN_FILE_LIMIT = 4096


def read_token_file(path: str, stdin=None) -> str:
    """The token in path ("-" for standard input), without its final newline."""
    try:
        if path == "-":
            data = (stdin or sys.stdin).read(TOKEN_FILE_LIMIT + 1)
        else:
            with open(path, encoding="utf-8", errors="strict") as file:
                data = file.read(TOKEN_FILE_LIMIT + 1)
    except OSError as error:
        raise ServiceError(f"cannot read token file {path}: {os_error_text(error)}") from None
    except UnicodeDecodeError:
        raise ServiceError(f"token file {path}: {TOKEN_RULE}", usage=True) from None
    token = data[:-1] if data.endswith("\n") else data
    token = token[:-1] if token.endswith("\r") else token
    if len(data) > TOKEN_FILE_LIMIT or not is_valid_token(token):
        raise ServiceError(f"token file {path}: {TOKEN_RULE}", usage=True)
    return token


def address_port(address: str) -> int | None:
    """The port of HOST:PORT or [V6]:PORT, None when it is not one."""
    try:
        return parse_address(address, allow_port_zero=True)[1]
    except ValueError:
        return None


def unprivileged_port_start(read=None) -> int:
    """The lowest port an unprivileged process may bind (net.ipv4.ip_unprivileged_port_start)."""
    try:
        with (read or open)("/proc/sys/net/ipv4/ip_unprivileged_port_start") as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return 1024


def worker_exec_args(target: str, node_id: str | None = None, labels=(),
                     detail_offer: DetailOffer = DetailOffer()) -> list[str]:
    args = ["worker", target, "--headless"]
    if node_id:
        args += ["--node-id", node_id]
    for label in labels:
        args += ["--label", label]
    if detail_offer.command_lines:
        args.append("--share-cmdlines")
    if not detail_offer.processes:
        args.append("--no-processes")
    return args


def orchestrator_exec_args(listen: str | None = None, metrics_listen: str | None = None) -> list[str]:
    args = ["orchestrator", "--headless"]
    if listen:
        args += ["--listen", listen]
    if metrics_listen:
        args += ["--metrics-listen", metrics_listen]
    return args


def running_pyz() -> str | None:
    """The cares.pyz this process runs from: `python3 cares.pyz` makes the zip's __main__ the
    main module, and its zipimport loader knows the archive. None when run as cares.py."""
    import zipfile
    loader = getattr(sys.modules.get("__main__"), "__loader__", None)
    archive = getattr(loader, "archive", None)
    return os.path.abspath(archive) if archive and zipfile.is_zipfile(archive) else None


def check_install_inputs(paths: ServicePaths, python: str, pyz_source: str | None,
                         tls_files: dict[str, str]) -> None:
    """Refuse, in one line, what would give a unit that cannot start."""
    import zipfile
    if not os.path.isabs(python) or not os.access(python, os.X_OK) or os.path.isdir(python):
        raise ServiceError(f"not an executable absolute path for the interpreter: {python}", usage=True)
    if not pyz_source:
        raise ServiceError("install-service copies the cares.pyz it runs from: run it as "
                           "`python3 cares.pyz install-service ...` (or pass --pyz FILE)", usage=True)
    if not zipfile.is_zipfile(pyz_source):
        raise ServiceError(f"not a cares.pyz (not a zip file): {pyz_source}", usage=True)
    if not paths.user and python.startswith(HOME_PREFIXES):
        raise ServiceError(f"a system service cannot run {python}: ProtectHome=yes hides home directories "
                           f"from it; pass --python with a system interpreter such as /usr/bin/python3",
                           usage=True)
    for option, path in tls_files.items():
        if not os.path.isabs(path) or not os.path.isfile(path):
            raise ServiceError(f"{option}: no such file (give an absolute path): {path}", usage=True)


# -- install and uninstall ------------------------------------------------


@dataclasses.dataclass
class ServiceReport:
    """What install/uninstall did: lines to print, and whether all went well (exit code 0)."""

    outcome: str  # "installed", "updated", "unchanged", "removed", "not installed"
    lines: list[str]
    ok: bool = True


def default_runner(argv: list[str]) -> tuple[int, str]:
    """Run a systemctl command; (exit code, its output). Bounded: a start waits for READY=1 at most
    TimeoutStartSec= (90 s by default), so 120 s is enough. FileNotFoundError if systemctl is missing."""
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    return done.returncode, (done.stdout + done.stderr).strip()


def systemd_running(root: str = "/") -> bool:
    """sd_booted(3): systemd is PID 1 when /run/systemd/system exists."""
    return root == "/" and os.path.isdir("/run/systemd/system")


def run_systemctl(commands: list[list[str]], runner, lines: list[str]) -> bool:
    """Run the commands in order, stopping at the first failure; report each in lines."""
    for argv in commands:
        try:
            code, output = runner(argv)
        except FileNotFoundError:
            lines.append(f"cannot run {argv[0]}: it is not installed (is this host running systemd?)")
            return False
        except (OSError, subprocess.SubprocessError) as error:
            lines.append(f"cannot run {' '.join(argv)}: {error}")
            return False
        lines.append(f"ran: {' '.join(argv)}" + ("" if code == 0 else f" (exit code {code})"))
        lines += ["  " + line for line in output.splitlines()[:10]]
        if code != 0:
            return False
    return True


def _ensure_dir(path: str, paths: ServicePaths, created: list[str]) -> None:
    """mkdir -p, remembering (as systemd sees them) the directories that did not exist."""
    missing = []
    parent = path
    while not os.path.isdir(paths.on_disk(parent)):
        if parent == os.path.dirname(parent):  # even / is missing: a --root that does not exist
            raise ServiceError(f"no such directory: {paths.on_disk(parent)}")
        missing.append(parent)
        parent = os.path.dirname(parent)
    for directory in reversed(missing):
        mode = 0o700 if paths.user else 0o755
        try:
            os.mkdir(paths.on_disk(directory), mode)
            os.chmod(paths.on_disk(directory), mode)  # mkdir's mode is masked by the umask: a root
            # umask of 077 would hide cares.pyz from the service's dynamic user
        except FileExistsError:
            continue
        except OSError as error:
            raise ServiceError(f"cannot create {directory}: {os_error_text(error)}") from None
        created.append(directory)


def _write_atomically(target: str, shown: str, mode: int, data: bytes | None = None, source: str | None = None) -> bool:
    """Put data (or a copy of the file source) at target with that mode, all or nothing
    (replace_file). False when target already held exactly that with that mode (nothing written)."""
    if _already(target, mode, data, source):
        return False

    def write(file):
        if source is None:
            file.write(data)
        else:
            import shutil
            with open(source, "rb") as original:
                shutil.copyfileobj(original, file, 1 << 20)
    try:
        replace_file(target, write, mode)
    except OSError as error:
        raise ServiceError(f"cannot write {shown}: {os_error_text(error)}") from None
    return True


def _already(target: str, mode: int, data: bytes | None, source: str | None) -> bool:
    try:
        if stat.S_IMODE(os.stat(target).st_mode) != mode:
            return False
        if source is not None:
            import filecmp
            return os.path.samefile(source, target) or filecmp.cmp(source, target, shallow=False)
        with open(target, "rb") as file:
            return file.read(len(data) + 1) == data
    except OSError:
        return False


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read()
    except OSError:
        return None


def _other_manifests(paths: ServicePaths, role: str) -> list[Manifest]:
    """The manifests of the other cares units in the same unit directory (they share cares.pyz)."""
    found = []
    for other in ROLES:
        text = _read_text(paths.on_disk(paths.unit_file(other))) if other != role else None
        if text is not None:
            found.append(read_manifest(text, paths, other))
    return found


def install_service(role: str, exec_args: list[str], *, paths: ServicePaths, pyz_source: str | None,
                    python: str, token: str | None = None, tls_files: dict[str, str] | None = None,
                    privileged_port: bool = False, now: bool = False, runner=None) -> ServiceReport:
    """Write (or update in place) cares-ROLE.service, the copy of cares.pyz it runs and, with a
    token, the 0600 environment file; then print, or with now=True run, the systemctl line.

    A second install rewrites only what changed and says "updated" or "unchanged". Without a
    token it keeps the token file an earlier install wrote (uninstall first to drop it)."""
    tls_files = dict(tls_files or {})
    check_install_inputs(paths, python, pyz_source, tls_files)
    unit_file, env_file = paths.unit_file(role), paths.env_file(role)
    old_text = _read_text(paths.on_disk(unit_file))
    if old_text is not None and not written_by_install(old_text, role):
        raise ServiceError(f"{unit_file} exists and was not written by install-service; "
                           "move it away first", usage=True)
    old = read_manifest(old_text, paths, role) if old_text is not None else Manifest()
    keep_env = token is None and env_file in old.files and os.path.exists(paths.on_disk(env_file))
    uses_env = token is not None or keep_env

    created: list[str] = []
    for directory in [paths.unit_dir, os.path.dirname(paths.pyz)] + ([paths.config_dir] if uses_env else []):
        _ensure_dir(directory, paths, created)
    written = {}
    written[paths.pyz] = _write_atomically(paths.on_disk(paths.pyz), paths.pyz, 0o644, source=pyz_source)
    if token is not None:
        written[env_file] = _write_atomically(paths.on_disk(env_file), env_file, 0o600,
                                              data=env_file_text(token).encode("utf-8"))
    manifest = Manifest(files=[paths.pyz] + ([env_file] if uses_env else []),
                        dirs=_owned_dirs(paths, role, old, created))
    unit = manifest_header(role, manifest) + render_unit(role, exec_args, python, paths.pyz,
                                                         env_file if uses_env else None, paths.user,
                                                         tls_files=tls_files, privileged_port=privileged_port)
    written[unit_file] = _write_atomically(paths.on_disk(unit_file), unit_file, 0o644, data=unit.encode("utf-8"))

    outcome = "installed" if old_text is None else ("updated" if any(written.values()) else "unchanged")
    lines = [f"{outcome} {paths.unit_name(role)} ({'user' if paths.user else 'system'} unit):"]
    lines.append(f"  {unit_file}  {'written' if written[unit_file] else 'unchanged'} (the unit, 0644)")
    lines.append(f"  {paths.pyz}  {'written' if written[paths.pyz] else 'unchanged'} (copy of {pyz_source})")
    if token is not None:
        lines.append(f"  {env_file}  {'written' if written[env_file] else 'unchanged'} (CARES_TOKEN, 0600)")
    elif keep_env:
        lines.append(f"  {env_file}  kept (the token of the earlier install)")
    else:
        lines.append(f"note: no token (--token-file or $CARES_TOKEN): this {role} "
                     + ("joins an open cluster" if role == "worker" else "serves an open cluster"))
    return _finish_install(role, outcome, lines, paths, now, runner)


def _owned_dirs(paths: ServicePaths, role: str, old: Manifest, created: list[str]) -> list[str]:
    """Directories this unit's manifest lists: those it created now or before, and those another
    cares unit created that this one now uses too (whichever unit is removed last removes them)."""
    mine = set(owned_dir_candidates(paths, role))
    dirs = set(created) | set(old.dirs)
    for other in _other_manifests(paths, role):
        dirs |= set(other.dirs) & mine
    return sorted(d for d in dirs if os.path.isdir(paths.on_disk(d)))


def _finish_install(role: str, outcome: str, lines: list[str], paths: ServicePaths, now: bool, runner) -> ServiceReport:
    unit = paths.unit_name(role)
    reload = paths.systemctl("daemon-reload")
    if outcome == "updated":
        commands = [reload, paths.systemctl("enable", unit), paths.systemctl("restart", unit)]
    else:
        commands = [reload, paths.systemctl("enable", "--now", unit)]
    if paths.user:
        lines.append(f"a user service stops when you log out unless lingering is on: "
                     f"loginctl enable-linger {user_name()}")
    if not now:
        when = "whenever you log in" if paths.user else "at every boot"
        lines.append(f"to start it now and {when}, run:" if outcome != "updated"
                     else "to restart it with the new settings, run:")
        lines.append("  " + " && ".join(" ".join(argv) for argv in commands))
        return ServiceReport(outcome, lines)
    if runner is None:
        lines.append(f"not running systemctl: the unit was written below {paths.root}" if paths.root != "/"
                     else "not running systemctl: no runner given")
        return ServiceReport(outcome, lines, ok=False)
    return ServiceReport(outcome, lines, ok=run_systemctl(commands, runner, lines))


def uninstall_service(role: str, *, paths: ServicePaths, runner=None, booted: bool = False,
                      stop: bool = True) -> ServiceReport:
    """Stop and disable cares-ROLE.service (when systemd runs and stop is True), then remove exactly what
    install wrote: the unit, its token file, cares.pyz unless the other role's unit still runs
    it, and the directories install created once they are empty. State and cache stay."""
    unit_name, unit_file = paths.unit_name(role), paths.unit_file(role)
    text = _read_text(paths.on_disk(unit_file))
    if text is None:
        return ServiceReport("not installed", [f"{unit_name} is not installed (no {unit_file}); nothing removed"])
    if not written_by_install(text, role):
        raise ServiceError(f"{unit_file} was not written by install-service; not touching it", usage=True)
    manifest = read_manifest(text, paths, role)
    lines, ok = [], True
    if booted and runner is not None and stop:
        # Stop and disable first: once the file is gone, `systemctl disable` no longer finds it.
        if not run_systemctl([paths.systemctl("disable", "--now", unit_name)], runner, lines):
            lines.append(f"{unit_name} could not be stopped and disabled; nothing removed "
                         "(--no-stop removes the files anyway)")
            return ServiceReport("not removed", lines, ok=False)
    elif not stop:
        lines.append(f"not stopping {unit_name} (--no-stop)")
    else:
        lines.append("systemd is not running here: nothing to stop")
    shared = {path for other in _other_manifests(paths, role) for path in other.files}
    for path in [p for p in manifest.files if p not in shared] + [unit_file]:
        ok = _remove(path, paths, lines) and ok
    _remove_enable_links(paths, unit_name, unit_file, lines)
    for directory in sorted(manifest.dirs, key=len, reverse=True):
        try:
            os.rmdir(paths.on_disk(directory))
            lines.append(f"removed {directory}/")
        except OSError:
            pass  # not empty (someone else's files, or the other role's): it stays
    if booted and runner is not None:
        ok = run_systemctl([paths.systemctl("daemon-reload")], runner, lines) and ok
    state = "~/.config/cares (or ~/.local/state/cares) and ~/.cache/cares" if paths.user \
        else "/var/lib/cares and /var/cache/cares"
    lines.append(f"kept: the state and cache in {state} (remove them by hand if no longer wanted)")
    return ServiceReport("removed", lines, ok)


def _remove(path: str, paths: ServicePaths, lines: list[str]) -> bool:
    try:
        os.unlink(paths.on_disk(path))
    except FileNotFoundError:
        return True
    except OSError as error:
        lines.append(f"cannot remove {path}: {os_error_text(error)}")
        return False
    lines.append(f"removed {path}")
    return True


def _remove_enable_links(paths: ServicePaths, unit_name: str, unit_file: str, lines: list[str]) -> None:
    """`systemctl enable` linked the unit into a .wants/ directory; when systemctl could not
    disable it (systemd not running), drop the links that point at the unit we removed."""
    try:
        wants_dirs = [d for d in os.listdir(paths.on_disk(paths.unit_dir)) if d.endswith(".wants")]
    except OSError:
        return
    for wants in wants_dirs:
        link = os.path.join(paths.unit_dir, wants, unit_name)
        try:
            if os.readlink(paths.on_disk(link)) == unit_file:
                os.unlink(paths.on_disk(link))
                lines.append(f"removed {link} (left by systemctl enable)")
        except OSError:
            continue


# ---------------------------------------------------------------------------
# 9. The command line and main().
#    Holds: argument types, build_parser, the config builders, run_* for each
#    command, the status printers (table, --check, --top, --history) and main's
#    one-line errors. Talks to every section above; none talks to it.
# ---------------------------------------------------------------------------

class UsageError(Exception):
    """Bad command-line input; exit code 2."""


class RuntimeFailure(Exception):
    """The command could not do its job; exit code 1."""


def _argument(parse, what: str = ""):
    """An argparse type from a parser that raises ValueError; what names the value in errors."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            prefix = f"bad {what} '{sanitize_text(text, 60)}': " if what else ""
            raise argparse.ArgumentTypeError(f"{prefix}{error}") from None
    return convert


def _node_id(text: str) -> str:
    if not is_valid_node_id(text):
        raise ValueError(NODE_ID_RULE)
    return text


def _number(convert, low, high):
    """convert the text (int or float) and require low <= value <= high (NaN fails)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise ValueError(f"'{sanitize_text(text, 20)}' is not a number") from None
        if not low <= value <= high:
            raise ValueError(f"must be {low}-{high}")
        return value
    return parse


def _command(text: str) -> list[str]:
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise ValueError(f"cannot split the command: {error}") from None
    if not words:
        raise ValueError("the command is empty")
    return words


def _label_text(text: str) -> str:
    parse_label(text)
    return text


def _history_range(text: str) -> HistoryRange:
    spans = [span for span in HistoryRange if span is not HistoryRange.LIVE]
    for span in spans:
        if text.strip().lower() == span.value:
            return span
    raise ValueError(f"a history range is one of {', '.join(span.value for span in spans)}")


def _listen_address(text: str) -> str:
    return format_address(*parse_address(text, allow_port_zero=True))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cares",
        description="Turn a handful of machines into a cluster and watch it live in the terminal. "
                    "Without a command, a menu lets you pick a role.")
    parser.add_argument("--version", action="version", version=f"cares {VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    orchestrator = commands.add_parser("orchestrator", help="create a cluster: serve workers, show the dashboard")
    orchestrator.add_argument("--listen", type=_argument(_listen_address, "listen address"),
                              default=DEFAULT_LISTEN, metavar="HOST:PORT",
                              help=f"address to listen on (default {DEFAULT_LISTEN}, all interfaces)")
    orchestrator.add_argument("--heartbeat-ms", type=_argument(_number(int, MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS)),
                              default=DEFAULT_HEARTBEAT_MS, metavar="MS",
                              help=f"heartbeat interval asked of workers (default {DEFAULT_HEARTBEAT_MS})")
    orchestrator.add_argument("--max-nodes", type=_argument(_number(int, 1, 1_000_000)), default=DEFAULT_MAX_NODES,
                              metavar="N", help=f"refuse joins beyond N nodes (default {DEFAULT_MAX_NODES})")
    orchestrator.add_argument("--forget-after", type=_argument(parse_duration), default=DEFAULT_FORGET_AFTER_S,
                              metavar="DURATION",
                              help="forget nodes gone (Disconnected) this long, e.g. 90s, 30m, 24h, 7d; 0 never "
                                   f"(default {format_duration(DEFAULT_FORGET_AFTER_S)})")
    orchestrator.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate (chain)")
    orchestrator.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    orchestrator.add_argument("--metrics-listen", type=_argument(_listen_address, "metrics address"),
                              metavar="HOST:PORT",
                              help="serve Prometheus' /metrics and HTTP service discovery (/sd) there; off by "
                                   "default. With a token they need Authorization: Bearer TOKEN; with "
                                   "--tls-cert they are HTTPS")
    orchestrator.add_argument("--metrics-open", action="store_true",
                              help="serve /metrics and /sd without the token (a trusted network only)")
    orchestrator.add_argument("--on-event", type=_argument(_command), metavar="CMD",
                              help="run CMD (split like a shell would, but no shell) for every node event "
                                   "(joined, rejoined, left, lost, threshold, recovered, missing) with CARES_EVENT, "
                                   "CARES_NODE_ID, CARES_HOSTNAME, CARES_ADDRESS, CARES_CPU_PERCENT, "
                                   "CARES_MEMORY_PERCENT and CARES_MESSAGE in its environment")
    orchestrator.add_argument("--history-days", type=_argument(_number(int, 0, 3650)), default=DEFAULT_HISTORY_DAYS,
                              metavar="N",
                              help=f"keep N days of downsampled history per node in an SQLite file in the state "
                                   f"directory (default {DEFAULT_HISTORY_DAYS}; 0 none; --no-state keeps none)")
    orchestrator.add_argument("--alert", type=_argument(parse_alert), action="append", default=[], metavar="RULE",
                              help="raise a threshold event when a node stays beyond a limit, e.g. cpu>90:60s, "
                                   "memory>95:30s, disk>90:5m, load>8:2m (repeatable)")

    worker = commands.add_parser("worker", help="join a cluster and stream this machine's metrics")
    worker.add_argument("orchestrator_address", type=_argument(parse_target, "address"), metavar="HOST:PORT",
                        help="the orchestrator, e.g. 10.0.0.5:50051, [fd00::5]:50051 or dns:///orch:50051")
    worker.add_argument("--node-id", type=_argument(_node_id), metavar="ID",
                        help="this worker's ID (default: the short host name and a hash of this machine's "
                             "identity, the same at every start)")
    worker.add_argument("--label", type=_argument(parse_label), action="append", default=[], metavar="KEY=VALUE",
                        help="a label shown with this node and usable in the filter (repeatable, at most 16)")
    worker.add_argument("--share-cmdlines", action="store_true",
                        help="show its processes' command lines in the orchestrator's detail view and "
                             "`status NODE --top` (they can hold secrets: off by default, names only)")
    worker.add_argument("--no-processes", action="store_true",
                        help="never share its process list (mounts, interfaces, sensors and containers still are)")

    status = commands.add_parser("status", help="print an orchestrator's node table, or one node's detail")
    status.add_argument("orchestrator_address", type=_argument(parse_target, "address"), metavar="HOST:PORT")
    status.add_argument("node_id", nargs="?", type=_argument(_node_id), metavar="NODE",
                        help="with --top: the node to show")
    status.add_argument("--top", action="store_true",
                        help="NODE's top processes, mounts, interfaces, sensors and containers, asked of its "
                             "worker now (it takes up to three heartbeat intervals)")
    status.add_argument("--history", type=_argument(_history_range), metavar="RANGE",
                        help="NODE's history over 1h, 24h, 7d or 30d: average and maximum per bucket, and its events")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--timeout", type=_argument(_number(float, 0.1, 3600.0)), default=None, metavar="SECONDS",
                        help=f"give up after this long (default 5; with --top {DETAIL_REPLY_WAIT_S + 5:g})")
    status.add_argument("--check", action="store_true",
                        help="one line and an exit code for Nagios, Icinga, cron or Uptime Kuma: "
                             "0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN")
    status.add_argument("--min-active", type=_argument(_number(int, 0, 10_000_000)), default=1, metavar="N",
                        help="with --check: CRITICAL below N active nodes (default 1)")
    status.add_argument("--max-lost", type=_argument(_number(int, 0, 10_000_000)), default=0, metavar="N",
                        help="with --check: CRITICAL above N lost nodes, WARNING up to it (default 0)")

    for command, keeps in ((orchestrator, "the nodes it knows, so a restart remembers them"),
                           (worker, "its node secret and ID lock")):
        command.add_argument("--state-dir", default=None, metavar="DIR",
                             help=f"where it keeps {keeps} (default $STATE_DIRECTORY, "
                                  f"$XDG_STATE_HOME/cares or ~/.local/state/cares)")
        command.add_argument("--no-state", action="store_true", help="keep nothing on disk")
    for command in (orchestrator, worker):
        command.add_argument("--headless", action="store_true",
                             help="no screen: one log line per event on stderr "
                                  "(automatic when stdout is not a terminal)")
        command.add_argument("--log-format", choices=[style.value for style in (LogStyle.TEXT, LogStyle.JSON)],
                             default=LogStyle.TEXT.value,
                             help="headless log lines as text (with journald priorities under systemd) or JSON")
    for command in (orchestrator, worker, status):
        command.add_argument("--token", default=os.environ.get("CARES_TOKEN") or None, metavar="SECRET",
                             help="shared join token (default: $CARES_TOKEN); without one the cluster is open")
    for command in (worker, status):
        command.add_argument("--tls-ca", metavar="FILE",
                             help="connect with TLS, trusting the orchestrator certificate signed by this PEM CA")
    add_service_commands(commands)
    return parser


def add_service_commands(commands) -> None:
    """Add install-service and uninstall-service to the subparsers of build_parser(); the
    addresses, node ID and labels are checked by the run commands' own argument types."""
    install = commands.add_parser("install-service", help="run cares as a systemd service (a system unit as "
                                                          "root, a user unit with --user)")
    roles = install.add_subparsers(dest="service_role", metavar="ROLE", required=True)
    worker = roles.add_parser("worker", help="install cares-worker.service")
    worker.add_argument("orchestrator_address", type=_argument(parse_target, "address"), metavar="HOST:PORT")
    worker.add_argument("--node-id", type=_argument(_node_id), metavar="ID",
                        help="default: this host's stable ID (see `cares worker --help`)")
    worker.add_argument("--label", type=_argument(_label_text), action="append", default=[], metavar="KEY=VALUE")
    worker.add_argument("--share-cmdlines", action="store_true", help="see `cares worker --help`")
    worker.add_argument("--no-processes", action="store_true", help="see `cares worker --help`")
    worker.add_argument("--tls-ca", metavar="FILE")
    orchestrator = roles.add_parser("orchestrator", help="install cares-orchestrator.service")
    orchestrator.add_argument("--listen", type=_argument(_listen_address, "listen address"), metavar="HOST:PORT")
    orchestrator.add_argument("--metrics-listen", type=_argument(_listen_address, "metrics address"),
                              metavar="HOST:PORT")
    orchestrator.add_argument("--tls-cert", metavar="FILE")
    orchestrator.add_argument("--tls-key", metavar="FILE")
    for parser in (worker, orchestrator):
        parser.add_argument("--token-file", metavar="FILE",
                            help="read the join token from FILE ('-': standard input; default $CARES_TOKEN); "
                                 "it goes into a 0600 environment file, never onto a command line")
        parser.add_argument("--user", action="store_true",
                            help="a user unit in ~/.config/systemd/user instead of a system unit")
        parser.add_argument("--now", action="store_true", help="also run systemctl to enable and (re)start it")
        parser.add_argument("--python", metavar="PATH", default=sys.executable,
                            help="the interpreter the unit runs (default: this one, %(default)s)")
        parser.add_argument("--pyz", metavar="FILE", help="the cares.pyz to install (default: the one running)")
    uninstall = commands.add_parser("uninstall-service", help="stop and remove what install-service wrote")
    uninstall.add_argument("service_role", choices=ROLES, metavar="ROLE", help="worker or orchestrator")
    uninstall.add_argument("--user", action="store_true", help="the user unit rather than the system unit")
    uninstall.add_argument("--no-stop", action="store_true",
                           help="remove the files without asking systemd to stop and disable the service first")


def run_service_command(args, environ=None, runner=default_runner, paths: ServicePaths | None = None) -> int:
    """install-service / uninstall-service; prints the report. ServiceError for bad input."""
    environ = os.environ if environ is None else environ
    if paths is None:
        paths = ServicePaths.for_user(environ=environ) if args.user else ServicePaths.system()
        if not args.user and os.geteuid() != 0:
            raise ServiceError(f"{args.command} needs root for a system unit (or pass --user)", usage=True)
    booted = systemd_running(paths.root)
    if args.command == "uninstall-service":
        report = uninstall_service(args.service_role, paths=paths, runner=runner, booted=booted,
                                   stop=not args.no_stop)
    else:
        report = _install_from_args(args, environ, paths, runner)
    print("\n".join(report.lines))
    return 0 if report.ok else 1


def _install_from_args(args, environ, paths: ServicePaths, runner) -> ServiceReport:
    if args.token_file:
        token = read_token_file(args.token_file)
    else:
        token = environ.get("CARES_TOKEN") or None
        if token is not None and not is_valid_token(token):
            raise ServiceError(f"bad token in $CARES_TOKEN: {TOKEN_RULE}", usage=True)
    if args.service_role == "worker":
        exec_args = worker_exec_args(args.orchestrator_address, args.node_id, args.label,
                                     DetailOffer(processes=not args.no_processes, command_lines=args.share_cmdlines))
        tls_files = {"--tls-ca": args.tls_ca} if args.tls_ca else {}
        ports = []
    else:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise ServiceError("--tls-cert and --tls-key go together", usage=True)
        exec_args = orchestrator_exec_args(args.listen, args.metrics_listen)
        tls_files = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key} if args.tls_cert else {}
        ports = [address_port(a) for a in (args.listen or "[::]:50051", args.metrics_listen) if a]
    tls_files = {option: os.path.abspath(path) for option, path in tls_files.items()}
    low = [port for port in ports if port is not None and port < unprivileged_port_start()]
    if low and paths.user:
        raise ServiceError(f"a user service cannot listen on port {low[0]} (below 1024); "
                           "install a system service as root instead", usage=True)
    return install_service(args.service_role, exec_args, paths=paths, pyz_source=args.pyz or running_pyz(),
                           python=args.python, token=token, tls_files=tls_files, privileged_port=bool(low),
                           now=args.now, runner=runner if paths.root == "/" else None)


def load_tls(args) -> dict:
    """Read the TLS files named on the command line, checking them early so mistakes get a clear line."""
    paths = {name: getattr(args, name, None) for name in ("tls_cert", "tls_key", "tls_ca")}
    if bool(paths["tls_cert"]) != bool(paths["tls_key"]):
        raise UsageError("--tls-cert and --tls-key go together")
    loaded = {}
    for name, path in paths.items():
        if path:
            try:
                with open(path, "rb") as file:
                    loaded[name] = file.read()
            except OSError as error:
                raise RuntimeFailure(f"cannot read {path}: {error.strerror or error}") from None
    try:
        if paths["tls_cert"]:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(paths["tls_cert"], paths["tls_key"])
        if paths["tls_ca"]:
            ssl.create_default_context(cafile=paths["tls_ca"])
    except (ssl.SSLError, ValueError) as error:
        raise RuntimeFailure(f"unusable TLS files: {sanitize_text(str(error), 200)}") from None
    return loaded


def is_interactive(args) -> bool:
    return not getattr(args, "headless", False) and sys.stdin.isatty() and sys.stdout.isatty()


def log_style(args) -> LogStyle:
    if args.log_format == LogStyle.JSON.value:
        return LogStyle.JSON
    return LogStyle.JOURNALD if under_journald() else LogStyle.TEXT


def check_terminal() -> None:
    """RuntimeFailure, in one line, when this terminal cannot show the TUI."""
    term = os.environ.get("TERM", "")
    if term in ("", "dumb", "unknown"):
        raise RuntimeFailure(f"this terminal (TERM={term or 'unset'}) cannot show the dashboard; "
                             f"run with --headless, or set TERM (e.g. TERM=xterm-256color)")


def state_dir(args) -> str | None:
    return None if args.no_state else (args.state_dir or default_state_dir())


def orchestrator_config(args) -> OrchestratorConfig:
    tls = load_tls(args)
    return OrchestratorConfig(listen=args.listen, token=args.token, tls_cert=tls.get("tls_cert"),
                              tls_key=tls.get("tls_key"), heartbeat_ms=args.heartbeat_ms, max_nodes=args.max_nodes,
                              forget_after_s=args.forget_after or None, state_dir=state_dir(args),
                              on_event=args.on_event, alerts=tuple(args.alert), metrics_listen=args.metrics_listen,
                              metrics_open=args.metrics_open,
                              tls_files=(args.tls_cert, args.tls_key) if args.tls_cert else None,
                              history_days=args.history_days)


def worker_config(args) -> WorkerConfig:
    return WorkerConfig(target=args.orchestrator_address, token=args.token, tls_ca=load_tls(args).get("tls_ca"),
                        node_id=args.node_id, labels=dict(args.label), state_dir=state_dir(args),
                        detail_offer=DetailOffer(processes=not args.no_processes, command_lines=args.share_cmdlines))


def run_orchestrator(args) -> int:
    config = orchestrator_config(args)
    if not is_interactive(args):
        return serve_headless(config.create(), log_style(args))
    check_terminal()
    app = TuiApp(config)
    return app.run(start=lambda: app.start_orchestrator(config))


def run_worker(args) -> int:
    config = worker_config(args)
    if len(config.labels) > MAX_LABELS:
        raise UsageError(LABEL_RULE)
    if not is_interactive(args):
        return serve_worker_headless(config.create(LocalSampler()), log_style(args))
    check_terminal()
    app = TuiApp(worker_config=config)
    return app.run(start=lambda: app.start_worker(config))


def format_status_table(rows: list[dict], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"{'NODE ID':<24} {'HOST':<24} {'STATUS':<13} {'CPU':>6} {'MEMORY':>7}  LAST SEEN"]
    for row in rows:
        seen = "-" if row["last_seen"] is None else format_age(now - row["last_seen"])
        lines.append(f"{fit(row['node_id'], 24)} {fit(row['hostname'] or row['address'], 24)} {row['status']:<13} "
                     f"{format_percent(row['cpu_percent'], False):>6} "
                     f"{format_percent(row['memory_percent'], False):>7}  {seen}")
    if not rows:
        lines.append("(no workers have joined)")
    return "\n".join(lines)


class CheckResult(enum.IntEnum):
    """Nagios plugin exit codes."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3


def check_status(rows: list[dict], min_active: int, max_lost: int) -> tuple[CheckResult, str]:
    """`status --check`: the result and its one line, with performance data after the '|'."""
    statuses = [(NodeStatus.of_row(0, row["status"]), row.get("left")) for row in rows]

    def count(wanted: NodeStatus, left=None):
        return sum(status is wanted and (left is None or gone_on_purpose == left) for status, gone_on_purpose in statuses)
    active, joining, missing = count(NodeStatus.ACTIVE), count(NodeStatus.JOINING), count(NodeStatus.MISSING)
    lost, left = count(NodeStatus.DISCONNECTED, left=False), count(NodeStatus.DISCONNECTED, left=True)
    alerting = sum(bool(row.get("alerts")) for row in rows)
    if active < min_active or lost > max_lost:
        result = CheckResult.CRITICAL
    elif lost or missing or alerting:
        result = CheckResult.WARNING
    else:
        result = CheckResult.OK
    summary = f"{active} active, {lost} lost, {missing} missing" + (f", {alerting} alerting" if alerting else "")
    return result, (f"CARES {result.name} - {summary} | active={active} lost={lost} missing={missing} "
                    f"joining={joining} left={left} alerting={alerting}")


def run_status(args) -> int:
    if args.top or args.history or args.node_id:
        if not args.node_id or args.top == bool(args.history) or args.check:
            raise UsageError("one node is `status HOST:PORT NODE --top [--json]` or "
                             "`status HOST:PORT NODE --history 1h|24h|7d|30d [--json]` (not with --check)")
        return run_status_top(args) if args.top else run_status_history(args)
    try:
        rows = fetch_status(args.orchestrator_address, token=args.token, tls_ca=load_tls(args).get("tls_ca"),
                            timeout=args.timeout or 5.0)
    except (grpc.RpcError, RuntimeFailure) as error:
        reason = describe_rpc_error(error) if isinstance(error, grpc.RpcError) else str(error)
        if args.check:
            print(f"CARES UNKNOWN - cannot get status from {args.orchestrator_address}: {reason}")
            return CheckResult.UNKNOWN
        raise RuntimeFailure(f"cannot get status from {args.orchestrator_address}: {reason}") from None
    if args.check:
        result, line = check_status(rows, args.min_active, args.max_lost)
        print(line)
        return result
    if args.json:
        print(json.dumps({"nodes": rows}, indent=2))
    else:
        print(format_status_table(rows))
    return 0


def run_status_top(args) -> int:
    """`status HOST:PORT NODE --top [--json]`: one node's processes, disks, interfaces, sensors and
    containers, asked of its worker now."""
    reply = ask_about_node(args, "detail", "cannot fetch a node's detail", fetch_node_detail,
                           timeout=args.timeout or DETAIL_REPLY_WAIT_S + 5)
    row, now = reply.row, time.time()
    status = NodeStatus.of_row(0, row["status"]) or NodeStatus.DISCONNECTED
    notice = detail_notice(row["version"], reply.offer, status, reply.detail, reply.detail_at or 0.0, now)
    if args.json:
        print(json.dumps({"node": row, "shares": None if reply.offer is None else {
            "processes": reply.offer.processes, "command_lines": reply.offer.command_lines},
            "detail_at": reply.detail_at, "notice": notice,
            "detail": detail_json(reply.detail) if reply.detail is not None else None}, indent=2))
    else:
        print(format_detail_text(row, reply.detail, notice))
    return 0 if reply.detail is not None else 1


def ask_about_node(args, what: str, older: str, fetch, *extra, timeout: float):
    """fetch(address, node, *extra) for `status NODE --top/--history`; its gRPC error as one line."""
    try:
        return fetch(args.orchestrator_address, args.node_id, *extra, token=args.token,
                     tls_ca=load_tls(args).get("tls_ca"), timeout=timeout)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise RuntimeFailure(f"the orchestrator at {args.orchestrator_address} is older than cares 0.4 and "
                                 f"{older}") from None
        raise RuntimeFailure(f"cannot get {args.node_id}'s {what} from {args.orchestrator_address}: "
                             f"{describe_rpc_error(error)}") from None


def run_status_history(args) -> int:
    history = ask_about_node(args, "history", "keeps no history", fetch_node_history, args.history,
                             timeout=args.timeout or 10.0)
    if args.json:
        print(json.dumps(history, indent=2))
    else:
        print(format_history_text(history))
    return 0 if history["kept"] else 1


def format_history_text(history: dict) -> str:
    if not history["kept"]:
        return (f"The orchestrator keeps no history (it runs with --history-days 0 or --no-state); "
                f"node {history['node_id']} has only its live 60 s.")
    columns = (("cpu_percent", "CPU %"), ("memory_percent", "MEM %"), ("load_average_1m", "LOAD"),
               ("root_fs_used_percent", "DISK %"), ("net_receive_bytes_per_s", "NET IN/s"),
               ("net_transmit_bytes_per_s", "NET OUT/s"))
    lines = [f"Node {history['node_id']}: {history['range']} in {history['bucket_s'] // 60} min buckets "
             f"(average / maximum), {len(history['buckets'])} with samples; a missing time is a gap",
             f"{'BUCKET START':<17} {'SAMPLES':>7}  " + "  ".join(f"{title:>15}" for _, title in columns)]

    def pair(bucket, name):
        values = bucket.get(name)
        if not values or values["avg"] is None:
            return f"{'-':>15}"
        if name.endswith("_per_s"):
            return f"{format_rate(values['avg'], ASCII_GLYPHS):>7}/{format_rate(values['max'], ASCII_GLYPHS):<7}"
        return f"{values['avg']:>7.1f}/{values['max']:<7.1f}"
    for bucket in history["buckets"]:
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(bucket["start"]))
        lines.append(f"{stamp:<17} {bucket['samples']:>7}  " + "  ".join(pair(bucket, name) for name, _ in columns))
    if history["events"]:
        lines += ["", "Events"]
        lines += [f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(event['at'] or 0))}  {event['text']}"
                  for event in history["events"]]
    return "\n".join(lines)


def format_detail_text(row: dict, detail, notice: str) -> str:
    glyphs = ASCII_GLYPHS if not (sys.stdout.encoding or "").lower().startswith("utf") else UNICODE_GLYPHS
    lines = [f"Node {row['node_id']}  {row['status']}  {row['hostname']}", notice]
    if detail is None:
        return "\n".join(lines)
    if detail.processes:
        lines += ["", f"Processes (the top {TOP_PROCESSES} by CPU, by memory and by I/O; by CPU here)", PROCESS_HEADER]
        lines += [process_line(process, glyphs) for process in prepare_processes(
            detail, DetailState(), len(detail.processes)).rows]
    for section in (DetailSection.DISKS_NETWORK, DetailSection.CONTAINERS_SENSORS):
        lines.append("")
        lines += [text for text, _ in detail_section_lines(detail, section, glyphs)]
    return "\n".join(lines)


def ensure_standard_streams() -> None:
    """Give a process started with stdin, stdout or stderr closed (2>&-) /dev/null in their place:
    otherwise the next socket gRPC opens takes descriptor 2, and log lines would go into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(2, "w", errors="backslashreplace", closefd=False)
    if sys.stdout is None:
        sys.stdout = open(1, "w", errors="backslashreplace", closefd=False)


def say_error(text: str) -> None:
    """One line on stderr, if stderr can take it: a closed or full log must not turn an error into a crash."""
    try:
        os.write(2, f"cares: {text}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    ensure_standard_streams()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "token", None) is not None and not is_valid_token(args.token):
            raise UsageError(f"bad token (from --token or $CARES_TOKEN): {TOKEN_RULE}")
        if args.command is None:
            if not is_interactive(args):
                parser.print_usage(sys.stderr)
                raise UsageError("choose a command (orchestrator, worker or status), or run me in a terminal")
            check_terminal()
            return TuiApp().run()
        if args.command == "status":
            return run_status(args)
        if args.command in ("install-service", "uninstall-service"):
            return run_service_command(args)
        if args.command == "orchestrator":
            return run_orchestrator(args)
        return run_worker(args)
    except SystemExit as exit_request:  # argparse's own usage errors, --help and --version
        return exit_request.code if isinstance(exit_request.code, int) else 2
    except UsageError as error:
        say_error(str(error))
        return 2
    except ServiceError as error:
        say_error(str(error))
        return 2 if error.usage else 1
    except (RuntimeFailure, StartError) as error:
        say_error(str(error))
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `cares status | head`: the reader is gone. Point stdout at /dev/null so the interpreter's
        # own flush at exit does not complain about it either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        return 0
    except Exception as error:  # last resort: a bug must still not greet the user with a traceback
        if os.environ.get("CARES_DEBUG"):
            raise
        say_error(f"unexpected error: {sanitize_text(f'{type(error).__name__}: {error}', 300)} "
                  "(set CARES_DEBUG=1 for details)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
