#!/usr/bin/env python3
"""cares: turn a handful of machines into a cluster and watch it live in the terminal.

One module, read top to bottom as the data flows:

1. text safety and formatting helpers (pure functions),
2. local metrics sampling (what Phase 01 showed),
3. Node and NodeRegistry (the orchestrator's state),
4. the orchestrator: gRPC servicers on a grpc.aio server,
5. the worker client and the status client,
6. the TUI: asciimatics scenes for the menu, join form and dashboards,
7. the command line and main().
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
import errno
import hmac
import ipaddress
import json
import math
import os
import platform
import random
import re
import secrets
import signal
import socket
import ssl
import sys
import threading
import time
import unicodedata

# gRPC's C core logs to stderr, which would both leak internals to users and
# scribble over a full-screen UI. Users can still ask for it with GRPC_VERBOSITY.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
import psutil  # noqa: E402
from asciimatics.effects import Effect  # noqa: E402
from asciimatics.event import KeyboardEvent  # noqa: E402
from asciimatics.exceptions import NextScene, ResizeScreenError, StopApplication  # noqa: E402
from asciimatics.scene import Scene  # noqa: E402
from asciimatics.screen import Screen  # noqa: E402
from asciimatics.widgets import Frame, Label, Layout, Text, Widget  # noqa: E402

import cluster_pb2 as pb  # noqa: E402
import cluster_pb2_grpc as pb_grpc  # noqa: E402

VERSION = "0.2.0"

DEFAULT_PORT = 50051
DEFAULT_LISTEN = f"[::]:{DEFAULT_PORT}"
DEFAULT_HEARTBEAT_MS = 1000
MIN_HEARTBEAT_MS = 100
MAX_HEARTBEAT_MS = 60_000
# A node is lost after this many heartbeat intervals without a sample.
MISSED_HEARTBEATS = 3
HISTORY_SAMPLES = 60
DEFAULT_MAX_NODES = 10_000
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

ACTIVE = "Active"
DISCONNECTED = "Disconnected"

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
# ---------------------------------------------------------------------------

NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,63}")
NODE_ID_RULE = "node ID must be 1-63 characters of A-Z a-z 0-9 . _ -"
_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
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


def default_node_id(hostname: str | None = None) -> str:
    """Short host name plus a random suffix, so two workers on one host never clash."""
    short = (hostname if hostname is not None else socket.gethostname()).split(".")[0]
    short = re.sub(r"[^A-Za-z0-9._-]", "-", short)[:56].strip("-.") or "node"
    return f"{short}-{secrets.token_hex(3)}"


def parse_address(text: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split HOST:PORT, [IPv6]:PORT or hostname:PORT into (host, port); ValueError says what is wrong."""
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
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"'{sanitize_text(host, 60)}' is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("missing :PORT, e.g. 127.0.0.1:50051")
        if ":" in host:
            raise ValueError("put IPv6 addresses in brackets, e.g. [::1]:50051")
        if not host:
            raise ValueError("missing host before ':'")
        if not _is_host_name_or_ipv4(host):
            raise ValueError(f"'{sanitize_text(host, 60)}' is not a valid host name or IPv4 address")
    if not port_text.isascii() or not port_text.isdigit():
        raise ValueError(f"port '{sanitize_text(port_text, 20)}' is not a number")
    port = int(port_text)
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise ValueError(f"port must be {lowest}-65535")
    return host, port


def _is_host_name_or_ipv4(host: str) -> bool:
    if not host.isascii() or len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_to_address(peer: str) -> str:
    """gRPC peers look like 'ipv4:10.0.0.5:4242' or 'ipv6:[::1]:4242'; show them as HOST:PORT."""
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            return sanitize_text(peer[len(prefix):], 64)
    return sanitize_text(peer, 64)


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


def add_to_history(history: collections.deque, last_at: float, value: float, now: float, period: float) -> float:
    """Add value to a bounded history that keeps one point per period: a value arriving sooner
    replaces the newest point, so a sender faster than asked cannot flood it. Returns the time
    the newest point was started (pass it back next time)."""
    if history and now - last_at < 0.9 * period:
        history[-1] = value
        return last_at
    history.append(value)
    return now


def clamp_heartbeat_ms(milliseconds: int) -> int:
    """A heartbeat interval from the network or a user, held to MIN-MAX ms; 0 (unset) is the default."""
    return min(max(int(milliseconds or DEFAULT_HEARTBEAT_MS), MIN_HEARTBEAT_MS), MAX_HEARTBEAT_MS)


def is_valid_percent(value: float) -> bool:
    return math.isfinite(value) and 0.0 <= value <= 100.0


def clamp_percent(value: float) -> float:
    """Any number to 0-100 for drawing; NaN draws as 0."""
    if math.isnan(value):
        return 0.0
    return min(max(value, 0.0), 100.0)


_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar_text(percent: float, width: int, unicode: bool = True) -> str:
    """A width-cell bar: eighth-block resolution in Unicode, '|' like htop in ASCII."""
    if width <= 0:
        return ""
    filled = clamp_percent(percent) / 100.0 * width
    if not unicode:
        cells = int(filled + 0.5)
        return "|" * cells + " " * (width - cells)
    full = int(filled)
    eighths = int((filled - full) * 8 + 0.5)
    if eighths == 8:
        full, eighths = full + 1, 0
    text = "█" * full
    if full < width and eighths:
        text += _EIGHTHS[eighths]
    return text.ljust(width)


def bar_level(percent: float) -> str:
    """'low', 'medium' or 'high', the colour band of a load bar."""
    percent = clamp_percent(percent)
    if percent < 60.0:
        return "low"
    if percent < 85.0:
        return "medium"
    return "high"


_SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values, width: int, unicode: bool = True) -> str:
    """The last width values (0-100) as a one-line chart, right-aligned."""
    if width <= 0:
        return ""
    ticks = _SPARKS if unicode else "_.-=#"
    recent = list(values)[-width:]
    chars = [ticks[max(round(clamp_percent(v) / 100.0 * len(ticks)) - 1, 0)] for v in recent]
    return "".join(chars).rjust(width)


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


def format_bytes(count: float) -> str:
    if abs(count) < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024.0
        if abs(count) < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024.0:.1f} TiB"


def char_width(char: str) -> int:
    """Terminal cells a character takes: 2 for East Asian wide, 0 for combining marks."""
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    return sum(char_width(char) for char in text)


def fit(text: str, width: int) -> str:
    """Pad or cut text to exactly width terminal cells, marking a cut with '…'."""
    if width <= 0:
        return ""
    cells = display_width(text)
    if cells <= width:
        return text + " " * (width - cells)
    kept, used = [], 0
    for char in text:
        if used + char_width(char) > width - 1:
            break
        kept.append(char)
        used += char_width(char)
    return "".join(kept) + "…" + " " * (width - 1 - used)


# ---------------------------------------------------------------------------
# 2. Local metrics sampling: the Phase 01 logic, shared by the worker's screen
#    and its heartbeat stream.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LocalSample:
    cpu_percent: float
    memory_percent: float
    memory_used_bytes: int
    memory_total_bytes: int


# psutil counts CPU time in 10 ms ticks: a CPU reading needs a window several ticks long.
MIN_CPU_WINDOW_S = 0.09


class LocalSampler:
    """Thread-safe psutil sampling.

    psutil.cpu_percent(interval=None) reports use since its previous call, so the
    screen and the heartbeat share one sampler; a sample younger than max_age is
    reused rather than measured over a uselessly short window.
    """

    def __init__(self, max_age: float = MIN_CPU_WINDOW_S):
        self._max_age = max_age
        self._lock = threading.Lock()
        self._last: LocalSample | None = None
        self._last_at = 0.0
        # Fixed for the life of the process: read once, for the join and the worker view.
        self.cpu_count = psutil.cpu_count() or 0
        self.memory_total_bytes = psutil.virtual_memory().total
        psutil.cpu_percent(interval=None)
        self._primed_at = time.monotonic()

    def warmup_left(self) -> float:
        """Seconds until the first CPU reading covers a meaningful window; wait this before sending one."""
        return max(self._primed_at + MIN_CPU_WINDOW_S - time.monotonic(), 0.0)

    def sample(self) -> LocalSample:
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last_at < self._max_age:
                return self._last
            memory = psutil.virtual_memory()
            # "Used" as total minus available, so used/total agrees with the percent.
            used = memory.total - memory.available
            self._last = LocalSample(
                cpu_percent=clamp_percent(psutil.cpu_percent(interval=None)),
                memory_percent=clamp_percent(memory.percent),
                memory_used_bytes=max(used, 0),
                memory_total_bytes=memory.total,
            )
            self._last_at = time.monotonic()
            return self._last


