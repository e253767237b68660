#!/usr/bin/env python3
"""cares: turn a handful of machines into a cluster and watch it live in the terminal.

One module, read top to bottom as the data flows:

1. text safety and formatting helpers (pure functions),
2. local metrics sampling (what Phase 01 showed),
3. Node and NodeRegistry (the orchestrator's state),
4. the orchestrator: gRPC servicers on a grpc.aio server,
5. the worker client and the status client,
6. the command line and main().
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import dataclasses
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
import sys
import threading
import time
import unicodedata

# gRPC's C core logs to stderr, which would both leak internals to users and
# scribble over a full-screen UI. Users can still ask for it with GRPC_VERBOSITY.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
import psutil  # noqa: E402

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
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second orchestrator on a busy port must fail, not share it
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
WORKER_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


# ---------------------------------------------------------------------------
# 1. Text safety and formatting: pure functions, tested without a terminal.
# ---------------------------------------------------------------------------

NODE_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,63}")
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
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024.0
    raise AssertionError("unreachable")


def fit(text: str, width: int) -> str:
    """Pad or cut text to exactly width characters, marking a cut with '…'."""
    if width <= 0:
        return ""
    if len(text) > width:
        return text[: width - 1] + "…"
    return text.ljust(width)


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
            ("deadline", "timed out"),
            ("ssl", "TLS handshake failed"),
            ("handshake", "TLS handshake failed"),
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


def format_event(event: "Event") -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event.at))
    return f"{stamp} [{event.level}] {event.text}"


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


class LocalSampler:
    """Thread-safe psutil sampling.

    psutil.cpu_percent(interval=None) reports use since its previous call, so the
    screen and the heartbeat must share one sampler; a sample younger than
    max_age is reused rather than measured over a uselessly short window.
    """

    def __init__(self, max_age: float = 0.5):
        self._max_age = max_age
        self._lock = threading.Lock()
        self._last: LocalSample | None = None
        self._last_at = 0.0
        psutil.cpu_percent(interval=None)
        self._primed_at = time.monotonic()

    def sample(self) -> LocalSample:
        with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last_at < self._max_age:
                return self._last
            if self._last is None and now - self._primed_at < 0.1:
                # The first reading needs a measurable window to mean anything.
                time.sleep(0.1)
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


def local_node_info(node_id: str) -> pb.NodeInfo:
    return pb.NodeInfo(
        node_id=node_id,
        hostname=socket.gethostname()[:HOSTNAME_LIMIT],
        cpu_count=psutil.cpu_count() or 0,
        memory_total_bytes=psutil.virtual_memory().total,
        platform=f"{platform.system()}-{platform.release()}-{platform.machine()}"[:PLATFORM_LIMIT],
        cares_version=VERSION,
    )


# ---------------------------------------------------------------------------
# 3. Node and NodeRegistry: the orchestrator's state. Plain threads and one
#    lock, so the gRPC loop writes while the UI thread reads.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Event:
    at: float  # wall clock, Unix seconds
    level: str  # INFO, WARN or ERROR
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


@dataclasses.dataclass
class Node:
    """One worker as the orchestrator knows it."""

    node_id: str
    address: str
    status: str = ACTIVE
    last_seen: float = 0.0  # wall clock of the last heartbeat, Unix seconds
    cpu_usage: float = 0.0
    memory_usage: float = 0.0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    hostname: str = ""
    platform: str = ""
    cpu_count: int = 0
    joined_at: float = 0.0
    # (cpu_percent, memory_percent), one point per heartbeat interval.
    history: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=HISTORY_SAMPLES))
    # Liveness and session bookkeeping; never shown.
    session_id: str = dataclasses.field(default="", repr=False)
    heard_at: float = dataclasses.field(default=0.0, repr=False)  # monotonic
    history_at: float = dataclasses.field(default=0.0, repr=False)  # monotonic
    last_sequence: int = dataclasses.field(default=0, repr=False)
    streaming: bool = dataclasses.field(default=False, repr=False)
    dropped_samples: int = dataclasses.field(default=0, repr=False)

    def copy(self) -> "Node":
        clone = dataclasses.replace(self)
        clone.history = collections.deque(self.history, maxlen=HISTORY_SAMPLES)
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
                 heartbeat_interval: float = DEFAULT_HEARTBEAT_MS / 1000.0,
                 events: EventLog | None = None):
        self._lock = threading.Lock()
        self._nodes: dict[str, Node] = {}
        self.max_nodes = max_nodes
        self.heartbeat_interval = heartbeat_interval
        self.events = events if events is not None else EventLog()

    @property
    def deadline(self) -> float:
        return MISSED_HEARTBEATS * self.heartbeat_interval

    def join(self, node_id: str, address: str, *, hostname: str = "", platform_name: str = "",
             cpu_count: int = 0, memory_total_bytes: int = 0) -> str:
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
                node.platform = platform_name
                node.cpu_count = cpu_count
                node.memory_total_bytes = memory_total_bytes or node.memory_total_bytes
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
            if node.streaming:
                return grpc.StatusCode.FAILED_PRECONDITION
            if node.status != ACTIVE:
                return grpc.StatusCode.FAILED_PRECONDITION
            node.streaming = True
            node.heard_at = time.monotonic()
            return None

    def update(self, node_id: str, session_id: str, *, cpu_percent: float, memory_percent: float,
               memory_used_bytes: int = 0, memory_total_bytes: int = 0, sequence: int = 0) -> bool:
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
                node.memory_used_bytes = memory_used_bytes
                if memory_total_bytes:
                    node.memory_total_bytes = memory_total_bytes
                point = (cpu_percent, memory_percent)
                # A worker sending faster than asked replaces the latest point instead
                # of flooding the history.
                if node.history and now - node.history_at < 0.9 * self.heartbeat_interval:
                    node.history[-1] = point
                else:
                    node.history.append(point)
                    node.history_at = now
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
        """Mark nodes silent for longer than the deadline Disconnected; return their (node_id, session_id)."""
        cutoff = time.monotonic() - self.deadline
        with self._lock:
            silent = [node for node in self._nodes.values()
                      if node.status == ACTIVE and node.heard_at < cutoff]
            for node in silent:
                node.status = DISCONNECTED
        for node in silent:
            self.events.add("WARN", f"Node '{node.node_id}' lost: no heartbeat for {self.deadline:.1f} s.")
        return [(node.node_id, node.session_id) for node in silent]

    def remove_disconnected(self) -> int:
        with self._lock:
            gone = [node_id for node_id, node in self._nodes.items() if node.status == DISCONNECTED]
            for node_id in gone:
                del self._nodes[node_id]
        if gone:
            self.events.add("INFO", f"Removed {len(gone)} disconnected node(s) from the table.")
        return len(gone)

    def snapshot(self) -> list[Node]:
        """Copies of every node, safe to read on another thread."""
        with self._lock:
            return [node.copy() for node in self._nodes.values()]

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
# 4. The orchestrator: gRPC servicers on a grpc.aio server that runs on its own
#    thread and event loop, so a UI can own the main thread.
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


def _token_matches(context, expected: str | None) -> bool:
    if not expected:
        return True
    for key, value in context.invocation_metadata() or ():
        if key == TOKEN_METADATA_KEY:
            return hmac.compare_digest(str(value).encode(), expected.encode())
    return False


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
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "node ID must be 1-63 characters of A-Z a-z 0-9 . _ -")
        try:
            session_id = self.registry.join(
                request.node_id, address,
                hostname=sanitize_text(request.hostname, HOSTNAME_LIMIT),
                platform_name=sanitize_text(request.platform, PLATFORM_LIMIT),
                cpu_count=request.cpu_count,
                memory_total_bytes=request.memory_total_bytes)
        except JoinRefused as refusal:
            await context.abort(refusal.code, refusal.message)
        return pb.Acknowledgement(
            accepted=True,
            message=f"welcome, {request.node_id}",
            session_id=session_id,
            heartbeat_interval_ms=round(self.registry.heartbeat_interval * 1000))

    async def Heartbeat(self, request_iterator, context):
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        node_id, session_id = first.node_id, first.session_id
        refusal = self.registry.attach_stream(node_id, session_id)
        if refusal == grpc.StatusCode.PERMISSION_DENIED:
            await context.abort(refusal, "no joined session for this node; call JoinCluster first")
        elif refusal is not None:
            await context.abort(refusal, "this node already has a heartbeat stream")
        stream = _Stream(session_id, asyncio.current_task(), context)
        self._streams[node_id] = stream
        ending = "its heartbeat stream ended"
        try:
            message = first
            while message is not grpc.aio.EOF:
                if message.node_id != node_id or message.session_id != session_id:
                    ending = "it sent metrics for another node"
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                        "metrics must be for the node that joined")
                if message.leaving:
                    self.registry.disconnect(node_id, session_id, "left", left=True)
                    return
                if not self.registry.update(
                        node_id, session_id,
                        cpu_percent=message.cpu_percent,
                        memory_percent=message.memory_percent,
                        memory_used_bytes=message.memory_used_bytes,
                        memory_total_bytes=message.memory_total_bytes,
                        sequence=message.sequence):
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        "this session has ended; join again")
                message = await context.read()
        except asyncio.CancelledError:
            if stream.ending == "expired":
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    f"no heartbeat for {self.registry.deadline:.1f} s")
            if stream.ending != "shutdown":
                raise
            # Written by the handler itself, so the notice goes out before the end of the stream.
            await context.write(SHUTDOWN_NOTICE)
        finally:
            if self._streams.get(node_id) is stream:
                del self._streams[node_id]
            if not self.closing:
                self.registry.disconnect(node_id, session_id, ending)

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
        """Send a command on every open stream, giving up on any that does not take it in time."""
        writes = [asyncio.ensure_future(stream.context.write(command)) for stream in self._streams.values()]
        if writes:
            _, late = await asyncio.wait(writes, timeout=timeout)
            for write in late:
                write.cancel()


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
                          last_seen_unix_s=node.last_seen, hostname=node.hostname)
            for node in sorted(self.registry.snapshot(), key=lambda node: node.node_id)])


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
        if error.errno == 98:
            return f"cannot listen on {address}: port {port} is already in use"
        return f"cannot listen on {address}: {error.strerror or error}"
    return f"cannot listen on {address}"


class Orchestrator:
    """The gRPC server, its registry and the liveness sweep, running on the gRPC loop."""

    def __init__(self, listen: str = DEFAULT_LISTEN, *, registry: NodeRegistry | None = None,
                 token: str | None = None, tls_cert: bytes | None = None, tls_key: bytes | None = None,
                 heartbeat_ms: int = DEFAULT_HEARTBEAT_MS, max_nodes: int = DEFAULT_MAX_NODES):
        self.listen_host, port = parse_address(listen, allow_port_zero=True)
        self.registry = registry if registry is not None else NodeRegistry(
            max_nodes=max_nodes, heartbeat_interval=heartbeat_ms / 1000.0)
        self.token = token
        self.tls = (tls_key, tls_cert) if tls_cert else None
        self.port = port
        self.servicer = ClusterServicer(self.registry, token)
        self._status = StatusServicer(self.registry, token)
        self._server = None
        self._sweeper = None

    @property
    def address(self) -> str:
        return format_address(self.listen_host, self.port)

    def start(self) -> None:
        """Listen and serve on a background thread; StartError if the address cannot be used."""
        run_on_grpc_loop(self._start(), timeout=10)
        self.registry.events.add("INFO", f"Orchestrator listening on {self.address}.")

    async def _start(self) -> None:
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
            raise StartError(explain_bind_failure(self.listen_host, self.port))
        self.port = port
        await server.start()
        self._server = server
        self._sweeper = asyncio.ensure_future(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.registry.heartbeat_interval / 2)
            self.servicer.end_expired_streams(self.registry.expire())

    def set_heartbeat_interval(self, milliseconds: int) -> int:
        """Ask every worker to heartbeat at a new interval; returns the interval applied."""
        milliseconds = min(max(int(milliseconds), MIN_HEARTBEAT_MS), MAX_HEARTBEAT_MS)
        old = self.registry.heartbeat_interval
        self.registry.heartbeat_interval = max(old, milliseconds / 1000.0)
        command = pb.OrchestratorCommand(set_heartbeat_interval_ms=milliseconds)
        run_on_grpc_loop(self.servicer.broadcast(command), timeout=5)
        # Shrink the deadline only after workers were told, so none is declared lost for obeying late.
        self.registry.heartbeat_interval = milliseconds / 1000.0
        self.registry.events.add("INFO", f"Heartbeat interval set to {milliseconds / 1000.0:.1f} s.")
        return milliseconds

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
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.servicer.say_shutdown(timeout=grace / 2)
        await self._server.stop(grace / 2)


# ---------------------------------------------------------------------------
# 5. The worker client (join, then stream metrics; reconnect forever) and the
#    status client.
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConnectionState:
    phase: str  # "connecting", "connected", "retrying" or "stopped"
    detail: str = ""  # the last error while retrying, the welcome while connected
    retry_at: float = 0.0  # monotonic time of the next attempt while retrying
    heartbeat_interval: float = DEFAULT_HEARTBEAT_MS / 1000.0

    def describe(self, now: float | None = None) -> str:
        if self.phase == "retrying":
            wait = max(self.retry_at - (time.monotonic() if now is None else now), 0.0)
            text = f"retrying in {math.ceil(wait)} s"
            return f"{text}: {self.detail}" if self.detail else text
        return self.phase


class OrchestratorShutdown(Exception):
    pass


def backoff_delay(failures: int, rng: random.Random | None = None) -> float:
    """Jittered exponential backoff: 0.5 s, 1 s, 2 s, 4 s, then 5 s, each scaled by 0.5-1.0."""
    ceiling = min(0.5 * (2 ** min(failures, 10)), MAX_BACKOFF_S)
    return ceiling * (rng or random).uniform(0.5, 1.0)


def _channel_for(target: str, tls_ca: bytes | None, options):
    if tls_ca is not None:
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=tls_ca),
                                       options=options)
    return grpc.aio.insecure_channel(target, options=options)


class WorkerClient:
    """Joins an orchestrator and streams this machine's metrics to it, reconnecting forever."""

    def __init__(self, target: str, node_id: str, sampler: LocalSampler, *, token: str | None = None,
                 tls_ca: bytes | None = None, events: EventLog | None = None):
        self.target = target
        self.node_id = node_id
        self.sampler = sampler
        self.events = events if events is not None else EventLog()
        self._metadata = ((TOKEN_METADATA_KEY, token),) if token else ()
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

    async def _say_goodbye(self, call) -> None:
        self._sequence += 1
        await call.write(pb.NodeMetrics(node_id=self.node_id, session_id=self._session_id,
                                        sequence=self._sequence, leaving=True,
                                        sent_at_ms=int(time.time() * 1000)))
        await call.done_writing()
        await call.code()

    async def _run(self) -> None:
        failures = 0
        while True:
            self._set_state("connecting")
            delay = None
            try:
                await self._connect_and_stream()
                detail = "the orchestrator closed the stream"
            except OrchestratorShutdown as shutdown:
                detail = f"the orchestrator shut down ({shutdown})"
                failures, delay = 0, backoff_delay(0)
            except grpc.RpcError as error:
                detail = describe_rpc_error(error)
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    delay = REJECTED_TOKEN_BACKOFF_S
            except Exception as error:  # keep the worker alive whatever the network did
                detail = sanitize_text(f"unexpected {type(error).__name__}: {error}", ERROR_TEXT_LIMIT)
            if self._stopping:
                return
            if self._session_id and self.state.phase == "connected":
                failures = 0
            self._session_id = ""
            if delay is None:
                delay = backoff_delay(failures)
                failures += 1
            if detail != self._last_error:
                self.events.add("WARN", f"Disconnected: {detail}; retrying.")
                self._last_error = detail
            self._set_state("retrying", detail, time.monotonic() + delay)
            await asyncio.sleep(delay)

    async def _connect_and_stream(self) -> None:
        async with _channel_for(self.target, self._tls_ca, WORKER_OPTIONS) as channel:
            stub = pb_grpc.ClusterServiceStub(channel)
            ack = await stub.JoinCluster(local_node_info(self.node_id), metadata=self._metadata, timeout=5.0)
            self._session_id = ack.session_id
            self._sequence = 0
            self._interval = (ack.heartbeat_interval_ms or DEFAULT_HEARTBEAT_MS) / 1000.0
            self._interval_changed = asyncio.Event()
            call = stub.Heartbeat()
            self._call = call
            self._sender = asyncio.ensure_future(self._send_metrics(call))
            self._set_state("connected", ack.message)
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
                ms = min(max(command.set_heartbeat_interval_ms, MIN_HEARTBEAT_MS), MAX_HEARTBEAT_MS)
                self._interval = ms / 1000.0
                self._set_state("connected", self.state.detail)
                self._interval_changed.set()
                self.events.add("INFO", f"Heartbeat interval is now {self._interval:.1f} s.")
            elif kind == "shutdown":
                raise OrchestratorShutdown(sanitize_text(command.shutdown.reason, ERROR_TEXT_LIMIT))

    async def _send_metrics(self, call) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            sample = self.sampler.sample()
            self._sequence += 1
            await call.write(pb.NodeMetrics(
                node_id=self.node_id, session_id=self._session_id,
                cpu_percent=sample.cpu_percent, memory_percent=sample.memory_percent,
                memory_used_bytes=sample.memory_used_bytes, memory_total_bytes=sample.memory_total_bytes,
                sent_at_ms=int(time.time() * 1000), sequence=self._sequence))
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
            metadata = ((TOKEN_METADATA_KEY, token),) if token else ()
            return await pb_grpc.StatusServiceStub(channel).ListNodes(
                pb.ListNodesRequest(), metadata=metadata, timeout=timeout)

    reply = run_on_grpc_loop(call(), timeout=timeout + 5)
    return [{"node_id": node.node_id, "address": node.address, "status": node.status,
             "cpu_percent": round(node.cpu_percent, 1), "memory_percent": round(node.memory_percent, 1),
             "last_seen": round(node.last_seen_unix_s, 3)} for node in reply.nodes]