def local_node_info(node_id: str, sampler: LocalSampler) -> pb.NodeInfo:
    return pb.NodeInfo(
        node_id=node_id,
        hostname=socket.gethostname()[:HOSTNAME_LIMIT],
        cpu_count=sampler.cpu_count,
        memory_total_bytes=sampler.memory_total_bytes,
        platform=f"{platform.system()}-{platform.release()}-{platform.machine()}"[:PLATFORM_LIMIT],
        cares_version=VERSION,
    )


# ---------------------------------------------------------------------------
# 3. Node and NodeRegistry: the orchestrator's state, behind one lock: the gRPC
#    loop applies heartbeats while the UI thread takes snapshots and edits.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Event:
    at: float  # wall clock, Unix seconds
    level: str  # INFO or WARN
    text: str


class EventLog:
    """A bounded, thread-safe list of events; listeners (headless output) run outside the lock."""

    def __init__(self, size: int = EVENT_LOG_SIZE):
        self._lock = threading.Lock()
        self._events: collections.deque[Event] = collections.deque(maxlen=size)
        self._listeners: list = []

    def add(self, level: str, text: str) -> Event:
        event = Event(time.time(), level, text)
        with self._lock:
            self._events.append(event)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)
        return event

    def subscribe(self, listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def tail(self, count: int) -> list[Event]:
        with self._lock:
            if count <= 0:
                return []
            return list(self._events)[-count:]


def format_event(event: Event, clock: str = "%H:%M:%S") -> str:
    return f"{time.strftime(clock, time.localtime(event.at))} [{event.level}] {event.text}"


@dataclasses.dataclass
class Node:
    """One worker as the orchestrator knows it."""

    node_id: str
    address: str
    status: str = ACTIVE
    last_seen: float = 0.0  # wall clock of the last heartbeat, Unix seconds
    cpu_usage: float = 0.0
    memory_usage: float = 0.0
    hostname: str = ""
    joined_at: float = 0.0  # wall clock of the first join, Unix seconds
    # CPU percent, one point per heartbeat interval, for the sparkline. Plain floats:
    # a tuple per sample made the garbage collector stall the loop at 10,000 nodes.
    cpu_history: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=HISTORY_SAMPLES))
    # Liveness and session bookkeeping; never shown.
    session_id: str = dataclasses.field(default="", repr=False)
    heard_at: float = dataclasses.field(default=0.0, repr=False)  # monotonic
    history_at: float = dataclasses.field(default=0.0, repr=False)  # monotonic
    last_sequence: int = dataclasses.field(default=0, repr=False)
    streaming: bool = dataclasses.field(default=False, repr=False)
    dropped_samples: int = dataclasses.field(default=0, repr=False)

    def copy(self, with_history: bool = True) -> "Node":
        """A detached, read-only copy for another thread; its history is a tuple, or empty
        without with_history. Copied attribute by attribute rather than with
        dataclasses.replace: snapshots hold the registry lock that every heartbeat
        needs, and 10,000 nodes took 43 ms that way (now 11 ms without history)."""
        clone = object.__new__(Node)
        clone.__dict__.update(self.__dict__)
        clone.cpu_history = tuple(self.cpu_history) if with_history else ()
        return clone