def format_status_table(rows: list[dict], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"{'NODE ID':<24} {'ADDRESS':<24} {'STATUS':<13} {'CPU':>6} {'MEMORY':>7}  LAST SEEN"]
    for row in rows:
        lines.append(f"{fit(sanitize_text(row['node_id']), 24)} {fit(sanitize_text(row['address']), 24)} "
                     f"{row['status']:<13} {row['cpu_percent']:>5.1f}% {row['memory_percent']:>6.1f}%  "
                     f"{format_age(now - row['last_seen'])}")
    if not rows:
        lines.append("(no workers have joined)")
    return "\n".join(lines)


def join_addresses(listen_host: str, port: int, interfaces: dict | None = None) -> list[str]:
    """The HOST:PORT strings a worker can use, listing this machine's addresses for a wildcard listen."""
    if listen_host not in ("::", "0.0.0.0", ""):
        return [format_address(listen_host, port)]
    if interfaces is None:
        interfaces = psutil.net_if_addrs()
    found, loopback = [], []
    for addresses in interfaces.values():
        for entry in addresses:
            if entry.family != socket.AF_INET:
                continue
            (loopback if entry.address.startswith("127.") else found).append(entry.address)
    return [format_address(host, port) for host in sorted(set(found)) + sorted(set(loopback))]