class JoinRefused(Exception):
    """A join the registry will not take; code is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class NodeRegistry:
    """Every worker that joined, keyed by node ID, behind one lock."""

    def __init__(self, *, max_nodes: int = DEFAULT_MAX_NODES,
                 heartbeat_interval: float = DEFAULT_HEARTBEAT_MS / 1000.0):
        self._lock = threading.Lock()
        self._nodes: dict[str, Node] = {}
        self.max_nodes = max_nodes
        self.heartbeat_interval = heartbeat_interval
        self.events = EventLog()

    @property
    def silence_limit(self) -> float:
        return MISSED_HEARTBEATS * self.heartbeat_interval

    def join(self, node_id: str, address: str, hostname: str = "") -> str:
        """Add or revive a node and return its new session ID; raise JoinRefused otherwise."""
        now, wall = time.monotonic(), time.time()
        session_id = secrets.token_hex(16)
        with self._lock:
            node = self._nodes.get(node_id)
            if node is not None and node.streaming:
                refusal = JoinRefused(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"node ID '{node_id}' is already connected; pick another with --node-id")
            elif node is None and len(self._nodes) >= self.max_nodes and not self._evict_one_locked():
                refusal = JoinRefused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the cluster is full ({self.max_nodes} nodes)")
            else:
                refusal = None
                revived = node is not None
                if node is None:
                    node = Node(node_id=node_id, address=address, joined_at=wall)
                    self._nodes[node_id] = node
                node.address = address
                node.hostname = hostname
                node.status = ACTIVE
                node.session_id = session_id
                node.last_sequence = 0
                node.heard_at = now
                node.last_seen = wall
                node.dropped_samples = 0
        if refusal is not None:
            self.events.add("WARN", f"Node '{node_id}' from {address} rejected: {refusal.message}.")
            raise refusal
        verb = "has rejoined the cluster" if revived else "has joined the cluster"
        self.events.add("INFO", f"Node '{node_id}' {verb}.")
        return session_id

    def _evict_one_locked(self) -> bool:
        """Make room by forgetting the node that has been disconnected longest."""
        gone = [node for node in self._nodes.values() if node.status == DISCONNECTED]
        if not gone:
            return False
        oldest = min(gone, key=lambda node: node.heard_at)
        del self._nodes[oldest.node_id]
        return True

    def attach_stream(self, node_id: str, session_id: str) -> grpc.StatusCode | None:
        """Bind a heartbeat stream to a joined session; None when accepted, else the refusal code."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or not session_id or not hmac.compare_digest(node.session_id, session_id):
                return grpc.StatusCode.PERMISSION_DENIED
            if node.streaming or node.status != ACTIVE:
                return grpc.StatusCode.FAILED_PRECONDITION
            node.streaming = True
            node.heard_at = time.monotonic()
            return None

    def update(self, node_id: str, session_id: str, *, cpu_percent: float, memory_percent: float,
               sequence: int) -> bool:
        """Apply one heartbeat sample. False when the session is no longer current (end the stream)."""
        now = time.monotonic()
        problem = None
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or node.session_id != session_id or node.status != ACTIVE:
                return False
            node.heard_at = now
            node.last_seen = time.time()
            if not (is_valid_percent(cpu_percent) and is_valid_percent(memory_percent)):
                problem = "CPU or memory outside 0-100 %"
            elif sequence <= node.last_sequence:
                problem = "sequence number went back"
            if problem is not None:
                node.dropped_samples += 1
                dropped = node.dropped_samples
            else:
                node.last_sequence = sequence
                node.cpu_usage = cpu_percent
                node.memory_usage = memory_percent
                node.history_at = add_to_history(node.cpu_history, node.history_at, cpu_percent, now,
                                                 self.heartbeat_interval)
        if problem is not None and _is_power_of_ten(dropped):
            self.events.add("WARN", f"Node '{node_id}' sent a bad sample ({problem}); "
                                    f"{dropped} dropped so far.")
        return True

    def disconnect(self, node_id: str, session_id: str, reason: str, *, left: bool = False) -> bool:
        """Mark a session's node Disconnected; False when that session is no longer current."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or node.session_id != session_id:
                return False
            node.streaming = False
            if node.status != ACTIVE:
                return False
            node.status = DISCONNECTED
        if left:
            self.events.add("INFO", f"Node '{node_id}' has left the cluster.")
        else:
            self.events.add("WARN", f"Node '{node_id}' lost: {reason}.")
        return True

    def expire(self) -> list[tuple[str, str]]:
        """Mark nodes silent for longer than the silence limit Disconnected; return their (node_id, session_id)."""
        cutoff = time.monotonic() - self.silence_limit
        with self._lock:
            silent = [node for node in self._nodes.values()
                      if node.status == ACTIVE and node.heard_at < cutoff]
            for node in silent:
                node.status = DISCONNECTED
            expired = [(node.node_id, node.session_id) for node in silent]
        for node_id, _ in expired:
            self.events.add("WARN", f"Node '{node_id}' lost: no heartbeat for {self.silence_limit:.1f} s.")
        return expired

    def remove_disconnected(self) -> int:
        with self._lock:
            gone = [node_id for node_id, node in self._nodes.items() if node.status == DISCONNECTED]
            for node_id in gone:
                del self._nodes[node_id]
        if gone:
            self.events.add("INFO", f"Removed {len(gone)} disconnected node(s) from the table.")
        return len(gone)

    def snapshot(self, with_history: bool = True) -> list[Node]:
        """Copies of every node, safe to read on another thread."""
        with self._lock:
            return [node.copy(with_history) for node in self._nodes.values()]

    def cpu_histories(self, node_ids) -> dict[str, tuple]:
        """The CPU history of just these nodes (the rows a screen shows)."""
        with self._lock:
            return {node_id: tuple(self._nodes[node_id].cpu_history)
                    for node_id in node_ids if node_id in self._nodes}

    def get(self, node_id: str) -> Node | None:
        with self._lock:
            node = self._nodes.get(node_id)
            return node.copy() if node is not None else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._nodes)


def _is_power_of_ten(count: int) -> bool:
    while count >= 10 and count % 10 == 0:
        count //= 10
    return count == 1


# ---------------------------------------------------------------------------
# 4. The orchestrator: gRPC servicers on a grpc.aio server that runs on a
#    background thread's event loop, so a UI can own the main thread.
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
            threading.Thread(target=_grpc_loop.run_forever, name="cares-grpc", daemon=True).start()
        return _grpc_loop


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


def _token_matches(context, expected: str | None) -> bool:
    return not expected or hmac.compare_digest(_metadata_value(context, TOKEN_METADATA_KEY).encode(),
                                               expected.encode())


SHUTDOWN_NOTICE = pb.OrchestratorCommand(
    shutdown=pb.ShutdownNotice(reason="the orchestrator is shutting down"))


@dataclasses.dataclass
class _Stream:
    session_id: str
    task: asyncio.Task
    context: object
    # Why the orchestrator cancelled the handler: "expired" or "shutdown".
    ending: str = ""


class ClusterServicer(pb_grpc.ClusterServiceServicer):
    """JoinCluster and Heartbeat, writing everything they learn into the registry."""

    def __init__(self, registry: NodeRegistry, token: str | None = None):
        self.registry = registry
        self._token = token
        self._streams: dict[str, _Stream] = {}
        # Set while the orchestrator shuts down: streams it ends then are not lost workers.
        self.closing = False

    async def JoinCluster(self, request, context):
        address = peer_to_address(context.peer())
        if not _token_matches(context, self._token):
            self.registry.events.add("WARN", f"Join from {address} rejected: missing or wrong token.")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong join token")
        if not is_valid_node_id(request.node_id):
            self.registry.events.add(
                "WARN", f"Join from {address} rejected: invalid node ID "
                        f"'{sanitize_text(request.node_id, 40)}'.")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, NODE_ID_RULE)
        try:
            session_id = self.registry.join(request.node_id, address,
                                            sanitize_text(request.hostname, HOSTNAME_LIMIT))
        except JoinRefused as refusal:
            await context.abort(refusal.code, refusal.message)
        return pb.Acknowledgement(
            accepted=True,
            message=f"welcome, {request.node_id}",
            session_id=session_id,
            heartbeat_interval_ms=round(self.registry.heartbeat_interval * 1000))

    async def Heartbeat(self, request_iterator, context):
        node_id = _metadata_value(context, NODE_METADATA_KEY)
        session_id = _metadata_value(context, SESSION_METADATA_KEY)
        refusal = self.registry.attach_stream(node_id, session_id)
        if refusal == grpc.StatusCode.PERMISSION_DENIED:
            await context.abort(refusal, f"no joined session for this node; call JoinCluster first and open "
                                         f"the stream with {NODE_METADATA_KEY} and {SESSION_METADATA_KEY} metadata")
        elif refusal is not None:
            await context.abort(refusal, "this node already has a heartbeat stream")
        # From here a silent stream is the liveness sweep's to end, like any silent node.
        stream = _Stream(session_id, asyncio.current_task(), context)
        self._streams[node_id] = stream
        ending, left = "its heartbeat stream ended", False
        try:
            message = await context.read()
            while message is not grpc.aio.EOF:
                if message.node_id != node_id or message.session_id != session_id:
                    ending = "it sent metrics for another node"
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                        "metrics must be for the node that joined")
                if message.leaving:
                    left = True
                    return
                if not self.registry.update(
                        node_id, session_id,
                        cpu_percent=message.cpu_percent,
                        memory_percent=message.memory_percent,
                        sequence=message.sequence):
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        "this session has ended; join again")
                message = await context.read()
        except asyncio.CancelledError:
            if stream.ending == "expired":
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"no heartbeat for {self.registry.silence_limit:.1f} s")
            if stream.ending != "shutdown":
                raise
            # Written by the handler itself, so the notice goes out before the end of the stream.
            await context.write(SHUTDOWN_NOTICE)
        finally:
            if self._streams.get(node_id) is stream:
                del self._streams[node_id]
            if not self.closing:
                self.registry.disconnect(node_id, session_id, ending, left=left)

    def end_expired_streams(self, expired: list[tuple[str, str]]) -> None:
        for node_id, session_id in expired:
            stream = self._streams.get(node_id)
            if stream is not None and stream.session_id == session_id:
                stream.ending = "expired"
                stream.task.cancel()

    async def say_shutdown(self, timeout: float) -> None:
        """End every stream with a shutdown notice, so workers retry quietly instead of reporting a failure."""
        self.closing = True
        tasks = []
        for stream in self._streams.values():
            stream.ending = "shutdown"
            stream.task.cancel()
            tasks.append(stream.task)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    async def broadcast(self, command: pb.OrchestratorCommand, timeout: float = 1.0) -> None:
        """Send a command on every open stream. A stream that is ending or does not take it in
        time is skipped: its own handler deals with its end, and no error is left unretrieved."""
        writes = [stream.context.write(command) for stream in self._streams.values()]
        if writes:
            try:
                await asyncio.wait_for(asyncio.gather(*writes, return_exceptions=True), timeout)
            except asyncio.TimeoutError:
                pass


class StatusServicer(pb_grpc.StatusServiceServicer):
    """The read-only node table behind `cares status`."""

    def __init__(self, registry: NodeRegistry, token: str | None = None):
        self.registry = registry
        self._token = token

    async def ListNodes(self, request, context):
        if not _token_matches(context, self._token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
        return pb.NodeList(nodes=[
            pb.NodeStatus(node_id=node.node_id, address=node.address, status=node.status,
                          cpu_percent=node.cpu_usage, memory_percent=node.memory_usage,
                          last_seen_unix_s=node.last_seen, hostname=node.hostname,
                          joined_at_unix_s=node.joined_at)
            for node in sorted(self.registry.snapshot(with_history=False), key=lambda node: node.node_id)])


class StartError(Exception):
    """The orchestrator could not start; the message is one line for the user."""


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


class Orchestrator:
    """The gRPC server, its registry and the liveness sweep, running on the gRPC loop."""

    def __init__(self, listen: str = DEFAULT_LISTEN, *, token: str | None = None, tls_cert: bytes | None = None,
                 tls_key: bytes | None = None, heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
                 max_nodes: int = DEFAULT_MAX_NODES):
        self.listen_host, port = parse_address(listen, allow_port_zero=True)
        # The interval last asked of workers; the registry's follows once they were told.
        self.heartbeat_ms = clamp_heartbeat_ms(heartbeat_ms)
        self.registry = NodeRegistry(max_nodes=max_nodes, heartbeat_interval=self.heartbeat_ms / 1000.0)
        self.token = token
        self.tls = (tls_key, tls_cert) if tls_cert else None
        self.port = port
        self.servicer = ClusterServicer(self.registry, token)
        self._status = StatusServicer(self.registry, token)
        self._server = None
        self._sweeper = None
        self._interval_lock: asyncio.Lock | None = None
        self.join_hosts: list[str] = []

    @property
    def address(self) -> str:
        return format_address(self.listen_host, self.port)

    def start(self) -> None:
        """Listen and serve on a background thread; StartError if the address cannot be used."""
        if not run_on_grpc_loop(self._start(), timeout=10):
            # Asked here, not on the event loop: finding out why may mean a DNS lookup.
            raise StartError(explain_bind_failure(self.listen_host, self.port))
        self.join_hosts = join_addresses(self.listen_host, self.port, psutil.net_if_addrs())
        self.registry.events.add("INFO", f"Orchestrator listening on {self.address}.")

    async def _start(self) -> bool:
        """Bind and serve; False when the address cannot be bound."""
        server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_ClusterServiceServicer_to_server(self.servicer, server)
        pb_grpc.add_StatusServiceServicer_to_server(self._status, server)
        address = format_address(self.listen_host, self.port)
        try:
            if self.tls:
                credentials = grpc.ssl_server_credentials([self.tls])
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if not port:
            await server.stop(None)
            return False
        self.port = port
        await server.start()
        self._server = server
        self._interval_lock = asyncio.Lock()
        self._sweeper = asyncio.ensure_future(self._sweep_forever())
        return True

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.registry.heartbeat_interval / 2)
            self.servicer.end_expired_streams(self.registry.expire())

    def set_heartbeat_interval(self, milliseconds: int) -> concurrent.futures.Future:
        """Ask every worker to heartbeat at a new interval. Returns at once (the UI thread calls
        this); the future completes when every stream was told."""
        self.heartbeat_ms = clamp_heartbeat_ms(milliseconds)
        return asyncio.run_coroutine_threadsafe(self._change_interval(self.heartbeat_ms), grpc_loop())

    async def _change_interval(self, milliseconds: int) -> None:
        async with self._interval_lock:  # one change at a time, so commands reach workers in order
            seconds = milliseconds / 1000.0
            self.registry.heartbeat_interval = max(self.registry.heartbeat_interval, seconds)
            await self.servicer.broadcast(pb.OrchestratorCommand(set_heartbeat_interval_ms=milliseconds))
            # Shorten the silence limit only after workers were told, so none is lost for obeying late.
            self.registry.heartbeat_interval = seconds
        self.registry.events.add("INFO", f"Heartbeat interval set to {seconds:.2f} s.")

    def stop(self, grace: float = 1.0) -> None:
        """Tell every worker we are shutting down, then stop serving."""
        if self._server is None:
            return
        try:
            run_on_grpc_loop(self._stop(grace), timeout=grace + 5)
        except Exception as error:  # the process is exiting either way; say why it was not clean
            self.registry.events.add("WARN", f"Unclean shutdown: {error!r}")
        self._server = None
        self.registry.events.add("INFO", "Orchestrator stopped.")

    async def _stop(self, grace: float) -> None:
        self._sweeper.cancel()
        await self.servicer.say_shutdown(timeout=grace / 2)
        await self._server.stop(grace / 2)


# ---------------------------------------------------------------------------
# 5. The worker client (join, then stream metrics; reconnect forever) and the
#    status client.
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
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "the orchestrator rejected the join token"
    first_line = details.splitlines()[0] if details else ""
    name = code.name if code is not None else "error"
    return sanitize_text(f"{name}: {first_line}" if first_line else name, ERROR_TEXT_LIMIT)


@dataclasses.dataclass(frozen=True)
class ConnectionState:
    phase: str  # "connecting", "connected", "retrying" or "stopped"
    detail: str = ""  # while retrying, the last error
    retry_at: float = 0.0  # monotonic time of the next attempt while retrying
    heartbeat_interval: float = DEFAULT_HEARTBEAT_MS / 1000.0

    def describe(self, now: float | None = None) -> str:
        """One line for a status bar, e.g. 'retrying in 3 s: orchestrator unreachable (connection refused)'."""
        if self.phase == "retrying":
            wait = max(self.retry_at - (time.monotonic() if now is None else now), 0.0)
            text = f"retrying in {math.ceil(wait)} s"
            return f"{text}: {self.detail}" if self.detail else text
        if self.phase == "connected":
            return f"connected, heartbeat every {self.heartbeat_interval:.1f} s"
        return self.phase


class OrchestratorShutdown(Exception):
    pass


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


class WorkerClient:
    """Joins an orchestrator and streams this machine's metrics to it, reconnecting forever."""

    def __init__(self, target: str, node_id: str, sampler: LocalSampler, *, token: str | None = None,
                 tls_ca: bytes | None = None):
        self.target = target
        self.node_id = node_id
        self.sampler = sampler
        self.events = EventLog()
        self._metadata = token_metadata(token)
        self._tls_ca = tls_ca
        self._state = ConnectionState("connecting")
        self._state_lock = threading.Lock()
        self._main_task = None
        self._call = None
        self._sender = None
        self._session_id = ""
        self._sequence = 0
        self._interval = DEFAULT_HEARTBEAT_MS / 1000.0
        self._interval_changed: asyncio.Event | None = None
        self._last_error = ""
        self._stopping = False

    @property
    def state(self) -> ConnectionState:
        with self._state_lock:
            return self._state

    def _set_state(self, phase: str, detail: str = "", retry_at: float = 0.0) -> None:
        with self._state_lock:
            self._state = ConnectionState(phase, detail, retry_at, self._interval)

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
            self.events.add("WARN", f"Could not say goodbye: {error!r}")
        self._main_task = None
        self._set_state("stopped")

    async def _leave(self, goodbye: bool) -> None:
        self._stopping = True
        call, sender = self._call, self._sender
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        if goodbye and call is not None and self.state.phase == "connected":
            try:
                await asyncio.wait_for(self._say_goodbye(call), 1.0)
            except (asyncio.TimeoutError, grpc.RpcError):
                pass
            else:
                self.events.add("INFO", "Left the cluster.")
        self._main_task.cancel()
        await asyncio.gather(self._main_task, return_exceptions=True)

    def _next_metrics(self, **fields) -> pb.NodeMetrics:
        """The next message of this session's stream: identity, sequence number and send time filled in."""
        self._sequence += 1
        return pb.NodeMetrics(node_id=self.node_id, session_id=self._session_id, sequence=self._sequence,
                              sent_at_ms=int(time.time() * 1000), **fields)

    async def _say_goodbye(self, call) -> None:
        await call.write(self._next_metrics(leaving=True))
        await call.done_writing()
        await call.code()

    async def _run(self) -> None:
        failures = 0
        while True:
            self._set_state("connecting")
            delay, level = None, "WARN"
            try:
                await self._connect_and_stream()
                detail = "the orchestrator closed the stream"
            except OrchestratorShutdown as shutdown:
                detail = str(shutdown) or "the orchestrator is shutting down"
                failures, delay, level = 0, backoff_delay(0), "INFO"
            except grpc.RpcError as error:
                detail = describe_rpc_error(error)
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    delay = REJECTED_TOKEN_BACKOFF_S
            except Exception as error:  # keep the worker alive whatever the network did
                detail = sanitize_text(f"unexpected {type(error).__name__}: {error}", ERROR_TEXT_LIMIT)
            if self._stopping:
                return
            was_connected = bool(self._session_id) and self.state.phase == "connected"
            if was_connected:
                failures = 0
            self._session_id = ""
            if delay is None:
                delay = backoff_delay(failures)
                failures += 1
            if detail != self._last_error:
                self.events.add(level, f"{'Disconnected' if was_connected else 'Cannot join'}: {detail}; "
                                       f"retrying.")
                self._last_error = detail
            self._set_state("retrying", detail, time.monotonic() + delay)
            await asyncio.sleep(delay)

    async def _connect_and_stream(self) -> None:
        async with _channel_for(self.target, self._tls_ca, WORKER_OPTIONS) as channel:
            stub = pb_grpc.ClusterServiceStub(channel)
            ack = await stub.JoinCluster(local_node_info(self.node_id, self.sampler), metadata=self._metadata,
                                         timeout=5.0)
            self._session_id = ack.session_id
            self._sequence = 0
            self._interval = clamp_heartbeat_ms(ack.heartbeat_interval_ms) / 1000.0
            self._interval_changed = asyncio.Event()
            call = stub.Heartbeat(metadata=((NODE_METADATA_KEY, self.node_id),
                                            (SESSION_METADATA_KEY, self._session_id)))
            self._call = call
            self._sender = asyncio.ensure_future(self._send_metrics(call))
            self._set_state("connected")
            self._last_error = ""
            self.events.add("INFO", f"Joined {self.target} as '{self.node_id}' "
                                    f"(heartbeat every {self._interval:.1f} s).")
            try:
                await self._obey_commands(call)
            finally:
                self._sender.cancel()
                self._sender = None
                self._call = None

    async def _obey_commands(self, call) -> None:
        while True:
            command = await call.read()
            if command is grpc.aio.EOF:
                return
            kind = command.WhichOneof("command")
            if kind == "set_heartbeat_interval_ms":
                self._interval = clamp_heartbeat_ms(command.set_heartbeat_interval_ms) / 1000.0
                self._set_state("connected")
                self._interval_changed.set()
                self.events.add("INFO", f"Heartbeat interval is now {self._interval:.1f} s.")
            elif kind == "shutdown":
                raise OrchestratorShutdown(sanitize_text(command.shutdown.reason, ERROR_TEXT_LIMIT))

    async def _send_metrics(self, call) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.sampler.warmup_left())
        next_at = loop.time()
        while True:
            sample = self.sampler.sample()
            await call.write(self._next_metrics(
                cpu_percent=sample.cpu_percent, memory_percent=sample.memory_percent,
                memory_used_bytes=sample.memory_used_bytes, memory_total_bytes=sample.memory_total_bytes))
            next_at = max(next_at + self._interval, loop.time())
            try:
                # A new interval takes effect at once, with a fresh sample.
                await asyncio.wait_for(self._interval_changed.wait(), next_at - loop.time())
                self._interval_changed.clear()
                next_at = loop.time()
            except asyncio.TimeoutError:
                pass