# ---------------------------------------------------------------------------
# 6. The command line and main().
# ---------------------------------------------------------------------------

class UsageError(Exception):
    """Bad command-line input; exit code 2."""


class RuntimeFailure(Exception):
    """The command could not do its job; exit code 1."""


def _address_argument(text: str) -> str:
    try:
        return format_address(*parse_address(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"bad address '{sanitize_text(text, 60)}': {error}") from None


def _listen_argument(text: str) -> str:
    try:
        return format_address(*parse_address(text, allow_port_zero=True))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"bad listen address '{sanitize_text(text, 60)}': {error}") from None


def _node_id_argument(text: str) -> str:
    if not is_valid_node_id(text):
        raise argparse.ArgumentTypeError("node ID must be 1-63 characters of A-Z a-z 0-9 . _ -")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{sanitize_text(text, 20)}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cares",
        description="Turn a handful of machines into a cluster and watch it live in the terminal. "
                    "Without a command, a menu lets you pick a role.")
    parser.add_argument("--version", action="version", version=f"cares {VERSION}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    orchestrator = commands.add_parser("orchestrator", help="create a cluster: serve workers, show the dashboard")
    orchestrator.add_argument("--listen", type=_listen_argument, default=DEFAULT_LISTEN, metavar="HOST:PORT",
                              help=f"address to listen on (default {DEFAULT_LISTEN}, all interfaces)")
    orchestrator.add_argument("--heartbeat-ms", type=_positive_int, default=DEFAULT_HEARTBEAT_MS, metavar="MS",
                              help=f"heartbeat interval asked of workers (default {DEFAULT_HEARTBEAT_MS})")
    orchestrator.add_argument("--max-nodes", type=_positive_int, default=DEFAULT_MAX_NODES, metavar="N",
                              help=f"refuse joins beyond N nodes (default {DEFAULT_MAX_NODES})")

    worker = commands.add_parser("worker", help="join a cluster and stream this machine's CPU and memory")
    worker.add_argument("orchestrator_address", type=_address_argument, metavar="HOST:PORT",
                        help="the orchestrator, e.g. 10.0.0.5:50051 or [fd00::5]:50051")
    worker.add_argument("--node-id", type=_node_id_argument, metavar="ID",
                        help="this worker's ID (default: short host name plus a random suffix)")

    status = commands.add_parser("status", help="print an orchestrator's node table")
    status.add_argument("orchestrator_address", type=_address_argument, metavar="HOST:PORT")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="give up after this long (default 5)")

    for command in (orchestrator, worker):
        command.add_argument("--headless", action="store_true",
                             help="no screen: one log line per event on stderr "
                                  "(automatic when stdout is not a terminal)")
    return parser