def fetch_status(target: str, *, token: str | None = None, tls_ca: bytes | None = None,
                 timeout: float = 5.0) -> list[dict]:
    """The orchestrator's node table as plain dicts (the `status --json` rows)."""

    async def call():
        async with _channel_for(target, tls_ca, WORKER_OPTIONS) as channel:
            return await pb_grpc.StatusServiceStub(channel).ListNodes(
                pb.ListNodesRequest(), metadata=token_metadata(token), timeout=timeout)

    reply = run_on_grpc_loop(call(), timeout=timeout + 5)
    # What an orchestrator sends is untrusted too: no terminal controls, no NaN (invalid JSON).
    return [{"node_id": sanitize_text(node.node_id, 63), "address": sanitize_text(node.address, 64),
             "status": sanitize_text(node.status, 12), "cpu_percent": _finite_or_none(node.cpu_percent, 1),
             "memory_percent": _finite_or_none(node.memory_percent, 1),
             "last_seen": _finite_or_none(node.last_seen_unix_s, 3),
             "hostname": sanitize_text(node.hostname, HOSTNAME_LIMIT),
             "joined_at": _finite_or_none(node.joined_at_unix_s, 3)} for node in reply.nodes]


def _finite_or_none(value: float, digits: int) -> float | None:
    return round(value, digits) if math.isfinite(value) else None