def print_event(event: Event) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at))
    print(f"{stamp} [{event.level}] {event.text}", file=sys.stderr, flush=True)


def wait_for_termination() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


def run_orchestrator_headless(args) -> int:
    orchestrator = Orchestrator(args.listen, heartbeat_ms=args.heartbeat_ms, max_nodes=args.max_nodes)
    orchestrator.registry.events.subscribe(print_event)
    try:
        orchestrator.start()
    except StartError as error:
        raise RuntimeFailure(str(error)) from None
    hosts = join_addresses(orchestrator.listen_host, orchestrator.port)
    orchestrator.registry.events.add("INFO", "Workers can join with: cares worker " + " | ".join(hosts))
    wait_for_termination()
    orchestrator.stop()
    return 0


def run_worker_headless(args) -> int:
    client = WorkerClient(args.orchestrator_address, args.node_id or default_node_id(), LocalSampler())
    client.events.subscribe(print_event)
    client.events.add("INFO", f"Worker '{client.node_id}' joining {client.target}.")
    client.start()
    wait_for_termination()
    client.stop()
    return 0


def run_status(args) -> int:
    try:
        rows = fetch_status(args.orchestrator_address, timeout=args.timeout)
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
            parser.print_usage(sys.stderr)
            raise UsageError("choose a command: orchestrator, worker or status")
        if args.command == "status":
            return run_status(args)
        if args.command == "orchestrator":
            return run_orchestrator_headless(args)
        return run_worker_headless(args)
    except SystemExit as exit_request:  # argparse's own usage errors, --help and --version
        return exit_request.code if isinstance(exit_request.code, int) else 2
    except UsageError as error:
        print(f"cares: {error}", file=sys.stderr)
        return 2
    except RuntimeFailure as error:
        print(f"cares: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