# ---------------------------------------------------------------------------
# 6. The TUI: asciimatics scenes for the mode menu, the join form, the worker
#    view and the orchestrator dashboard. First the dashboard's pure parts
#    (layout, rows, sorting), tested without a terminal; the widgets after them
#    only place text and pick colours.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TableLayout:
    """Column widths of the dashboard's node table; 0 hides a column."""

    node_id: int
    address: int
    status: int
    bar: int  # each of the CPU and memory bars, without the percentage after it
    spark: int
    seen: int

    PERCENT = 7  # " 100.0%"


def table_layout(width: int) -> TableLayout:
    """Fit the node table into width cells: drop the sparkline, then the address, before bars get thin."""
    node_id, status, seen = max(12, min(24, width // 6)), 12, 9
    address = 21 if width >= 90 else 0
    spare = width - node_id - status - seen - 4 - (address + 1 if address else 0) - 2 * TableLayout.PERCENT
    spark = min(HISTORY_SAMPLES, spare // 4) if width >= 130 else 0
    if spark:
        spare -= spark + 1
    return TableLayout(node_id, address, status, max(spare // 2, 4), spark, seen)


def node_row(node: Node, layout: TableLayout, now: float, unicode: bool = True) -> list[tuple[str, str]]:
    """One table row as (text, style) segments; styles: text, dim, active, disconnected, low, medium, high."""
    live = node.status == ACTIVE
    plain = "text" if live else "dim"
    segments = [(fit(node.node_id, layout.node_id) + " ", plain)]
    if layout.address:
        segments.append((fit(node.address, layout.address) + " ", plain))
    segments.append((fit(node.status, layout.status) + " ", "active" if live else "disconnected"))
    for value in (node.cpu_usage, node.memory_usage):
        segments.append((bar_text(value, layout.bar, unicode), bar_level(value) if live else "dim"))
        segments.append((f"{clamp_percent(value):6.1f}% ", plain))
    if layout.spark:
        segments.append((sparkline(node.cpu_history, layout.spark, unicode) + " ", "low" if live else "dim"))
    segments.append((fit(format_age(now - node.last_seen), layout.seen), plain))
    return segments


def table_header(layout: TableLayout, sort_key: str, reverse: bool) -> str:
    arrow = "▼" if reverse else "▲"
    titles = [("n", "NODE ID", layout.node_id), ("", "ADDRESS", layout.address), ("s", "STATUS", layout.status),
              ("c", "CPU", layout.bar + TableLayout.PERCENT), ("m", "MEMORY", layout.bar + TableLayout.PERCENT),
              ("", "CPU LAST 60s", layout.spark), ("", "LAST SEEN", layout.seen)]
    return " ".join(fit(title + (arrow if key == sort_key else ""), width)
                    for key, title, width in titles if width)


SORT_KEYS = "ncms"  # by node ID, CPU, memory, status
HEARTBEAT_STEPS_MS = (250, 500, 1000, 2000, 5000)


def next_heartbeat_ms(current_ms: int, longer: bool) -> int | None:
    """The next heartbeat interval step up or down from current_ms, None at either end."""
    if longer:
        return min((ms for ms in HEARTBEAT_STEPS_MS if ms > current_ms), default=None)
    return max((ms for ms in HEARTBEAT_STEPS_MS if ms < current_ms), default=None)


def sort_nodes(nodes: list[Node], key: str, reverse: bool = False) -> list[Node]:
    """Sort for the table; CPU and memory put the busiest first unless reversed."""
    if key in ("c", "m"):
        usage = "cpu_usage" if key == "c" else "memory_usage"
        return sorted(nodes, key=lambda node: (-getattr(node, usage), node.node_id), reverse=reverse)
    if key == "s":
        return sorted(nodes, key=lambda node: (node.status != ACTIVE, node.node_id), reverse=reverse)
    return sorted(nodes, key=lambda node: node.node_id, reverse=reverse)


@dataclasses.dataclass(frozen=True)
class ClusterSummary:
    active: int
    disconnected: int
    cpu_percent: float  # mean over active nodes
    memory_percent: float


def summarize(nodes: list[Node]) -> ClusterSummary:
    live = [node for node in nodes if node.status == ACTIVE]
    count = len(live) or 1
    return ClusterSummary(len(live), len(nodes) - len(live),
                          sum(node.cpu_usage for node in live) / count,
                          sum(node.memory_usage for node in live) / count)


MIN_WIDTH, MIN_HEIGHT = 70, 18
# asciimatics ticks at 20 frames a second; redraw live data once a second.
REDRAW_FRAMES = 20
# Ctrl-C arrives as a key because the screen is opened with catch_interrupt.
QUIT_KEYS = (ord("q"), ord("Q"), 3)

PALETTE = collections.defaultdict(
    lambda: (Screen.COLOUR_WHITE, Screen.A_NORMAL, Screen.COLOUR_BLACK),
    {
        "label": (Screen.COLOUR_WHITE, Screen.A_BOLD, Screen.COLOUR_BLACK),
        "edit_text": (Screen.COLOUR_WHITE, Screen.A_NORMAL, Screen.COLOUR_BLACK),
        "focus_edit_text": (Screen.COLOUR_BLACK, Screen.A_NORMAL, Screen.COLOUR_WHITE),
        "invalid": (Screen.COLOUR_RED, Screen.A_BOLD, Screen.COLOUR_BLACK),
        "disabled": (Screen.COLOUR_BLACK, Screen.A_BOLD, Screen.COLOUR_BLACK),
    })

# Styles used by the pure row and line builders, as (foreground, attribute, background).
STYLES = {
    "text": (Screen.COLOUR_WHITE, Screen.A_NORMAL, Screen.COLOUR_BLACK),
    "bold": (Screen.COLOUR_WHITE, Screen.A_BOLD, Screen.COLOUR_BLACK),
    "dim": (Screen.COLOUR_BLACK, Screen.A_BOLD, Screen.COLOUR_BLACK),
    "header": (Screen.COLOUR_BLACK, Screen.A_NORMAL, Screen.COLOUR_CYAN),
    "selected": (Screen.COLOUR_BLACK, Screen.A_NORMAL, Screen.COLOUR_WHITE),
    "active": (Screen.COLOUR_GREEN, Screen.A_BOLD, Screen.COLOUR_BLACK),
    "disconnected": (Screen.COLOUR_RED, Screen.A_NORMAL, Screen.COLOUR_BLACK),
    "low": (Screen.COLOUR_GREEN, Screen.A_NORMAL, Screen.COLOUR_BLACK),
    "medium": (Screen.COLOUR_YELLOW, Screen.A_NORMAL, Screen.COLOUR_BLACK),
    "high": (Screen.COLOUR_RED, Screen.A_BOLD, Screen.COLOUR_BLACK),
    "INFO": (Screen.COLOUR_WHITE, Screen.A_NORMAL, Screen.COLOUR_BLACK),
    "WARN": (Screen.COLOUR_YELLOW, Screen.A_NORMAL, Screen.COLOUR_BLACK),
}


class TerminationRequested(Exception):
    """SIGTERM while the screen is up: leave it the same way q does."""


@dataclasses.dataclass
class FormState:
    """What the create or join form holds, kept across screen rebuilds."""

    address: str
    token: str = ""
    error: str = ""


# kind: (title, address label, what Enter does)
FORM_TEXTS = {
    "create": ("Create a new cluster", "Listen address: ", "start the orchestrator"),
    "join": ("Join an existing cluster", "Orchestrator address: ", "join"),
}


class TuiApp:
    """The TUI's model: which view shows (selection, create, join, worker, orchestrator) and what it shows."""

    def __init__(self, *, listen: str = DEFAULT_LISTEN, heartbeat_ms: int = DEFAULT_HEARTBEAT_MS,
                 max_nodes: int = DEFAULT_MAX_NODES, node_id: str | None = None, tls_cert: bytes | None = None,
                 tls_key: bytes | None = None, tls_ca: bytes | None = None):
        self.view = "selection"
        self.heartbeat_ms = heartbeat_ms
        self.max_nodes = max_nodes
        self.node_id = node_id
        self.tls_cert, self.tls_key, self.tls_ca = tls_cert, tls_key, tls_ca
        self.orchestrator: Orchestrator | None = None
        self.worker: WorkerClient | None = None
        self.sampler: LocalSampler | None = None
        self.menu_choice = 0
        self.forms = {"create": FormState(listen), "join": FormState(f"127.0.0.1:{DEFAULT_PORT}")}
        self.sort_key = "n"
        self.sort_reverse = False
        self.scroll = 0
        self.local_history: collections.deque = collections.deque(maxlen=HISTORY_SAMPLES)
        self.local_history_at = 0.0

    def submit(self, kind: str, address: str, token: str = "") -> bool:
        """Check a create or join form and act on it; on failure its error says why."""
        form = self.forms[kind]
        form.address, form.token = address, token
        try:
            host, port = parse_address(address, allow_port_zero=kind == "create")
        except ValueError as error:
            form.error = str(error)
            return False
        try:
            if kind == "create":
                self.start_orchestrator(format_address(host, port), token or None)
            else:
                self.start_worker(format_address(host, port), token or None)
        except StartError as error:
            form.error = str(error)
            return False
        form.error = ""
        return True

    def start_orchestrator(self, listen: str, token: str | None = None) -> None:
        """Start serving (StartError if the address cannot be used) and switch to the dashboard."""
        orchestrator = Orchestrator(listen, token=token, heartbeat_ms=self.heartbeat_ms, max_nodes=self.max_nodes,
                                    tls_cert=self.tls_cert, tls_key=self.tls_key)
        orchestrator.start()
        self.orchestrator = orchestrator
        self.view = "orchestrator"

    def start_worker(self, target: str, token: str | None = None) -> None:
        self.sampler = LocalSampler()
        self.worker = WorkerClient(target, self.node_id or default_node_id(), self.sampler, token=token,
                                   tls_ca=self.tls_ca)
        self.worker.start()
        self.view = "worker"

    def sample_locally(self) -> LocalSample:
        """A sample for the worker view; redraws come with key presses too, so the history
        keeps one point a second."""
        sample = self.sampler.sample()
        self.local_history_at = add_to_history(self.local_history, self.local_history_at, sample.cpu_percent,
                                               time.monotonic(), 1.0)
        return sample

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.orchestrator is not None:
            self.orchestrator.stop()

    def play(self, screen) -> None:
        """Show the scenes for the current view on this screen, until quit or resize."""
        if screen.width < MIN_WIDTH or screen.height < MIN_HEIGHT:
            scenes = [Scene([TooSmallNotice(screen)], -1, name="too-small")]
        else:
            scenes = [Scene([MenuFrame(screen, self)], -1, name="selection"),
                      Scene([AddressFrame(screen, self, "create")], -1, name="create"),
                      Scene([AddressFrame(screen, self, "join")], -1, name="join"),
                      Scene([WorkerFrame(screen, self)], -1, name="worker"),
                      Scene([DashboardFrame(screen, self)], -1, name="orchestrator")]
        start = next((scene for scene in scenes if scene.name == self.view), scenes[0])
        screen.play(scenes, stop_on_resize=True, start_scene=start, unhandled_input=quit_on_key,
                    allow_int=True)

    def run(self) -> int:
        """Own the terminal until the user quits; rebuild the scenes on every resize."""
        previous = signal.signal(signal.SIGTERM, _raise_termination)
        try:
            while True:
                try:
                    Screen.wrapper(self.play, catch_interrupt=True)
                    return 0
                except ResizeScreenError:
                    continue
        except TerminationRequested:
            return 0
        finally:
            signal.signal(signal.SIGTERM, previous)
            self.shutdown()


def _raise_termination(signum, frame):
    raise TerminationRequested()


def quit_on_key(event) -> None:
    """Screen.play's handler for keys no view used."""
    if isinstance(event, KeyboardEvent) and event.key_code in QUIT_KEYS:
        raise StopApplication("quit")


class TooSmallNotice(Effect):
    """Shown instead of a layout that does not fit; resizing brings the real view back."""

    def reset(self):
        pass

    def _update(self, frame_no):
        message = f"terminal too small (need {MIN_WIDTH}x{MIN_HEIGHT}); enlarge it or press q"
        self._screen.print_at(fit(message, self._screen.width), 0, 0)

    @property
    def stop_frame(self):
        return 0


class Pane(Widget):
    """A read-only widget that redraws itself from the model every frame it is asked to."""

    def __init__(self, height: int, app: TuiApp, live: bool = True):
        super().__init__(None, tab_stop=False)
        self._height = height
        self.app = app
        self._live = live

    @property
    def frame_update_count(self):
        return REDRAW_FRAMES if self._live else 0

    @property
    def unicode(self) -> bool:
        return self._frame.canvas.unicode_aware

    def put(self, text: str, x: int, y: int, style: str = "text") -> int:
        """Draw text at (x, y) inside this pane, clipped to it; return the x after it."""
        if y >= self._h or x >= self._w:
            return x
        width = min(self._w - x, display_width(text))
        colour, attr, background = STYLES[style]
        self._frame.canvas.print_at(fit(text, width), self._x + x, self._y + y, colour, attr, background)
        return x + width

    def put_segments(self, segments, y: int, x: int = 0) -> int:
        for text, style in segments:
            x = self.put(text, x, y, style)
        return x

    def update(self, frame_no):
        self.draw()

    @abc.abstractmethod
    def draw(self) -> None:
        """Draw the pane's content with put()."""

    def reset(self):
        pass

    def process_event(self, event):
        return event

    def required_height(self, offset, width):
        return self._height

    @property
    def value(self):
        return None


class AppFrame(Frame):
    """A full-screen, borderless, one-column Frame bound to the app model."""

    takes_text = False  # True when the frame has text fields, which must see every key first

    def __init__(self, screen, app: TuiApp, name: str, data: dict | None = None):
        super().__init__(screen, screen.height, screen.width, data=data, has_border=False, can_scroll=False,
                         name=name)
        self.palette = PALETTE
        self.app = app
        self.column = Layout([1], fill_frame=True)
        self.add_layout(self.column)

    def on_key(self, key: int) -> bool:
        """Act on a key this view uses and return True; False passes it on."""
        return False

    def process_event(self, event):
        # Keys nobody uses go back to Screen.play, whose unhandled-input handler quits on q and
        # Ctrl-C; a Frame without text fields would otherwise swallow them.
        if isinstance(event, KeyboardEvent):
            if self.on_key(event.key_code):
                return None
            if not self.takes_text:
                return event
        return super().process_event(event)


class MenuPane(Pane):
    OPTIONS = ("[1] Create a new cluster (Orchestrator)", "[2] Join an existing cluster (Worker)")

    def draw(self):
        self.put(f"cares {VERSION} - pick a role", 2, 0, "bold")
        for index, option in enumerate(self.OPTIONS):
            chosen = index == self.app.menu_choice
            self.put((" > " if chosen else "   ") + option + " ", 2, 2 + index, "selected" if chosen else "text")
        self.put("Up/Down and Enter to choose, 1 or 2 as shortcuts, q to quit", 2, 5, "dim")


class MenuFrame(AppFrame):
    """The first screen: create a cluster or join one."""

    def __init__(self, screen, app: TuiApp):
        super().__init__(screen, app, "menu")
        self.column.add_widget(MenuPane(7, app, live=False))
        self.fix()

    def on_key(self, key: int) -> bool:
        if key in (Screen.KEY_UP, Screen.KEY_DOWN):
            self.app.menu_choice = 1 - self.app.menu_choice
            return True
        if key in (ord("1"), ord("2")):
            self.app.menu_choice = key - ord("1")
        elif key not in (10, 13):
            return False
        self.app.view = ("create", "join")[self.app.menu_choice]
        raise NextScene(self.app.view)


class SafeText(Text):
    """A Text field that refuses characters which could rewrite the terminal (bidi overrides and the like)."""

    def process_event(self, event):
        if (isinstance(event, KeyboardEvent) and event.key_code >= 32
                and (event.key_code > sys.maxunicode or sanitize_text(chr(event.key_code)) == "?")):
            return None
        return super().process_event(event)


class AddressFrame(AppFrame):
    """The create and join forms: an address and an optional join token, checked before use."""

    takes_text = True

    def __init__(self, screen, app: TuiApp, kind: str):
        form = app.forms[kind]
        super().__init__(screen, app, kind, data={"address": form.address, "token": form.token})
        self.kind = kind
        title, address_label, action = FORM_TEXTS[kind]
        layout = self.column
        layout.add_widget(Label(title))
        layout.add_widget(Label(""))
        layout.add_widget(SafeText(address_label, name="address", max_length=300))
        layout.add_widget(SafeText("Join token (optional): ", name="token", hide_char="*", max_length=256))
        layout.add_widget(Label(""))
        self._error = Label(sanitize_text(form.error, 200))
        self._error.custom_colour = "invalid"
        layout.add_widget(self._error)
        layout.add_widget(Label(f"Enter to {action}, Tab to move between fields, Esc for the menu, "
                                "Ctrl-C to quit"))
        self.fix()

    def on_key(self, key: int) -> bool:
        if key in (10, 13):
            self.save()
            if self.app.submit(self.kind, self.data["address"], self.data["token"]):
                raise NextScene(self.app.view)
            self._error.text = sanitize_text(self.app.forms[self.kind].error, 200)
            return True
        if key == Screen.KEY_ESCAPE:
            self.save()
            self.app.forms[self.kind].address = self.data["address"]
            self.app.view = "selection"
            raise NextScene("selection")
        return False


class WorkerPane(Pane):
    """Phase 01's view: this machine's CPU and memory, plus the connection to the orchestrator."""

    def draw(self):
        app, worker = self.app, self.app.worker
        if worker is None:
            return
        sample = app.sample_locally()
        self.put(f"cares worker - node {worker.node_id} - orchestrator {worker.target}", 0, 0, "bold")
        state = worker.state
        style = {"connected": "active", "retrying": "WARN"}.get(state.phase, "text")
        self.put(state.describe(), 0, 1, style)
        bar_width = max(self._w - 40, 10)
        for row, (name, value, extra) in enumerate((
                ("CPU", sample.cpu_percent, f"{app.sampler.cpu_count} CPUs"),
                ("Memory", sample.memory_percent,
                 f"{format_bytes(sample.memory_used_bytes)} / {format_bytes(sample.memory_total_bytes)}"))):
            x = self.put(f"{name:<8}", 0, 3 + row, "bold")
            x = self.put(bar_text(value, bar_width, self.unicode), x, 3 + row, bar_level(value))
            self.put(f"{value:6.1f}%  {extra}", x, 3 + row)
        x = self.put(f"{'CPU 60s':<8}", 0, 6, "bold")
        self.put(sparkline(app.local_history, min(HISTORY_SAMPLES, bar_width), self.unicode), x, 6, "low")


class EventPane(Pane):
    """The newest events that fit, oldest at the top."""

    def __init__(self, height: int, app: TuiApp, events_of):
        super().__init__(height, app)
        self._events_of = events_of

    def draw(self):
        events = self._events_of()
        self.put(fit("Events", self._w), 0, 0, "header")
        for row, event in enumerate(events.tail(self._h - 1) if events else ()):
            self.put(format_event(event), 0, 1 + row, event.level)


class HelpPane(Pane):
    def __init__(self, app: TuiApp, text: str):
        super().__init__(1, app, live=False)
        self._text = text

    def draw(self):
        self.put(fit(self._text, self._w), 0, 0, "header")


class WorkerFrame(AppFrame):
    def __init__(self, screen, app: TuiApp):
        super().__init__(screen, app, "worker")
        layout = self.column
        layout.add_widget(WorkerPane(8, app))
        layout.add_widget(EventPane(screen.height - 9, app, lambda: app.worker and app.worker.events))
        layout.add_widget(HelpPane(app, "q quit (says goodbye to the orchestrator)"))
        self.fix()


class DashboardHeader(Pane):
    def draw(self):
        orchestrator = self.app.orchestrator
        if orchestrator is None:
            return
        nodes = self._frame.nodes
        summary = summarize(nodes)
        access = "open cluster (no join token)" if not orchestrator.token else "join token required"
        self.put(f"cares orchestrator - listening on {orchestrator.address} - heartbeat "
                 f"{orchestrator.registry.heartbeat_interval:.2f} s - {access}", 0, 0, "bold")
        self.put("Join with: cares worker " + "  or  ".join(orchestrator.join_hosts), 0, 1)
        x = self.put(f"Nodes: {summary.active} active, {summary.disconnected} disconnected", 0, 2)
        bar_width = max(min((self._w - x - 30) // 2, 20), 5)
        for label, value in (("   Cluster CPU ", summary.cpu_percent), ("   Memory ", summary.memory_percent)):
            x = self.put(label, x, 2)
            x = self.put(bar_text(value, bar_width, self.unicode), x, 2, bar_level(value))
            x = self.put(f"{value:6.1f}%", x, 2)


class NodeTable(Pane):
    """One row per node from the frame's registry snapshot, sorted and scrolled."""

    @property
    def rows(self) -> int:
        """Node rows that fit under the column titles."""
        return self._height - 1

    def draw(self):
        app, orchestrator = self.app, self.app.orchestrator
        if orchestrator is None:
            return
        layout = table_layout(self._w)
        nodes = sort_nodes(self._frame.nodes, app.sort_key, app.sort_reverse)
        rows = self.rows
        app.scroll = max(0, min(app.scroll, len(nodes) - rows))
        header = table_header(layout, app.sort_key, app.sort_reverse)
        if len(nodes) > rows:
            header = header[: self._w - 16].ljust(self._w - 16) + f"{app.scroll + 1}-" \
                     f"{min(app.scroll + rows, len(nodes))} of {len(nodes)}".rjust(16)
        self.put(fit(header, self._w), 0, 0, "header")
        if not nodes:
            self.put(f"Waiting for workers - join with: cares worker {orchestrator.join_hosts[0]}", 2, 2, "dim")
            return
        visible = nodes[app.scroll: app.scroll + rows]
        if layout.spark:
            histories = orchestrator.registry.cpu_histories(node.node_id for node in visible)
            for node in visible:
                node.cpu_history = histories.get(node.node_id, ())
        now = time.time()
        for row, node in enumerate(visible):
            self.put_segments(node_row(node, layout, now, self.unicode), 1 + row)


class DashboardFrame(AppFrame):
    """The orchestrator's live view: header, node table, event log, key help."""

    HELP = ("q quit  Up/Down/PgUp/PgDn scroll  sort by n id, c cpu, m mem, s status  r reverse  "
            "x forget gone  +/- heartbeat")

    def __init__(self, screen, app: TuiApp):
        super().__init__(screen, app, "orchestrator")
        self.nodes: list[Node] = []
        log_height = max(5, screen.height // 4)
        self._table = NodeTable(screen.height - 3 - log_height - 1, app)
        layout = self.column
        layout.add_widget(DashboardHeader(3, app))
        layout.add_widget(self._table)
        layout.add_widget(EventPane(log_height, app, lambda: app.orchestrator and app.orchestrator.registry.events))
        layout.add_widget(HelpPane(app, self.HELP))
        self.fix()

    def _update(self, frame_no):
        # One snapshot per redraw, shared by the header and the table, which fetches
        # the histories of the rows it shows.
        if self.app.orchestrator is not None:
            self.nodes = self.app.orchestrator.registry.snapshot(with_history=False)
        super()._update(frame_no)

    def on_key(self, key: int) -> bool:
        app = self.app
        page = max(self._table.rows - 1, 1)
        moves = {Screen.KEY_UP: -1, Screen.KEY_DOWN: 1, Screen.KEY_PAGE_UP: -page, Screen.KEY_PAGE_DOWN: page,
                 Screen.KEY_HOME: -10**9, Screen.KEY_END: 10**9}
        if key in moves:
            app.scroll = max(0, app.scroll + moves[key])
        elif 0 <= key < 256 and chr(key) in SORT_KEYS:
            app.sort_key = chr(key)
        elif key == ord("r"):
            app.sort_reverse = not app.sort_reverse
        elif key == ord("x") and app.orchestrator is not None:
            app.orchestrator.registry.remove_disconnected()
        elif key in (ord("+"), ord("-")) and app.orchestrator is not None:
            step = next_heartbeat_ms(app.orchestrator.heartbeat_ms, longer=key == ord("+"))
            if step is not None:
                app.orchestrator.set_heartbeat_interval(step)
        else:
            return False
        return True


# ---------------------------------------------------------------------------
# 7. The command line and main().
# ---------------------------------------------------------------------------

class UsageError(Exception):
    """Bad command-line input; exit code 2."""


class RuntimeFailure(Exception):
    """The command could not do its job; exit code 1."""


def _address_argument(what: str, allow_port_zero: bool = False):
    """An argparse type for HOST:PORT, normalised; what names it in errors."""
    def parse(text: str) -> str:
        try:
            return format_address(*parse_address(text, allow_port_zero=allow_port_zero))
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"bad {what} '{sanitize_text(text, 60)}': {error}") from None
    return parse


def _node_id_argument(text: str) -> str:
    if not is_valid_node_id(text):
        raise argparse.ArgumentTypeError(NODE_ID_RULE)
    return text


def _number_argument(convert, low, high):
    """An argparse type: convert the text (int or float) and require low <= value <= high (NaN fails)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{sanitize_text(text, 20)}' is not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}-{high}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cares",
        description="Turn a handful of machines into a cluster and watch it live in the terminal. "
                    "Without a command, a menu lets you pick a role.")
    parser.add_argument("--version", action="version", version=f"cares {VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    orchestrator = commands.add_parser("orchestrator", help="create a cluster: serve workers, show the dashboard")
    orchestrator.add_argument("--listen", type=_address_argument("listen address", allow_port_zero=True),
                              default=DEFAULT_LISTEN, metavar="HOST:PORT",
                              help=f"address to listen on (default {DEFAULT_LISTEN}, all interfaces)")
    orchestrator.add_argument("--heartbeat-ms", type=_number_argument(int, MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS),
                              default=DEFAULT_HEARTBEAT_MS, metavar="MS",
                              help=f"heartbeat interval asked of workers (default {DEFAULT_HEARTBEAT_MS})")
    orchestrator.add_argument("--max-nodes", type=_number_argument(int, 1, 1_000_000), default=DEFAULT_MAX_NODES,
                              metavar="N", help=f"refuse joins beyond N nodes (default {DEFAULT_MAX_NODES})")
    orchestrator.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate (chain)")
    orchestrator.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")

    worker = commands.add_parser("worker", help="join a cluster and stream this machine's CPU and memory")
    worker.add_argument("orchestrator_address", type=_address_argument("address"), metavar="HOST:PORT",
                        help="the orchestrator, e.g. 10.0.0.5:50051 or [fd00::5]:50051")
    worker.add_argument("--node-id", type=_node_id_argument, metavar="ID",
                        help="this worker's ID (default: short host name plus a random suffix)")

    status = commands.add_parser("status", help="print an orchestrator's node table")
    status.add_argument("orchestrator_address", type=_address_argument("address"), metavar="HOST:PORT")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--timeout", type=_number_argument(float, 0.1, 3600.0), default=5.0, metavar="SECONDS",
                        help="give up after this long (default 5)")

    for command in (orchestrator, worker):
        command.add_argument("--headless", action="store_true",
                             help="no screen: one log line per event on stderr "
                                  "(automatic when stdout is not a terminal)")
    for command in (orchestrator, worker, status):
        command.add_argument("--token", default=os.environ.get("CARES_TOKEN") or None, metavar="SECRET",
                             help="shared join token (default: $CARES_TOKEN); without one the cluster is open")
    for command in (worker, status):
        command.add_argument("--tls-ca", metavar="FILE",
                             help="connect with TLS, trusting the orchestrator certificate signed by this PEM CA")
    return parser


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


def print_event(event: Event) -> None:
    print(format_event(event, "%Y-%m-%d %H:%M:%S"), file=sys.stderr, flush=True)


def termination_requested() -> threading.Event:
    """An event set by SIGINT or SIGTERM from now on (so a signal while starting still stops cleanly)."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def is_interactive(args) -> bool:
    return not getattr(args, "headless", False) and sys.stdin.isatty() and sys.stdout.isatty()


def run_orchestrator(args) -> int:
    tls = load_tls(args)
    if not is_interactive(args):
        return run_orchestrator_headless(args, tls)
    app = TuiApp(listen=args.listen, heartbeat_ms=args.heartbeat_ms, max_nodes=args.max_nodes,
                 tls_cert=tls.get("tls_cert"), tls_key=tls.get("tls_key"))
    app.start_orchestrator(args.listen, args.token)
    return app.run()


def run_worker(args) -> int:
    tls = load_tls(args)
    if not is_interactive(args):
        return run_worker_headless(args, tls)
    app = TuiApp(node_id=args.node_id, tls_ca=tls.get("tls_ca"))
    app.start_worker(args.orchestrator_address, args.token)
    return app.run()


def run_orchestrator_headless(args, tls: dict) -> int:
    orchestrator = Orchestrator(args.listen, heartbeat_ms=args.heartbeat_ms, max_nodes=args.max_nodes,
                                token=args.token, tls_cert=tls.get("tls_cert"), tls_key=tls.get("tls_key"))
    orchestrator.registry.events.subscribe(print_event)
    stop = termination_requested()
    orchestrator.start()
    orchestrator.registry.events.add("INFO", "Workers can join with: cares worker "
                                             + " | ".join(orchestrator.join_hosts))
    if not orchestrator.token:
        orchestrator.registry.events.add("WARN", "Open cluster: anyone who can reach this port can join "
                                                 "(set --token or CARES_TOKEN).")
    stop.wait()
    orchestrator.stop()
    return 0


def run_worker_headless(args, tls: dict) -> int:
    client = WorkerClient(args.orchestrator_address, args.node_id or default_node_id(), LocalSampler(),
                          token=args.token, tls_ca=tls.get("tls_ca"))
    client.events.subscribe(print_event)
    client.events.add("INFO", f"Worker '{client.node_id}' joining {client.target}.")
    stop = termination_requested()
    client.start()
    stop.wait()
    client.stop()
    return 0


def format_status_table(rows: list[dict], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"{'NODE ID':<24} {'ADDRESS':<24} {'STATUS':<13} {'CPU':>6} {'MEMORY':>7}  LAST SEEN"]
    def percent(value):
        return "?" if value is None else f"{value:.1f}%"
    for row in rows:
        seen = "?" if row["last_seen"] is None else format_age(now - row["last_seen"])
        lines.append(f"{fit(row['node_id'], 24)} {fit(row['address'], 24)} {row['status']:<13} "
                     f"{percent(row['cpu_percent']):>6} {percent(row['memory_percent']):>7}  {seen}")
    if not rows:
        lines.append("(no workers have joined)")
    return "\n".join(lines)


def run_status(args) -> int:
    try:
        rows = fetch_status(args.orchestrator_address, token=args.token, tls_ca=load_tls(args).get("tls_ca"),
                            timeout=args.timeout)
    except grpc.RpcError as error:
        raise RuntimeFailure(f"cannot get status from {args.orchestrator_address}: "
                             f"{describe_rpc_error(error)}") from None
    if args.json:
        print(json.dumps({"nodes": rows}, indent=2))
    else:
        print(format_status_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            if not is_interactive(args):
                parser.print_usage(sys.stderr)
                raise UsageError("choose a command (orchestrator, worker or status), or run me in a terminal")
            return TuiApp().run()
        if args.command == "status":
            return run_status(args)
        if args.command == "orchestrator":
            return run_orchestrator(args)
        return run_worker(args)
    except SystemExit as exit_request:  # argparse's own usage errors, --help and --version
        return exit_request.code if isinstance(exit_request.code, int) else 2
    except UsageError as error:
        print(f"cares: {error}", file=sys.stderr)
        return 2
    except (RuntimeFailure, StartError) as error:
        print(f"cares: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # last resort: a bug must still not greet the user with a traceback
        if os.environ.get("CARES_DEBUG"):
            raise
        print(f"cares: unexpected error: {sanitize_text(f'{type(error).__name__}: {error}', 300)} "
              "(set CARES_DEBUG=1 for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
