"""Tests for cares: run with `python -m unittest test_cares`.

Everything network-facing uses real gRPC servers and clients on loopback with
ports the OS picks, real psutil and real threads, pipes or processes. Every
wait is bounded and every process is killed on cleanup. Tests assert bounds,
never timings: figures belong to bench_cares.py.

The classes follow cares.py's sections; the tools they share come first.
Fast inner loop (pure and in-process classes, a few seconds):
    python -m unittest test_cares.PureFunctionTest test_cares.NodeRegistryTest test_cares.TableLayoutTest
"""

import asyncio
import atexit
import collections
import contextlib
import dataclasses
import enum
import errno
import fcntl
import gc
import glob
import gzip
import http.client
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import pwd
import py_compile
import random
import re
import resource
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import textwrap
import time
import types
import unicodedata
import unittest
import urllib.parse
import urllib.request
import zipfile
import zipimport
from concurrent import futures
from unittest import mock

import cares  # first: it quiets gRPC's C-core logging before grpc is imported
import grpc
import psutil
import cluster_pb2 as pb
import cluster_pb2_grpc as pb_grpc
from asciimatics.event import KeyboardEvent
from asciimatics.exceptions import NextScene, StopApplication
from asciimatics.scene import Scene
from asciimatics.screen import Canvas, Screen
from pyz import bootstrap as pyz_bootstrap, build as pyz_build

HERE = os.path.dirname(os.path.abspath(__file__))
CARES_PY = os.path.join(HERE, "cares.py")
# Most child processes run cares from bytecode compiled here once, from this very cares.py: the
# same code, without every child compiling its 6,000 lines again (with PYTHONDONTWRITEBYTECODE
# nothing caches them). `python cares.pyc` runs it as the main module, as `python cares.py`
# does. Tests that pass source=True, the tmux panes, Prometheus' workers and the black-holed
# link run cares.py itself.
BYTECODE = tempfile.mkdtemp(prefix="cares-test-bytecode-")
atexit.register(shutil.rmtree, BYTECODE, True)
for _name in ("cares", "cluster_pb2", "cluster_pb2_grpc"):
    py_compile.compile(os.path.join(HERE, f"{_name}.py"), cfile=os.path.join(BYTECODE, f"{_name}.pyc"), doraise=True)
CARES = [sys.executable, os.path.join(BYTECODE, "cares.pyc")]
# Under CI, anything a test needs must be there: a missing tool fails instead of skipping.
IN_CI = os.environ.get("CARES_CI") == "1"
# Workers keep a node secret and an ID lock in their state directory: give the tests their own.
STATE_HOME = tempfile.mkdtemp(prefix="cares-test-state-")
os.environ["XDG_STATE_HOME"] = STATE_HOME
atexit.register(shutil.rmtree, STATE_HOME, True)


# ---------------------------------------------------------------------------
# Tools shared by every test class
# ---------------------------------------------------------------------------

def wait_until(predicate, timeout, interval=0.02):
    """Poll predicate until true; return seconds waited, or None on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    return None


def collections_started(test, counts, threshold=50):
    """The generations of the garbage collections that start while counts() is true, from now to
    the test's end, with the collector's first threshold this low: any burst of objects made with
    the collector on sets one off."""
    started = []

    def note(phase, info):
        if phase == "start" and counts():
            started.append(info["generation"])

    thresholds = gc.get_threshold()
    test.addCleanup(gc.set_threshold, *thresholds)
    gc.callbacks.append(note)
    test.addCleanup(gc.callbacks.remove, note)
    gc.collect()
    gc.set_threshold(threshold, *thresholds[1:])
    return started


def listening(address):
    """True once address (HOST:PORT) accepts TCP connections. Poll this, not a gRPC call, for a
    process that is still starting: a failed gRPC connect leaves the address in reconnect backoff
    for about a second, and every call to it meanwhile fails at once."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
            return True
    except OSError:
        return False


def run_side_by_side(commands, timeout=30):
    """[(argv, Popen keyword arguments)] run to the end at the same time (each mostly waits on its
    own start-up): a CompletedProcess for each, in order. Text pipes for stdout and stderr unless told."""
    processes = [subprocess.Popen(argv, **{"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE,
                                           "stderr": subprocess.PIPE, "text": True, **options})
                 for argv, options in commands]
    try:
        results = []
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def status_of(registry, node_id):
    node = registry.get(node_id)
    return node.status if node is not None else None


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def values(cpu=10.0, memory=20.0, **more):
    return cares.Metrics(cpu_percent=cpu, memory_percent=memory, **more)


def joined(registry, node_id, address="10.0.0.1:5000", secret="", **info):
    """Join and bind a stream in the registry directly; returns the session."""
    session = registry.join(node_id, address, cares.JoinInfo(**info), secret)
    registry.attach_stream(node_id, session)
    return session


def active(registry, node_id, cpu=10.0, memory=20.0, **info):
    """A node with one accepted sample; returns the session."""
    session = joined(registry, node_id, **info)
    registry.update(node_id, session, values(cpu, memory), 1)
    return session


class FixedSampler(cares.LocalSampler):
    """A worker's sampler that reports chosen values, so a test can follow them end to end."""

    def __init__(self, cpu, memory):
        super().__init__()
        self.cpu, self.memory = cpu, memory

    def sample(self):
        return cares.Metrics(cpu_percent=self.cpu, memory_percent=self.memory,
                             memory_used_bytes=int(self.memory * 1e7), memory_total_bytes=10**9)


def cpu_of(registry, node_id):
    node = registry.get(node_id)
    return node.metrics.cpu_percent if node is not None and node.metrics is not None else None


def raw_stub(test, port, host="127.0.0.1"):
    channel = grpc.insecure_channel(cares.format_address(host, port))
    test.addCleanup(channel.close)
    return pb_grpc.ClusterServiceStub(channel)


def metrics(node_id, session_id, sequence, cpu=10.0, memory=20.0, **fields):
    fields.setdefault("sent_at_ms", int(time.time() * 1000))
    return pb.NodeMetrics(node_id=node_id, session_id=session_id, cpu_percent=cpu, memory_percent=memory,
                          sequence=sequence, **fields)


class OpenStream:
    """A raw Heartbeat stream whose messages the test sends one by one."""

    def __init__(self, test, stub, node_id=None, session_id=None):
        self._queue = []
        self._ready = threading.Condition()
        self._closed = False
        identity = ((cares.NODE_METADATA_KEY, node_id), (cares.SESSION_METADATA_KEY, session_id))
        self.replies = stub.Heartbeat(self._messages(), timeout=30,
                                      metadata=identity if node_id is not None else None)
        test.addCleanup(self.close)

    def _messages(self):
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._queue or self._closed, timeout=30)
                if not self._queue:
                    return
                message = self._queue.pop(0)
            yield message

    def send(self, *messages):
        with self._ready:
            self._queue.extend(messages)
            self._ready.notify()

    def close(self):
        with self._ready:
            self._closed = True
            self._ready.notify()

    def outcome(self):
        """The status code the orchestrator ended the stream with (commands before it are skipped)."""
        try:
            list(self.replies)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK


class LineCollector:
    """Reads a stream of text lines on a thread, keeping (monotonic time, line)."""

    def __init__(self, stream):
        self.lines = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self.lines.append((time.monotonic(), line))

    def first_after(self, start, needle):
        return next((at for at, line in list(self.lines) if at >= start and needle in line), None)

    def text(self):
        return "".join(line for _, line in list(self.lines))


def file_text(path):
    with open(path, encoding="utf-8", errors="replace") as file:
        return file.read()


def texts(events, count=1000):
    return [event.text for event in events.tail(count)]


class ClusterTestCase(unittest.TestCase):
    """Orchestrators and workers, in-process or as processes, that clean up after themselves."""

    def start_orchestrator(self, listen="127.0.0.1:0", **options):
        orchestrator = cares.Orchestrator(listen, **options)
        orchestrator.start()
        self.addCleanup(orchestrator.stop, 0.2)
        return orchestrator

    def start_worker(self, orchestrator, node_id, sampler=None, port=None, **options):
        client = cares.WorkerClient(f"127.0.0.1:{port or orchestrator.port}", node_id,
                                    sampler or cares.LocalSampler(), **options)
        client.start()
        self.addCleanup(client.stop, False, 0.5)
        return client

    def assert_streaming(self, registry, node_id, timeout=10):
        """Wait until the node has joined and its heartbeat stream is open."""
        self.assertIsNotNone(wait_until(lambda: (registry.get(node_id) or cares.Node("")).streaming, timeout),
                             f"{node_id} never opened its heartbeat stream")

    def assert_becomes(self, registry, node_id, status, timeout):
        waited = wait_until(lambda: status_of(registry, node_id) == status, timeout)
        self.assertIsNotNone(waited, f"{node_id} not {status} within {timeout} s "
                                     f"(is {status_of(registry, node_id)})")
        return waited

    def spawn(self, *args, stderr=subprocess.PIPE, source=False, **kwargs):
        """cares as a process (stdout and stderr piped unless told otherwise); cares.py itself
        with source=True, else its bytecode (see CARES)."""
        command = [sys.executable, CARES_PY] if source else CARES
        process = subprocess.Popen([*command, *args], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=stderr, text=True, **kwargs)

        def reap():
            if process.poll() is None:
                process.kill()
            with contextlib.suppress(ValueError, OSError, subprocess.TimeoutExpired):
                process.communicate(timeout=10)
        self.addCleanup(reap)
        return process

    def spawn_script(self, script, *args):
        """A Python script (using cares from this folder, as bytecode: see CARES) as a process,
        killed on cleanup."""
        process = subprocess.Popen([sys.executable, "-c", script, *args], cwd=BYTECODE, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.kill)
        return process

    def run_cares(self, *args, timeout=30, source=False, **kwargs):
        """cares run to the end as a process (cares.py itself with source=True, else its
        bytecode): (exit code, stdout, stderr) in a CompletedProcess."""
        command = [sys.executable, CARES_PY] if source else CARES
        return subprocess.run([*command, *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)

    def exit_code(self, *args):
        """cares.main() run in this process, for commands whose exit code is all that is checked;
        returns (code, what it wrote to stderr)."""
        result = self.run_main(*args)
        return result.returncode, result.stderr

    def run_main(self, *args):
        """cares.main() run in this process (no interpreter to start): its exit code, what it
        printed and what it wrote to descriptor 2, in a CompletedProcess like run_cares gives.
        For commands that print and return; a test that uses it keeps one run_cares of its own."""
        with tempfile.TemporaryFile() as sink, contextlib.redirect_stdout(io.StringIO()) as printed:
            saved = os.dup(2)
            sys.stderr.flush()
            os.dup2(sink.fileno(), 2)
            try:
                code = cares.main(list(args))
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
            sink.seek(0)
            return subprocess.CompletedProcess(["cares", *args], code, printed.getvalue(),
                                               sink.read().decode(errors="replace"))

    def assert_one_line_error(self, result, code):
        self.assertEqual(result.returncode, code, result)
        self.assertNotIn("Traceback", result.stderr)
        self.assertNotIn("Traceback", result.stdout or "")
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)


# ---------------------------------------------------------------------------
# 1. Pure functions: text, addresses, formats
# ---------------------------------------------------------------------------

class PureFunctionTest(unittest.TestCase):
    def test_a_sample_off_the_wire_and_its_checks_agree_with_reading_field_by_field(self):
        # metrics_from_message takes a shortcut (every field read in one call, presence asked only
        # of a sample with a 0 in it): over fields absent, zero, negative, huge, infinite and NaN
        # it must give what asking each field gives, and metrics_problem what checking each does.
        def by_field(message):
            return cares.Metrics(*[getattr(message, name) if name in cares.FIRST_RELEASE_METRICS
                                   or message.HasField(name) else None for name in cares.METRIC_NAMES])

        def problem_by_field(metrics):
            if metrics.cpu_percent is None or metrics.memory_percent is None:
                return "no CPU or memory value"
            for name in cares.METRIC_NAMES:  # percentages first, then the rest
                value = getattr(metrics, name)
                if name in cares.PERCENT_METRICS and value is not None and not 0.0 <= value <= 100.0:
                    return f"{name} outside 0-100"
            for name in cares.METRIC_NAMES:
                value = getattr(metrics, name)
                if name not in cares.PERCENT_METRICS and value is not None and not 0.0 <= value < math.inf:
                    return f"{name} is not a finite, non-negative number"
            return None
        rng = random.Random(7)
        choices = (0.0, -0.0, 1e-300, 37.5, 99.999, 100.0, 100.01, -1.0, 1e308, math.inf, -math.inf, math.nan)
        whole = {"memory_used_bytes", "memory_total_bytes", "root_fs_size_bytes"}  # uint64 on the wire
        problems = collections.Counter()
        for _ in range(3000):
            fields = {name: rng.choice((0, 1, 1 << 40, (1 << 64) - 1)) if name in whole else
                      rng.choice(choices) if rng.random() < 0.3 else rng.uniform(0.0, 100.0)
                      for name in cares.METRIC_NAMES if rng.random() < 0.9}
            message = pb.NodeMetrics.FromString(pb.NodeMetrics(**fields).SerializeToString())
            metrics = cares.metrics_from_message(message)
            expected = by_field(message)
            self.assertEqual([repr(value) for value in metrics], [repr(value) for value in expected], fields)
            problem = cares.metrics_problem(metrics)
            self.assertEqual(problem, problem_by_field(metrics), fields)
            problems[problem is None] += 1
        self.assertGreater(min(problems.values()), 300, problems)  # both outcomes, many times

    def test_bar_text_in_unicode_and_ascii(self):
        self.assertEqual(cares.bar_text(0, 10), " " * 10)
        self.assertEqual(cares.bar_text(100, 10), "█" * 10)
        self.assertEqual(cares.bar_text(37.5, 10), "███▊      ")
        self.assertEqual(cares.bar_text(37.5, 8, cares.ASCII_GLYPHS), "|||     ")
        self.assertEqual(cares.bar_text(0, 4, cares.ASCII_GLYPHS), "    ")
        self.assertEqual(cares.bar_text(100, 4, cares.ASCII_GLYPHS), "||||")
        for percent in (-5, 0, 12.3, 37.5, 99.99, 100, 250, float("nan"), float("inf")):
            self.assertEqual(len(cares.bar_text(percent, 17)), 17, percent)
        self.assertEqual(cares.bar_text(50, 0), "")

    def test_bar_level_thresholds(self):
        self.assertEqual(cares.bar_level(0), "low")
        self.assertEqual(cares.bar_level(59.9), "low")
        self.assertEqual(cares.bar_level(60), "medium")
        self.assertEqual(cares.bar_level(84.9), "medium")
        self.assertEqual(cares.bar_level(85), "high")
        self.assertEqual(cares.bar_level(float("nan")), "low")

    def test_overlapping_bursts_pause_the_collector_until_the_last_ends(self):
        self.assertTrue(gc.isenabled())
        scrape, redraw = cares.collection_deferred(), cares.collection_deferred()
        scrape.__enter__()
        redraw.__enter__()
        scrape.__exit__(None, None, None)
        self.assertFalse(gc.isenabled())  # the redraw still runs
        redraw.__exit__(None, None, None)
        self.assertTrue(gc.isenabled())
        gc.disable()  # switched off by someone else: the bursts leave it off
        try:
            with cares.collection_deferred():
                pass
            self.assertFalse(gc.isenabled())
        finally:
            gc.enable()

    def test_clamp_percent(self):
        self.assertEqual(cares.clamp_percent(-3), 0.0)
        self.assertEqual(cares.clamp_percent(101), 100.0)
        self.assertEqual(cares.clamp_percent(float("nan")), 0.0)
        self.assertEqual(cares.clamp_percent(float("-inf")), 0.0)
        self.assertEqual(cares.clamp_percent(42.5), 42.5)

    def test_parse_address_accepts(self):
        cases = {
            "127.0.0.1:50051": ("127.0.0.1", 50051),
            " example.com:1 ": ("example.com", 1),
            "[::1]:50051": ("::1", 50051),
            "[fd00::5]:65535": ("fd00::5", 65535),
            "my-host.local.:8080": ("my-host.local.", 8080),
            "localhost:50051": ("localhost", 50051),
            "my_host:50051": ("my_host", 50051),  # Docker Compose service names
            "bücher.example:1": ("xn--bcher-kva.example", 1),  # internationalised: sent as DNS spells it
        }
        for text, expected in cases.items():
            self.assertEqual(cares.parse_address(text), expected, text)
        self.assertEqual(cares.parse_address("[::]:0", allow_port_zero=True), ("::", 0))

    def test_parse_address_rejects_with_the_real_reason(self):
        cases = {"": "enter an address", "127.0.0.1": "missing :PORT", "127.0.0.1:": "is not a number",
                 ":50051": "missing host", "::1:50051": "brackets", "[::1]50051": "missing :PORT",
                 "[::1:5": "missing ']'", "[nothex]:1": "not an IPv6 address", "host:0": "port must be",
                 "host:65536": "port must be", "host:-1": "not a number", "host:5e3": "not a number",
                 "host:١٢": "not a number", "-lead.example:1": "not a valid host name",
                 "256.1.1.1:1": "not a valid IPv4", "1.2.3:1": "not a valid IPv4", "exa mple:1": "space",
                 "a" * 400 + ":1": "too long", "host:port": "not a number", "\x1b[31m:1": "control character",
                 "dns:///orch:50051": "not a host name", "a:b:1": "not a host name"}
        for text, reason in cases.items():
            with self.assertRaises(ValueError, msg=repr(text)) as caught:
                cares.parse_address(text)
            message = str(caught.exception)
            self.assertIn(reason, message, repr(text))
            self.assertTrue("\n" not in message and "\x1b" not in message, repr(message))
        # The worker's address may also be a gRPC target URI.
        self.assertEqual(cares.parse_target("dns:///orch:50051"), "dns:///orch:50051")
        self.assertEqual(cares.parse_target("dns://10.0.0.53/my_host:1"), "dns://10.0.0.53/my_host:1")
        self.assertEqual(cares.parse_target("unix:/run/cares.sock"), "unix:/run/cares.sock")
        self.assertEqual(cares.parse_target(" orch:7 "), "orch:7")
        for bad in ("dns:", "dns://x", "dns:///orch", "unix:", "ipv4:\x1b"):
            with self.assertRaises(ValueError, msg=bad):
                cares.parse_target(bad)

    def test_parse_address_fuzz_never_raises_anything_but_value_error(self):
        rng = random.Random(1234)
        alphabet = "0123456789abcdef:[].-_ \t\x00\x1b\u202eé٣/"
        for _ in range(3000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            for parse in (cares.parse_address, cares.parse_target):
                try:
                    result = parse(text)
                except ValueError:
                    continue
                if parse is cares.parse_address:
                    host, port = result
                    self.assertTrue(1 <= port <= 65535)
                    self.assertEqual(cares.parse_address(cares.format_address(host, port)), (host, port))

    def test_node_id_rules_and_stable_default(self):
        for good in ("a", "web-01", "node_1.prod", "x" * 63):
            self.assertTrue(cares.is_valid_node_id(good), good)
        for bad in ("", "x" * 64, "has space", "tab\t", "ünï", "a/b", "\x1b[2J", "a\nb"):
            self.assertFalse(cares.is_valid_node_id(bad), bad)
        first = cares.default_node_id("web01.example.com", "0123abcd", "root")
        self.assertEqual(first, cares.default_node_id("web01.example.com", "0123abcd", "root"), "not stable")
        self.assertRegex(first, r"^web01-[0-9a-f]{6}$")
        # Clones sharing a host name, and two users of one machine, still differ.
        self.assertNotEqual(first, cares.default_node_id("web01.example.com", "ffff0000", "root"))
        self.assertNotEqual(first, cares.default_node_id("web01.example.com", "0123abcd", "alice"))
        for odd in ("", "....", "ünïcode host!", "x" * 300):
            self.assertTrue(cares.is_valid_node_id(cares.default_node_id(odd, "", "")), odd)

    def test_labels_tokens_and_durations(self):
        self.assertEqual(cares.parse_label("rack=b-12"), ("rack", "b-12"))
        self.assertEqual(cares.parse_label("env=prod=eu"), ("env", "prod=eu"))
        for bad in ("novalue", "Bad=x", "=x", "k" * 64 + "=x", "k=" + "v" * 129, "k=a\nb", "k=\x1b"):
            with self.assertRaises(ValueError, msg=bad):
                cares.parse_label(bad)
        self.assertIn("more than 16", cares.labels_problem({f"k{n}": "v" for n in range(17)}))
        self.assertIsNone(cares.labels_problem({"role": "web", "team.a": ""}))
        for good in ("s3cret", "a" * 256, "with inner space"):
            self.assertTrue(cares.is_valid_token(good), good)
        for bad in ("", "pässwort", "tab\tbed", " padded", "a" * 257, "line\n"):
            self.assertFalse(cares.is_valid_token(bad), bad)
        self.assertEqual([cares.parse_duration(text) for text in ("90s", "30m", "24h", "7d", "15", "0")],
                         [90, 1800, 86400, 604800, 15, 0])
        for bad in ("", "1w", "-1h", "nanh", "inf"):
            with self.assertRaises(ValueError, msg=bad):
                cares.parse_duration(bad)
        self.assertEqual(cares.format_duration(86400), "1d")
        self.assertEqual(cares.format_duration(90), "90s")

    def test_sanitize_text_strips_terminal_controls(self):
        hostile = "ok\x1b[2J\x1b]0;pwned\x07\r\n\t\u202eevil\u200b\x00end"
        clean = cares.sanitize_text(hostile)
        for char in clean:
            self.assertNotIn(unicodedata.category(char), {"Cc", "Cf"}, repr(clean))
        self.assertTrue(clean.startswith("ok?[2J?]0;pwned?"), clean)
        self.assertEqual(len(cares.sanitize_text("x" * 10_000, 64)), 64)
        self.assertTrue(cares.sanitize_text("x" * 100, 10).endswith("…"))
        self.assertEqual(cares.sanitize_text("plain-host_1.lan"), "plain-host_1.lan")

    def test_peer_addresses(self):
        self.assertEqual(cares.peer_to_address("ipv4:10.0.0.5:4242"), "10.0.0.5:4242")
        self.assertEqual(cares.peer_to_address("ipv6:%5B::1%5D:4242"), "[::1]:4242")
        self.assertEqual(cares.peer_host("ipv6:%5B::1%5D:4242"), "::1")
        self.assertEqual(cares.peer_host("ipv4:10.0.0.5:4242"), "10.0.0.5")
        self.assertEqual(cares.peer_to_address("unix:/tmp/x\x1b"), "unix:/tmp/x?")
        self.assertEqual(cares.host_of("[fd00::1]:5"), "fd00::1")

    def test_formatting_helpers(self):
        self.assertEqual(cares.format_age(0.2), "now")
        self.assertEqual(cares.format_age(2.7), "2s ago")
        self.assertEqual(cares.format_age(125), "2m ago")
        self.assertEqual(cares.format_age(7300), "2h ago")
        self.assertEqual(cares.format_age(-5), "now")
        self.assertEqual(cares.format_bytes(512), "512 B")
        self.assertEqual(cares.format_bytes(3 * 1024**3), "3.0 GiB")
        self.assertEqual(cares.format_percent(None), "–")
        self.assertEqual(cares.format_percent(None, unicode=False), "-")
        self.assertEqual(cares.format_percent(0.0), "0.0%")
        self.assertEqual(cares.fit("abcdef", 4), "abc…")
        self.assertEqual(cares.fit("ab", 4), "ab  ")
        self.assertEqual(cares.sparkline([0, 50, 100], 5), "  ▁▄█")
        self.assertEqual(cares.sparkline(range(100), 3, cares.ASCII_GLYPHS), "###")

    def test_backoff_grows_and_is_capped(self):
        rng = random.Random(7)
        delays = [cares.backoff_delay(failures, rng) for failures in range(12)]
        self.assertTrue(0.25 <= delays[0] <= 0.5, delays)
        self.assertTrue(all(delay <= cares.MAX_BACKOFF_S for delay in delays), delays)
        self.assertGreaterEqual(delays[-1], cares.MAX_BACKOFF_S / 2)

    def test_token_failure_delays_grow_then_cap(self):
        delays = [cares.token_failure_delay(n) for n in range(1, 20)]
        self.assertEqual(delays[:cares.TOKEN_FREE_FAILURES], [0.0] * cares.TOKEN_FREE_FAILURES)
        self.assertEqual(delays, sorted(delays))
        self.assertEqual(max(delays), 2.0)

    def test_join_addresses_lists_interfaces_for_wildcards(self):
        entry = cares.collections.namedtuple("snicaddr", "family address")
        interfaces = {"lo": [entry(socket.AF_INET, "127.0.0.1")],
                      "eth0": [entry(socket.AF_INET, "10.0.0.5"), entry(socket.AF_INET6, "fe80::1")]}
        self.assertEqual(cares.join_addresses("::", 50051, interfaces), ["10.0.0.5:50051", "127.0.0.1:50051"])
        self.assertEqual(cares.join_addresses("10.1.1.1", 7, interfaces), ["10.1.1.1:7"])
        self.assertEqual(cares.join_addresses("::", 7, {"eth0": [entry(socket.AF_INET6, "fd00::1")]}), ["[::]:7"])

    def test_status_table_shows_dashes_for_what_was_never_measured(self):
        rows = [{"node_id": "w1", "address": "1.2.3.4:5", "hostname": "web1", "status": "Active",
                 "cpu_percent": 12.5, "memory_percent": 40.0, "last_seen": 1000.0},
                {"node_id": "w2", "address": "1.2.3.4:6", "hostname": "", "status": "Joining", "cpu_percent": None,
                 "memory_percent": None, "last_seen": None}]
        table = cares.format_status_table(rows, now=1003.0)
        self.assertRegex(table, r"w1 +web1 +Active +12.5% +40.0%  3s ago")
        self.assertRegex(table, r"w2 +1.2.3.4:6 +Joining +- +-  -")
        self.assertNotRegex(table, r"(?<!\d)0\.0%")
        self.assertIn("no workers", cares.format_status_table([]))

    def test_event_lines_for_text_journald_and_json(self):
        event = cares.Event(1795842667.25, cares.Level.WARN, "Node 'w1' lost: gone.", cares.EventKind.LOST, "w1",
                            {"hostname": "web1", "cpu_percent": None})
        self.assertRegex(cares.event_line(event, cares.LogStyle.TEXT),
                         r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[WARN\] Node 'w1' lost: gone\.$")
        self.assertEqual(cares.event_line(event, cares.LogStyle.JOURNALD), "<4>Node 'w1' lost: gone.")
        record = json.loads(cares.event_line(event, cares.LogStyle.JSON))
        self.assertEqual(record, {"ts": "2026-11-28T05:11:07.250Z", "level": "warn", "event": "lost",
                                  "node_id": "w1", "message": "Node 'w1' lost: gone.", "hostname": "web1",
                                  "cpu_percent": None})

    def test_repeat_summary_says_once_then_counts(self):
        summary = cares.RepeatSummary(window_s=10, max_keys=2)
        self.assertTrue(summary.note("a", 0.0))
        self.assertFalse(any(summary.note("a", 1.0) for _ in range(99)))
        self.assertTrue(summary.note("b", 1.0))
        self.assertFalse(summary.note("c", 1.0))  # over max_keys: counted under None, never said at once
        self.assertEqual(summary.due(5.0), [])
        self.assertEqual(sorted(summary.due(11.5), key=str), [("a", 99, 11.5), (None, 1, 10.5)])
        self.assertEqual(summary.due(30.0), [])  # quiet since: forgotten
        self.assertTrue(summary.note("a", 31.0))


# ---------------------------------------------------------------------------
# 2. Local sampling
# ---------------------------------------------------------------------------

class LocalSamplerTest(unittest.TestCase):
    def test_samples_are_real_and_shared(self):
        sampler = cares.LocalSampler(max_age=0.3)
        first = sampler.sample()
        self.assertTrue(0.0 <= first.cpu_percent <= 100.0)
        self.assertTrue(0.0 < first.memory_percent < 100.0)
        self.assertEqual(first.memory_total_bytes, cares.psutil.virtual_memory().total)
        self.assertAlmostEqual(first.memory_used_bytes / first.memory_total_bytes * 100,
                               first.memory_percent, delta=2.0)
        self.assertIs(sampler.sample(), first)
        time.sleep(0.35)
        self.assertIsNot(sampler.sample(), first)

    def test_every_metric_is_measured_from_this_machine(self):
        sampler = cares.LocalSampler(max_age=0.0)
        time.sleep(0.2)
        sample = sampler.sample()
        self.assertIsNone(cares.metrics_problem(sample))
        for name in cares.METRIC_NAMES:
            self.assertIsNotNone(getattr(sample, name), name)
        self.assertEqual(sample.load_average_1m, os.getloadavg()[0])
        self.assertAlmostEqual(sample.boot_time_unix_s, cares.psutil.boot_time(), delta=1)
        disk = cares.psutil.disk_usage("/")
        self.assertEqual(sample.root_fs_size_bytes, disk.total)
        self.assertAlmostEqual(sample.root_fs_used_percent, disk.percent, delta=0.2)
        # Traffic we make ourselves shows up in the receive rate... unless it only crosses loopback,
        # which is left out: so the rate stays a small number while we pump loopback.
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            with socket.create_connection(server.getsockname()) as client:
                peer, _ = server.accept()
                with peer:
                    for _ in range(200):
                        client.sendall(b"x" * 65536)
                        peer.recv(1 << 20)
        pumped = sampler.sample()
        self.assertLess(pumped.net_receive_bytes_per_s, 5e6, "loopback traffic was counted")

    @unittest.skipUnless(sys.platform.startswith("linux"), "/proc is read directly on Linux only")
    def test_the_direct_proc_readings_are_psutils_figures(self):
        """Each counter cares reads from /proc lies between psutil's readings just before and just
        after (the counters only grow), and the fixed sizes are equal."""
        memory = cares.proc_meminfo()
        self.assertEqual(memory[b"MemTotal"], cares.psutil.virtual_memory().total)
        self.assertEqual(memory[b"SwapTotal"], cares.psutil.swap_memory().total)
        ticks = os.sysconf("SC_CLK_TCK")

        def psutil_cpu():
            times = cares.psutil.cpu_times()
            total = sum(times) - times.guest - times.guest_nice
            return round((total - times.idle - times.iowait) * ticks), round(total * ticks)

        before, direct, after = psutil_cpu(), cares.proc_cpu_times(), psutil_cpu()
        for index in (0, 1):
            self.assertTrue(before[index] - 1 <= direct[index] <= after[index] + 1, (before, direct, after))
        disks, nics = cares.physical_disks(), cares.non_loopback_interfaces()
        sources = ((lambda: {name: (io.read_bytes, io.write_bytes)
                             for name, io in cares.psutil.disk_io_counters(perdisk=True).items() if name in disks},
                    lambda: cares.proc_counters("/proc/diskstats", frozenset(name.encode() for name in disks),
                                                cares.DISKSTAT_BYTES, cares.SECTOR_BYTES)),
                   (lambda: {name: (io.bytes_recv, io.bytes_sent)
                             for name, io in cares.psutil.net_io_counters(pernic=True).items() if name in nics},
                    lambda: cares.proc_counters("/proc/net/dev", frozenset(name.encode() for name in nics),
                                                cares.NETDEV_BYTES)))
        for from_psutil, from_proc in sources:
            before, direct, after = from_psutil(), from_proc(), from_psutil()
            self.assertEqual(set(direct), {name.encode() for name in before})
            for name, values in before.items():
                for low, value, high in zip(values, direct[name.encode()], after[name]):
                    self.assertTrue(low <= value <= high, (name, values, direct[name.encode()], after[name]))

    def test_device_counters_are_found_by_whole_name_in_either_layout(self):
        folder = tempfile.mkdtemp(prefix="cares-test-proc-")
        self.addCleanup(shutil.rmtree, folder, True)
        os.makedirs(os.path.join(folder, "net"))
        with open(os.path.join(folder, "diskstats"), "w") as f:
            f.write("   8       0 sda 10 0 200 0 5 0 300 0 0 0 0\n"
                    "   8       1 sda1 99 0 999 0 99 0 999 0 0 0 0\n"
                    " 259       0 nvme0n1 1 0 4 0 1 0 8 0 0 0 0 0 0 0 0 0 0\n")
        with open(os.path.join(folder, "net", "dev"), "w") as f:
            f.write("Inter-|   Receive\n face |bytes    packets\n"
                    "    lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n"
                    "  eth0:12345678901 7 0 0 0 0 0 0 42 3 0 0 0 0 0 0\n"
                    "eth0.100: 1 1 0 0 0 0 0 0 2 1 0 0 0 0 0 0\n")
        disks = cares.proc_counters(os.path.join(folder, "diskstats"), frozenset({b"sda", b"nvme0n1", b"vdz"}),
                                    cares.DISKSTAT_BYTES, cares.SECTOR_BYTES)
        self.assertEqual(disks, {b"sda": (200 * 512, 300 * 512), b"nvme0n1": (4 * 512, 8 * 512)})
        nics = cares.proc_counters(os.path.join(folder, "net", "dev"), frozenset({b"eth0"}), cares.NETDEV_BYTES)
        self.assertEqual(nics, {b"eth0": (12345678901, 42)})
        self.assertEqual(cares.proc_counters(os.path.join(folder, "diskstats"), frozenset(), cares.DISKSTAT_BYTES), {})

    def test_a_proc_file_kept_open_is_read_afresh_and_whole(self):
        files = cares.ProcFiles(first_size=16)
        self.addCleanup(files.close)
        folder = tempfile.mkdtemp(prefix="cares-test-procfiles-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "grows")
        with open(path, "wb") as f:
            f.write(b"short\n")
        self.assertEqual(files.read(path), b"short\n")
        with open(path, "ab") as f:
            f.write(b"x" * 100 + b"\n")  # past the first read size: read again, twice as large, until whole
        self.assertEqual(files.read(path), b"short\n" + b"x" * 100 + b"\n")
        if sys.platform.startswith("linux"):
            # The kernel makes /proc/stat again at each read from its start: the counters move on.
            before = cares.proc_cpu_times(files.read)
            deadline = time.monotonic() + 5.0
            while cares.proc_cpu_times(files.read)[1] <= before[1] + 2 and time.monotonic() < deadline:
                sum(range(10000))
            after = cares.proc_cpu_times(files.read)
            self.assertGreater(after[1], before[1])
            self.assertGreaterEqual(after[0], before[0])
            self.assertEqual(len(files._open), 2, "a descriptor per file, opened once")

    def test_a_proc_that_cannot_be_read_leaves_psutil_to_measure(self):
        sampler = cares.LocalSampler(max_age=0.0)
        with mock.patch.object(cares.ProcFiles, "read", side_effect=PermissionError(errno.EACCES, "denied")):
            sampler.sample()
            time.sleep(0.15)
            sample = sampler.sample()
        self.assertFalse(sampler._from_proc)
        self.assertIsNone(cares.metrics_problem(sample))
        for name in cares.METRIC_NAMES:
            self.assertIsNotNone(getattr(sample, name), name)
        self.assertEqual(sample.memory_total_bytes, cares.psutil.virtual_memory().total)

    def test_a_hung_root_file_system_stales_its_figure_and_never_holds_a_sample(self):
        """statvfs() of / blocks for as long as the file system does. Samples go on at once with
        the last reading, one thread waits on the hung read (not one per sample), and the next
        reading after it returns is what samples carry."""
        sampler = cares.LocalSampler(max_age=0.0)
        first = sampler.sample()
        self.assertIsNotNone(first.root_fs_used_percent)
        released, entered, sampling_thread = threading.Event(), threading.Event(), threading.current_thread()

        def hung_statvfs():
            if threading.current_thread() is sampling_thread:
                raise AssertionError("the sample itself called statvfs()")
            entered.set()
            released.wait(10.0)
            return 42.5, 123 << 30
        self.addCleanup(released.set)
        with mock.patch.object(cares, "ROOT_FS_REFRESH_S", 0.0), \
                mock.patch.object(cares, "_root_fs_usage", side_effect=hung_statvfs) as statvfs:
            samples = []
            for _ in range(20):
                samples.append(sampler.sample())
                self.assertTrue(entered.wait(5.0))
            self.assertEqual(statvfs.call_count, 1, "a second thread started while the first read hung")
            self.assertEqual({(s.root_fs_used_percent, s.root_fs_size_bytes) for s in samples},
                             {(first.root_fs_used_percent, first.root_fs_size_bytes)})
            self.assertEqual(sum(t.name == "cares-statvfs" for t in threading.enumerate()), 1)
            released.set()
            self.assertIsNotNone(wait_until(lambda: sampler.sample().root_fs_used_percent == 42.5, 5.0))
            self.assertEqual(sampler.sample().root_fs_size_bytes, 123 << 30)

    def test_counter_rates_never_go_negative(self):
        rates = cares.CounterRates()
        self.assertIsNone(rates.update({"sda": (1000, 0)}, 10.0))
        self.assertEqual(rates.update({"sda": (3000, 500)}, 12.0), (1000.0, 250.0))
        # The counter went back (device reset): that device adds nothing this time, never a negative rate.
        self.assertEqual(rates.update({"sda": (10, 600), "sdb": (5, 5)}, 13.0), (0.0, 100.0))
        self.assertEqual(rates.update({"sda": (110, 600), "sdb": (5, 5)}, 14.0), (100.0, 0.0))
        self.assertEqual(rates.update({}, 15.0), ())


# ---------------------------------------------------------------------------
# 3. NodeRegistry
# ---------------------------------------------------------------------------

class NodeRegistryTest(unittest.TestCase):
    def test_a_session_id_in_any_text_is_refused_not_an_error(self):
        registry = cares.NodeRegistry()
        registry.join("n", "127.0.0.1:1", cares.JoinInfo(hostname="n"))
        for lie in ("é", "\ud800", "x" * 1000):
            with self.assertRaises(cares.Refusal) as refused:
                registry.attach_stream("n", lie)
            self.assertIs(refused.exception.reason, cares.RefusalReason.NO_SESSION)

    def test_join_stream_sample_disconnect_and_events(self):
        registry = cares.NodeRegistry()
        session = registry.join("xyz-123", "10.0.0.9:4000", cares.JoinInfo(hostname="web", labels={"role": "db"}))
        self.assertIsNone(registry.get("xyz-123"), "a join alone made a row")
        self.assertEqual(registry.attach_stream("xyz-123", session), "")
        node = registry.get("xyz-123")
        self.assertEqual((node.status, node.metrics, node.last_seen), (cares.NodeStatus.JOINING, None, 0.0))
        registry.update("xyz-123", session, values(12.5, 40.0), 1)
        node = registry.get("xyz-123")
        self.assertEqual((node.status, node.metrics.cpu_percent, node.metrics.memory_percent, node.address,
                          node.hostname, node.labels),
                         (cares.NodeStatus.ACTIVE, 12.5, 40.0, "10.0.0.9:4000", "web", {"role": "db"}))
        self.assertEqual(list(node.history.cpu), [12.5])
        self.assertAlmostEqual(node.last_seen, time.time(), delta=2)
        self.assertTrue(registry.disconnect("xyz-123", session, "gone"))
        self.assertEqual(status_of(registry, "xyz-123"), cares.NodeStatus.DISCONNECTED)
        with self.assertRaises(cares.Refusal) as caught:
            registry.update("xyz-123", session, values(1, 1), 2)
        self.assertEqual(caught.exception.reason, cares.RefusalReason.SESSION_ENDED)
        second = active(registry, "xyz-123")
        self.assertNotEqual(second, session)
        self.assertFalse(registry.disconnect("xyz-123", session, "stale stream ending"))
        events = registry.events.tail(10)
        self.assertEqual([(event.text, event.kind) for event in events],
                         [("Node 'xyz-123' has joined the cluster.", cares.EventKind.JOINED),
                          ("Node 'xyz-123' lost: gone.", cares.EventKind.LOST),
                          ("Node 'xyz-123' has rejoined the cluster.", cares.EventKind.REJOINED)])
        self.assertEqual(events[1].values["hostname"], "web")
        self.assertEqual(events[1].values["cpu_percent"], 12.5)

    def test_a_join_alone_never_revives_a_lost_node_and_expires(self):
        registry = cares.NodeRegistry(heartbeat_interval=0.05)
        session = active(registry, "victim", cpu=33.0)
        registry.disconnect("victim", session, "killed")
        seen = registry.get("victim").last_seen
        for _ in range(5):  # someone re-joins the dead node's ID and never opens a stream
            last = registry.join("victim", "10.6.6.6:1", cares.JoinInfo())
            time.sleep(0.05)
        node = registry.get("victim")
        self.assertEqual((node.status, node.last_seen, node.metrics.cpu_percent),
                         (cares.NodeStatus.DISCONNECTED, seen, 33.0))
        time.sleep(0.2)
        registry.expire()
        with self.assertRaises(cares.Refusal) as caught:  # its last pending join expired with the silence limit
            registry.attach_stream("victim", last)
        self.assertEqual(caught.exception.reason, cares.RefusalReason.NO_SESSION)
        self.assertEqual(registry.refusals.counts()[("join", cares.RefusalReason.JOIN_EXPIRED)], 1)
        self.assertIn("Join from 10.6.6.6 refused: no heartbeat stream after the join.", texts(registry.events))

    def test_pending_joins_hold_no_slots(self):
        registry = cares.NodeRegistry(max_nodes=5, heartbeat_interval=0.05)
        for number in range(50):
            registry.join(f"squat-{number}", "10.6.6.6:1", cares.JoinInfo())
        self.assertEqual(len(registry), 0)
        active(registry, "genuine")
        self.assertEqual(status_of(registry, "genuine"), cares.NodeStatus.ACTIVE)
        for number in range(cares.PENDING_JOINS_LIMIT + 10):
            registry.join(f"flood-{number}", "10.6.6.6:1", cares.JoinInfo())
        self.assertLessEqual(len(registry._pending), cares.PENDING_JOINS_LIMIT)
        time.sleep(0.2)
        registry.expire()
        self.assertEqual(len(registry._pending), 0)

    def test_node_ids_belong_to_their_secret(self):
        registry = cares.NodeRegistry()
        first = joined(registry, "web", secret="genuine")
        for secret in ("", "stranger"):
            with self.assertRaises(cares.Refusal) as caught:
                registry.join("web", "10.6.6.6:1", cares.JoinInfo(), secret)
            self.assertEqual((caught.exception.code, caught.exception.reason),
                             (grpc.StatusCode.PERMISSION_DENIED, cares.RefusalReason.ID_OWNED))
            self.assertIn("belongs to another worker", caught.exception.message)
        # The genuine worker, restarted before its old stream was noticed gone, takes its place.
        second = registry.join("web", "10.0.0.1:2", cares.JoinInfo(), "genuine")
        self.assertEqual(registry.attach_stream("web", second), first)
        registry.disconnect("web", second, "killed")
        with self.assertRaises(cares.Refusal):  # still not the stranger's while gone
            registry.join("web", "10.6.6.6:1", cares.JoinInfo(), "stranger")
        # An unclaimed ID (an older worker without a secret) is refused only while it streams.
        joined(registry, "old")
        with self.assertRaises(cares.Refusal) as caught:
            registry.join("old", "x", cares.JoinInfo())
        self.assertEqual((caught.exception.code, caught.exception.reason),
                         (grpc.StatusCode.ALREADY_EXISTS, cares.RefusalReason.ID_IN_USE))

    def test_second_stream_for_a_session_is_refused(self):
        registry = cares.NodeRegistry()
        session = joined(registry, "a")
        for forged in (session, "forged", ""):
            with self.assertRaises(cares.Refusal) as caught:
                registry.attach_stream("a", forged)
            self.assertEqual(caught.exception.reason, cares.RefusalReason.NO_SESSION)

    def test_rejected_samples_are_not_being_heard_from(self):
        registry = cares.NodeRegistry(heartbeat_interval=0.1)
        session = active(registry, "a", cpu=10, memory=20)
        registry.update("a", session, values(11, 21), 2**64 - 1)  # accepted: then every later one goes back
        bad = [values(float("nan"), 1), values(1, float("inf")), values(-1, 1), values(101, 1),
               values(1, 1, load_average_1m=-3.0), values(1, 1, net_receive_bytes_per_s=float("inf"))]
        stop = time.monotonic() + 0.4
        sequence = 3
        while time.monotonic() < stop:
            for sample in bad + [values(50, 50)]:
                registry.update("a", session, sample, sequence)
                sequence += 1
            time.sleep(0.01)
        node = registry.get("a")
        self.assertEqual((node.metrics.cpu_percent, node.metrics.memory_percent), (11, 21))
        self.assertGreater(node.dropped_samples, 100)
        self.assertEqual(registry.expire(), [("a", session)])
        lost = texts(registry.events)[-1]
        self.assertRegex(lost, r"Node 'a' lost: no accepted sample for 0\.3 s \(\d+ rejected: .+\)\.")
        warnings = [text for text in texts(registry.events) if "bad sample" in text]
        self.assertLessEqual(len(warnings), 4, warnings)  # the 1st, 10th, 100th...

    def test_flood_keeps_latest_without_growing_history(self):
        registry = cares.NodeRegistry(heartbeat_interval=1.0)
        session = joined(registry, "a")
        for sequence in range(1, 5001):
            registry.update("a", session, values(sequence % 100, 1), sequence)
        node = registry.get("a")
        self.assertEqual(node.metrics.cpu_percent, 5000 % 100)
        self.assertEqual(list(node.history.cpu), [5000 % 100])

    def test_history_is_bounded_and_keeps_every_series(self):
        registry = cares.NodeRegistry(heartbeat_interval=0.0)
        session = joined(registry, "a")
        for sequence in range(1, 200):
            registry.update("a", session, values(1, 2, net_receive_bytes_per_s=3.0), sequence)
        history = registry.get("a").history
        self.assertEqual(len(history.cpu), cares.HISTORY_SAMPLES)
        self.assertEqual((history.memory[-1], history.net_receive[-1]), (2.0, 3.0))
        self.assertTrue(cares.math.isnan(history.net_transmit[-1]), "an unsent value was invented")

    def test_expire_marks_silent_nodes_on_a_healthy_loop(self):
        registry = cares.NodeRegistry(heartbeat_interval=0.1)
        quiet = active(registry, "quiet")
        chatty = active(registry, "chatty")
        for sequence in range(2, 10):  # the sweep ticks on time while "quiet" says nothing
            registry.clock.tick(0.05)
            time.sleep(0.05)
            registry.update("chatty", chatty, values(), sequence)
        self.assertEqual(registry.expire(), [("quiet", quiet)])
        self.assertEqual(status_of(registry, "chatty"), cares.NodeStatus.ACTIVE)
        self.assertIn("no heartbeat for 0.3 s", texts(registry.events)[-1])

    def test_the_sweep_finds_exactly_the_silent_nodes_while_reading_only_those(self):
        # The sweep reads nodes in the order they were last heard from and stops at the first one
        # that is not silent. Over joins, samples, goodbyes, time and stalls credited by the clock
        # (which make that order differ from the heard times' for a while), it must expire just
        # the nodes a look at every node would.
        clock = [1000.0]
        registry = cares.NodeRegistry(heartbeat_interval=1.0)
        registry.clock.monotonic = lambda: clock[0]
        rng = random.Random(11)
        sessions, expired_total = {}, 0
        for step in range(4000):
            node_id = f"n{rng.randrange(40)}"
            action = rng.random()
            if action < 0.15:
                sessions[node_id] = joined(registry, node_id, secret="same worker")  # may replace its stream
            elif action < 0.55 and node_id in sessions:
                with contextlib.suppress(cares.Refusal):
                    registry.update(node_id, sessions[node_id], values(), step + 1)
            elif action < 0.6 and node_id in sessions:
                registry.disconnect(node_id, sessions[node_id], "test", left=True)
            elif action < 0.7:
                clock[0] += rng.choice((0.05, 0.2, 0.5))
            elif action < 0.8:  # a sweep: late, and so credited, when time went on without one
                registry.clock.tick(0.5)
            else:
                now, limit = registry.clock.now(), registry.silence_limit
                expected = {(node.node_id, node.session_id) for node in registry.snapshot(with_history=False)
                            if node.status.live and now - node.heard_at > limit}
                expired = registry.expire()
                self.assertEqual(set(expired), expected, f"step {step}")
                expired_total += len(expired)
        self.assertGreater(expired_total, 50)
        self.assertGreater(registry.clock.stepped_back_from, -math.inf, "no stall was ever credited")
        # On a steady clock with every node heard lately, the sweep reads one node and stops.
        clock[0] += 10.0
        for node_id, session in sessions.items():
            with contextlib.suppress(cares.Refusal):
                registry.update(node_id, session, values(), 10 ** 6)
        reads = collections.Counter()
        original = cares.Node.__getattribute__

        def counting(node, name):
            if name == "heard_at":
                reads[node.node_id] += 1
            return original(node, name)
        with mock.patch.object(cares.Node, "__getattribute__", counting):
            self.assertEqual(registry.expire(), [])
        self.assertEqual(sum(reads.values()), 1)

    def test_a_stalled_loop_extends_everyones_grace(self):
        registry = cares.NodeRegistry(heartbeat_interval=0.1)
        for number in range(20):
            active(registry, f"n{number}")
        registry.clock.tick(0.05)
        time.sleep(0.6)  # the orchestrator itself stalls: no sweep, no heartbeat read for 6 intervals
        self.assertGreater(registry.clock.tick(0.05), 0.4)
        self.assertEqual(registry.expire(), [])
        self.assertEqual(registry.status_counts()[cares.NodeStatus.ACTIVE], 20)

    def test_full_registry_evicts_the_longest_gone_then_refuses(self):
        registry = cares.NodeRegistry(max_nodes=2)
        first = joined(registry, "a")
        joined(registry, "b")
        registry.disconnect("a", first, "gone")
        joined(registry, "c")
        self.assertIsNone(registry.get("a"))
        session = registry.join("d", "x", cares.JoinInfo())  # joins never count: the stream does
        with self.assertRaises(cares.Refusal) as caught:
            registry.attach_stream("d", session)
        self.assertEqual(caught.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(len(registry), 2)

    def test_refusals_are_counted_and_summarised(self):
        registry = cares.NodeRegistry()
        registry.refusals.summary.window_s = 0.1
        refusal = cares.Refusal(cares.RefusalReason.WRONG_TOKEN, "x")
        for _ in range(412):
            registry.refusals.add("10.0.0.9", "join", refusal)
        registry.refusals.add("10.0.0.8", "status request", refusal)
        time.sleep(0.15)
        registry.refusals.flush()
        lines = texts(registry.events)
        self.assertEqual(lines, ["Join from 10.0.0.9 refused: missing or wrong token.",
                                 "Status request from 10.0.0.8 refused: missing or wrong token.",
                                 lines[2]])
        self.assertRegex(lines[2], r"^411 joins refused from 10\.0\.0\.9 in the last \d+ s: missing or wrong token\.$")
        self.assertEqual(registry.counters()["refusals"][("join", cares.RefusalReason.WRONG_TOKEN)], 412)

    def test_forget_gone_nodes_after_a_while(self):
        registry = cares.NodeRegistry()
        registry.disconnect("old", joined(registry, "old"), "gone")
        registry._nodes["old"].gone_at -= 100
        registry.disconnect("recent", joined(registry, "recent"), "gone")
        joined(registry, "live")
        self.assertEqual(registry.forget_gone(older_than_s=50), 1)
        self.assertEqual(sorted(node.node_id for node in registry.snapshot()), ["live", "recent"])
        self.assertIn("Forgot 1 node(s) gone for over 50s.", texts(registry.events))
        self.assertEqual(registry.forget_gone(), 1)
        self.assertEqual([node.node_id for node in registry.snapshot()], ["live"])

    def test_pages_walk_every_node_in_order(self):
        registry = cares.NodeRegistry()
        names = [f"n{number:05d}" for number in range(2500)]
        for name in random.Random(3).sample(names, len(names)):
            joined(registry, name)
        seen, after = [], ""
        while True:
            page, total = registry.page(after, 1000)
            self.assertEqual(total, 2500)
            if not page:
                break
            seen.extend(node.node_id for node in page)
            after = page[-1].node_id
        self.assertEqual(seen, names)

    def test_event_log_is_bounded_and_survives_a_broken_listener(self):
        log = cares.EventLog(size=5)
        log.subscribe(lambda event: 1 / 0)
        for number in range(50):
            log.add(cares.Level.INFO, str(number), node_id="n" if number % 2 else "")
        self.assertEqual([event.text for event in log.tail(100)], ["45", "46", "47", "48", "49"])
        self.assertEqual([event.text for event in log.tail(100, node_id="n")], ["45", "47", "49"])
        self.assertEqual(log.tail(0), [])

    def test_hammered_from_many_threads(self):
        registry = cares.NodeRegistry(max_nodes=40, heartbeat_interval=0.001)
        errors = []

        def worker(number):
            rng = random.Random(number)
            try:
                for step in range(1500):
                    node_id = f"n{rng.randrange(60)}"
                    action = rng.random()
                    try:
                        if action < 0.2:
                            joined(registry, node_id, secret=rng.choice(("", "a", "b")))
                        elif action < 0.6:
                            node = registry.get(node_id)
                            if node is not None:
                                registry.update(node_id, node.session_id, values(rng.random() * 100, 50), step + 1)
                        elif action < 0.75:
                            node = registry.get(node_id)
                            if node is not None:
                                registry.disconnect(node_id, node.session_id, "test")
                        elif action < 0.85:
                            registry.expire()
                            registry.refusals.flush()
                        else:
                            for node in registry.snapshot():
                                self.assertTrue(node.metrics is None or 0 <= node.metrics.cpu_percent <= 100)
                    except cares.Refusal:
                        pass
            except Exception as error:  # collected and reported by the main thread
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(number,)) for number in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(errors, [])
        nodes = registry.snapshot()
        self.assertLessEqual(len(nodes), 40)
        self.assertEqual(len({node.node_id for node in nodes}), len(nodes))
        for node in nodes:
            self.assertLessEqual(len(node.history.cpu), cares.HISTORY_SAMPLES)
        self.assertLessEqual(len(registry.events.tail(10_000)), cares.EVENT_LOG_SIZE)

    def test_sample_hook_sees_accepted_samples_only(self):
        registry = cares.NodeRegistry()
        seen = []
        registry.on_sample = lambda node_id, sample, sent_at_ms: seen.append((node_id, sample.cpu_percent, sent_at_ms))
        session = joined(registry, "a")
        registry.update("a", session, values(5), 1, sent_at_ms=1234)
        registry.update("a", session, values(float("nan")), 2, sent_at_ms=1235)
        registry.on_sample = lambda *_: 1 / 0  # a broken hook never ends the stream
        registry.update("a", session, values(6), 3)
        self.assertEqual(seen, [("a", 5, 1234)])
        self.assertEqual(registry.get("a").metrics.cpu_percent, 6)

    def test_status_changes_follow_the_transition_table(self):
        """Every row of NODE_TRANSITIONS, applied by the one function that applies them, and every
        pair it does not list leaves the node as it was and says nothing."""
        for status in cares.NodeStatus:
            for event in cares.NodeEvent:
                with self.subTest(status=status, event=event):
                    node = cares.Node("n1", status=status, alerting=frozenset({"rule"}))
                    said = cares.apply_transition(node, event, why="a reason")
                    transition = cares.NODE_TRANSITIONS.get((status, event))
                    if transition is None:
                        self.assertEqual((node.status, said, node.alerting), (status, None, frozenset({"rule"})))
                        continue
                    self.assertIs(node.status, transition.status)
                    if transition.kind is None:
                        self.assertIsNone(said)
                    else:
                        level, text, kind, node_id, _ = said
                        self.assertEqual((level, kind, node_id), (transition.level, transition.kind, "n1"))
                        self.assertIn("'n1'", text)
                        self.assertNotIn("{", text)
                    if transition.status is cares.NodeStatus.DISCONNECTED:
                        self.assertEqual((node.left, node.alerting), (event is cares.NodeEvent.GOODBYE, frozenset()))
                        self.assertGreater(node.gone_at, 0)
        lost = cares.NODE_TRANSITIONS[(cares.NodeStatus.ACTIVE, cares.NodeEvent.SILENT)]
        self.assertEqual(lost.message.format(node_id="web", why="no heartbeat for 3.0 s"),
                         "Node 'web' lost: no heartbeat for 3.0 s.")
        # Every way into Disconnected raises an event; nothing else leaves Missing but a new stream.
        for (status, event), transition in cares.NODE_TRANSITIONS.items():
            if transition.status is cares.NodeStatus.DISCONNECTED:
                self.assertIn(transition.kind, (cares.EventKind.LEFT, cares.EventKind.LOST))
            if status is cares.NodeStatus.MISSING:
                self.assertIn(event, (cares.NodeEvent.STREAM_BOUND, cares.NodeEvent.NOT_BACK))

    def test_restore_refuses_records_of_the_wrong_types(self):
        registry = cares.NodeRegistry()
        good = {"node_id": "12345", "hostname": "web", "labels": {"role": "db"}, "cpu_count": 4,
                "memory_total_bytes": 1 << 30, "joined_at": 1.5, "last_seen": 2, "owner": "ab"}
        wrong = [{"node_id": 12345}, {"node_id": True}, {"node_id": None}, {"node_id": ["a"]},
                 dict(good, node_id="n1", labels={"role": 7}), dict(good, node_id="n2", labels={1: "x"}),
                 dict(good, node_id="n3", labels=["role"]), dict(good, node_id="n4", hostname=42),
                 dict(good, node_id="n5", cpu_count="4"), dict(good, node_id="n6", cpu_count=True),
                 dict(good, node_id="n7", last_seen="yesterday"), dict(good, node_id="n8", owner=171),
                 {"hostname": "no id"}]
        self.assertEqual(registry.restore(wrong + [good]), 1)
        self.assertEqual([node.node_id for node in registry.snapshot()], ["12345"])
        node = registry.get("12345")
        self.assertEqual((node.status, node.hostname, node.labels, node.cpu_count, node.last_seen, node.owner_digest),
                         (cares.NodeStatus.MISSING, "web", {"role": "db"}, 4, 2.0, b"\xab"))


# ---------------------------------------------------------------------------
# 4-5. Orchestrator and worker over real gRPC on loopback
# ---------------------------------------------------------------------------

class ClusterTest(ClusterTestCase):
    def test_join_and_heartbeat_update_the_registry(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        registry = orchestrator.registry
        client = self.start_worker(orchestrator, "w1", FixedSampler(12.5, 40.0), labels={"role": "web"})
        self.assert_becomes(registry, "w1", cares.NodeStatus.ACTIVE, 5)
        self.assertIsNotNone(wait_until(lambda: cpu_of(registry, "w1") == 12.5, 5))
        node = registry.get("w1")
        self.assertEqual((node.metrics.memory_percent, node.labels, node.version), (40.0, {"role": "web"},
                                                                                    cares.VERSION))
        self.assertTrue(node.address.startswith("127.0.0.1:"), node.address)
        self.assertEqual(node.hostname, socket.gethostname()[:64])
        self.assertEqual(client.state.phase, cares.ConnectionPhase.CONNECTED)
        self.assertIn(f"connected to 127.0.0.1:{orchestrator.port}", client.state.describe())
        seen = node.last_seen
        self.assertIsNotNone(wait_until(lambda: registry.get("w1").last_seen > seen, 3))
        self.assertIn("Node 'w1' has joined the cluster.", texts(registry.events))

    def test_four_workers_update_independently(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        registry = orchestrator.registry
        samplers = {f"w{n}": FixedSampler(10.0 * n, 5.0 * n) for n in range(1, 5)}
        for node_id, sampler in samplers.items():
            self.start_worker(orchestrator, node_id, sampler)
        for node_id in samplers:
            self.assert_becomes(registry, node_id, cares.NodeStatus.ACTIVE, 5)
        samplers["w3"].cpu = 99.0

        def latest():
            return {node.node_id: (node.metrics.cpu_percent, node.metrics.memory_percent)
                    for node in registry.snapshot() if node.metrics}
        expected = {"w1": (10.0, 5.0), "w2": (20.0, 10.0), "w3": (99.0, 15.0), "w4": (40.0, 20.0)}
        self.assertIsNotNone(wait_until(lambda: latest() == expected, 5), latest())

    def test_real_worker_reports_this_machines_metrics(self):
        orchestrator = self.start_orchestrator()
        self.start_worker(orchestrator, "real")
        self.assert_becomes(orchestrator.registry, "real", cares.NodeStatus.ACTIVE, 5)
        sample = orchestrator.registry.get("real").metrics
        self.assertAlmostEqual(sample.memory_percent, cares.psutil.virtual_memory().percent, delta=5)
        self.assertTrue(0.0 <= sample.cpu_percent <= 100.0)
        self.assertEqual(sample.root_fs_size_bytes, cares.psutil.disk_usage("/").total)

    def test_killed_worker_is_disconnected_within_a_second(self):
        orchestrator = self.start_orchestrator()
        worker = self.spawn("worker", f"127.0.0.1:{orchestrator.port}", "--node-id", "victim", "--headless")
        self.assert_streaming(orchestrator.registry, "victim")
        worker.kill()
        self.assert_becomes(orchestrator.registry, "victim", cares.NodeStatus.DISCONNECTED, 1.0)
        self.assertIn("lost", texts(orchestrator.registry.events)[-1])

    def test_worker_killed_before_its_first_sample_is_disconnected_at_once(self):
        orchestrator = self.start_orchestrator()
        script = (
            "import sys, time, grpc, cares, cluster_pb2 as pb, cluster_pb2_grpc as pb_grpc\n"
            "stub = pb_grpc.ClusterServiceStub(grpc.insecure_channel(sys.argv[1]))\n"
            "ack = stub.JoinCluster(pb.NodeInfo(node_id='early'), timeout=5)\n"
            "metadata = ((cares.NODE_METADATA_KEY, 'early'), (cares.SESSION_METADATA_KEY, ack.session_id))\n"
            "replies = stub.Heartbeat(iter(lambda: time.sleep(60), 0), metadata=metadata)\n"
            "next(replies)\n")
        process = self.spawn_script(script, f"127.0.0.1:{orchestrator.port}")
        self.assert_streaming(orchestrator.registry, "early")
        self.assertEqual(status_of(orchestrator.registry, "early"), cares.NodeStatus.JOINING)
        process.kill()
        self.assert_becomes(orchestrator.registry, "early", cares.NodeStatus.DISCONNECTED, 1.0)

    def test_silent_worker_is_disconnected_after_three_intervals(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=100)
        registry = orchestrator.registry
        stub = raw_stub(self, orchestrator.port)
        session = stub.JoinCluster(pb.NodeInfo(node_id="mute"), timeout=5).session_id
        stream = OpenStream(self, stub, "mute", session)
        stream.send(metrics("mute", session, 1))
        self.assert_becomes(registry, "mute", cares.NodeStatus.ACTIVE, 2)
        bound = cares.MISSED_HEARTBEATS * registry.heartbeat_interval + 1.0
        self.assert_becomes(registry, "mute", cares.NodeStatus.DISCONNECTED, bound)
        self.assertEqual(stream.outcome(), grpc.StatusCode.DEADLINE_EXCEEDED)

    def test_worker_rejoins_after_orchestrator_restart_on_same_port(self):
        first = cares.Orchestrator("127.0.0.1:0")
        first.start()
        port = first.port
        client = self.start_worker(first, "phoenix", port=port)
        self.assert_streaming(first.registry, "phoenix")
        first.stop(0.2)
        self.assertIsNotNone(wait_until(lambda: client.state.phase is cares.ConnectionPhase.RETRYING, 3))
        self.assertIn("Disconnected: the orchestrator is shutting down; retrying.", texts(client.events))
        second = self.start_orchestrator(f"127.0.0.1:{port}")
        self.assert_becomes(second.registry, "phoenix", cares.NodeStatus.ACTIVE, 6)

    def test_duplicate_live_node_id_is_refused(self):
        orchestrator = self.start_orchestrator()
        self.start_worker(orchestrator, "twin")
        self.assert_streaming(orchestrator.registry, "twin")
        with self.assertRaises(grpc.RpcError) as caught:
            raw_stub(self, orchestrator.port).JoinCluster(pb.NodeInfo(node_id="twin"), timeout=5)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.ALREADY_EXISTS)
        self.assertIn("already connected", caught.exception.details())

    def test_second_worker_with_same_id_keeps_retrying_and_takes_over_when_free(self):
        orchestrator = self.start_orchestrator()
        first = self.start_worker(orchestrator, "same")
        self.assert_streaming(orchestrator.registry, "same")
        second = self.start_worker(orchestrator, "same")
        self.assertIsNotNone(wait_until(lambda: second.state.phase is cares.ConnectionPhase.RETRYING, 5))
        self.assertIn("ALREADY_EXISTS", second.state.detail)
        first.stop()
        self.assertIsNotNone(wait_until(lambda: second.state.phase is cares.ConnectionPhase.CONNECTED, 8))

    def test_goodbye_is_logged_as_left(self):
        orchestrator = self.start_orchestrator()
        client = self.start_worker(orchestrator, "polite")
        self.assert_becomes(orchestrator.registry, "polite", cares.NodeStatus.ACTIVE, 5)
        client.stop()
        self.assert_becomes(orchestrator.registry, "polite", cares.NodeStatus.DISCONNECTED, 2)
        lines = texts(orchestrator.registry.events, 5)
        self.assertIn("Node 'polite' has left the cluster.", lines)
        self.assertFalse(any("lost" in line for line in lines), lines)
        self.assertEqual(client.state.phase, cares.ConnectionPhase.STOPPED)

    def test_worker_obeys_a_new_heartbeat_interval(self):
        orchestrator = self.start_orchestrator()
        client = self.start_worker(orchestrator, "tempo")
        self.assert_becomes(orchestrator.registry, "tempo", cares.NodeStatus.ACTIVE, 5)
        orchestrator.set_heartbeat_interval(200).result(5)
        self.assertIsNotNone(wait_until(lambda: client.state.heartbeat_interval == 0.2, 3))
        start_sequence = orchestrator.registry.get("tempo").last_sequence
        time.sleep(1.0)
        sent = orchestrator.registry.get("tempo").last_sequence - start_sequence
        self.assertTrue(3 <= sent <= 7, f"{sent} samples in 1 s at a 0.2 s interval")

    def test_unreachable_orchestrator_reports_retrying_with_reason(self):
        client = cares.WorkerClient(f"127.0.0.1:{free_port()}", "lonely", cares.LocalSampler())
        client.start()
        self.addCleanup(client.stop, False, 0.5)
        self.assertIsNotNone(wait_until(lambda: client.state.phase is cares.ConnectionPhase.RETRYING, 5))
        state = client.state
        self.assertIn("unreachable", state.detail)
        self.assertTrue(state.describe().startswith("retrying in "), state.describe())
        self.assertLessEqual(state.retry_at - time.monotonic(), cares.MAX_BACKOFF_S)

    def test_heartbeat_without_join_is_refused(self):
        orchestrator = self.start_orchestrator()
        stub = raw_stub(self, orchestrator.port)
        replies = stub.Heartbeat(iter([pb.NodeMetrics(node_id="ghost", session_id="made-up")]), timeout=5)
        with self.assertRaises(grpc.RpcError) as caught:
            list(replies)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertIsNone(orchestrator.registry.get("ghost"))
        self.assertIn("Heartbeat stream from 127.0.0.1 refused: no joined session.", texts(orchestrator.registry.events))

    def test_port_in_use_is_a_clear_start_error(self):
        orchestrator = self.start_orchestrator()
        with self.assertRaises(cares.StartError) as caught:
            cares.Orchestrator(f"127.0.0.1:{orchestrator.port}").start()
        self.assertIn(f"port {orchestrator.port} is already in use", str(caught.exception))


# ---------------------------------------------------------------------------
# What the dashboard says about a node must be true (issue 10)
# ---------------------------------------------------------------------------

class SickOrchestrator(pb_grpc.ClusterServiceServicer):
    """Accepts every join, then ends every heartbeat stream at once (or floods it with commands)."""

    def __init__(self, commands=0):
        self.joins = []
        self.samples = 0
        self._commands = commands
        self.flooded = threading.Event()

    def JoinCluster(self, request, context):
        self.joins.append(time.monotonic())
        return pb.Acknowledgement(accepted=True, session_id="s", heartbeat_interval_ms=1000)

    def Heartbeat(self, request_iterator, context):
        if not self._commands:
            return
        threading.Thread(target=self._count, args=(request_iterator,), daemon=True).start()
        for number in range(self._commands):  # alternating intervals, as fast as the transport takes them
            yield pb.OrchestratorCommand(set_heartbeat_interval_ms=(100, 5000, 250)[number % 3])
        yield pb.OrchestratorCommand(set_heartbeat_interval_ms=250)
        self.flooded.set()
        time.sleep(3.0)

    def _count(self, request_iterator):
        with contextlib.suppress(grpc.RpcError):
            for _ in request_iterator:
                self.samples += 1


class LivenessIntegrityTest(ClusterTestCase):
    def serve(self, servicer):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_ClusterServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        return port

    def test_rejoining_a_dead_nodes_id_never_makes_it_active(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        registry = orchestrator.registry
        stub = raw_stub(self, orchestrator.port)
        session = stub.JoinCluster(pb.NodeInfo(node_id="victim"), timeout=5).session_id
        stream = OpenStream(self, stub, "victim", session)
        stream.send(metrics("victim", session, 1, cpu=42.0))
        self.assert_becomes(registry, "victim", cares.NodeStatus.ACTIVE, 5)
        stream.close()
        self.assert_becomes(registry, "victim", cares.NodeStatus.DISCONNECTED, 5)
        seen = registry.get("victim").last_seen
        for _ in range(15):  # re-join every 0.1 s for 1.5 s (five silence limits), never stream
            stub.JoinCluster(pb.NodeInfo(node_id="victim"), timeout=5)
            time.sleep(0.1)
            node = registry.get("victim")
            self.assertEqual((node.status, node.last_seen), (cares.NodeStatus.DISCONNECTED, seen))
        self.assertEqual(cares.fetch_status(f"127.0.0.1:{orchestrator.port}")[0]["status"], "Disconnected")

    def test_a_restarted_worker_reclaims_its_id_and_a_stranger_cannot_take_it(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        registry = orchestrator.registry
        state = tempfile.mkdtemp(prefix="cares-test-owner-")
        self.addCleanup(shutil.rmtree, state, True)
        address = f"127.0.0.1:{orchestrator.port}"
        genuine = self.spawn("worker", address, "--node-id", "web", "--state-dir", state, "--headless")
        self.assert_becomes(registry, "web", cares.NodeStatus.ACTIVE, 10)
        genuine.kill()
        genuine.wait(5)
        self.assert_becomes(registry, "web", cares.NodeStatus.DISCONNECTED, 5)
        stranger = self.start_worker(orchestrator, "web", secret="not-the-secret")
        self.assertIsNotNone(wait_until(lambda: stranger.state.phase is cares.ConnectionPhase.RETRYING, 5))
        self.assertIn("belongs to another worker", stranger.state.detail)
        self.assertIn("Join from 127.0.0.1 refused: node ID 'web' belongs to another worker", "\n".join(
            texts(registry.events)))
        restarted = self.spawn("worker", address, "--node-id", "web", "--state-dir", state, "--headless")
        self.assert_becomes(registry, "web", cares.NodeStatus.ACTIVE, 10)
        self.assertIsNot(stranger.state.phase, cares.ConnectionPhase.CONNECTED)
        self.assertEqual(oct(stat.S_IMODE(os.stat(os.path.join(state, "worker-web.secret")).st_mode)), "0o600")
        restarted.terminate()
        self.assertEqual(restarted.wait(10), 0)

    def test_a_worker_that_cannot_keep_its_secret_claims_nothing_and_rejoins_after_a_restart(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        state = tempfile.mkdtemp(prefix="cares-test-nosecret-")
        self.addCleanup(shutil.rmtree, state, True)
        os.mkdir(os.path.join(state, "worker-web.secret"))  # neither readable nor replaceable as a file
        identity = cares.claim_identity("web", state)
        identity.lock.close()
        self.assertEqual(identity.secret, "")
        self.assertIn("cannot keep a node secret in", identity.note)
        address = f"127.0.0.1:{orchestrator.port}"
        for _ in range(2):  # with a secret that died with the first process, the second was refused
            worker = self.spawn("worker", address, "--node-id", "web", "--state-dir", state, "--headless")
            self.assert_becomes(orchestrator.registry, "web", cares.NodeStatus.ACTIVE, 10)
            worker.kill()
            worker.wait(5)
            self.assert_becomes(orchestrator.registry, "web", cares.NodeStatus.DISCONNECTED, 5)
        os.mkdir(os.path.join(state, "worker-db.lock"))
        with self.assertRaisesRegex(cares.StartError, r"cannot use .*worker-db\.lock: is a directory"):
            cares.claim_identity("db", state)

    def test_stream_less_joins_do_not_fill_max_nodes(self):
        orchestrator = self.start_orchestrator(max_nodes=5, heartbeat_ms=200)
        stub = raw_stub(self, orchestrator.port)
        for number in range(50):
            stub.JoinCluster(pb.NodeInfo(node_id=f"squatter-{number}"), timeout=5)
        self.start_worker(orchestrator, "genuine")
        self.assert_becomes(orchestrator.registry, "genuine", cares.NodeStatus.ACTIVE, 5)
        self.assertEqual(len(orchestrator.registry), 1)

    def test_an_orchestrator_stall_blames_no_worker(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=250)
        registry = orchestrator.registry
        script = ("import sys, time, cares\n"
                  "sampler = cares.LocalSampler()\n"
                  "clients = [cares.WorkerClient(sys.argv[1], f'calm-{n:02d}', sampler) for n in range(50)]\n"
                  "[client.start() for client in clients]\n"
                  "time.sleep(60)\n")
        self.spawn_script(script, f"127.0.0.1:{orchestrator.port}")
        self.assertIsNotNone(wait_until(lambda: registry.status_counts()[cares.NodeStatus.ACTIVE] == 50, 15))
        cares.grpc_loop().call_soon_threadsafe(time.sleep, 1.0)  # the orchestrator's loop stalls for 1 s
        time.sleep(2.0)
        lost = [text for text in texts(registry.events) if "lost" in text]
        self.assertEqual(lost, [])
        self.assertEqual(registry.status_counts()[cares.NodeStatus.ACTIVE], 50)
        self.assertIn("The orchestrator was stalled for ", "\n".join(texts(registry.events)))

    def test_a_node_whose_samples_are_all_rejected_is_lost(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=100)
        registry = orchestrator.registry
        stub = raw_stub(self, orchestrator.port)
        session = stub.JoinCluster(pb.NodeInfo(node_id="jumpy"), timeout=5).session_id
        stream = OpenStream(self, stub, "jumpy", session)
        stream.send(metrics("jumpy", session, 1, cpu=5.0), metrics("jumpy", session, 2**64 - 1, cpu=6.0))
        self.assertIsNotNone(wait_until(lambda: cpu_of(registry, "jumpy") == 6.0, 5))
        seen = registry.get("jumpy").last_seen
        for sequence in range(3, 40):  # every later sample "goes back" and is rejected
            stream.send(metrics("jumpy", session, sequence, cpu=50.0))
            if status_of(registry, "jumpy") is cares.NodeStatus.DISCONNECTED:
                break
            time.sleep(0.05)
        self.assert_becomes(registry, "jumpy", cares.NodeStatus.DISCONNECTED, 2)
        node = registry.get("jumpy")
        self.assertEqual((node.last_seen, node.metrics.cpu_percent), (seen, 6.0))
        self.assertEqual(stream.outcome(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertRegex("\n".join(texts(registry.events)),
                         r"Node 'jumpy' lost: no accepted sample for 0\.3 s \(\d+ rejected: sequence number went back\)")

    def test_a_worker_backs_off_from_an_orchestrator_that_drops_every_stream(self):
        sick = SickOrchestrator()
        port = self.serve(sick)
        client = cares.WorkerClient(f"127.0.0.1:{port}", "patient", cares.LocalSampler())
        client.start()
        self.addCleanup(client.stop, False, 0.5)
        time.sleep(3.0)
        # Reset after every "successful" join, this was 2-4 joins a second (6 or more in 3 s); growing
        # from 0.25-0.5 s and doubling, at most 4 fit in 3 s.
        self.assertLessEqual(len(sick.joins), 4, sick.joins)
        lines = texts(client.events)
        self.assertLessEqual(len(lines), 3, lines)  # each different line once: joined, disconnected

    def test_a_flood_of_commands_costs_no_samples_or_log_lines(self):
        sick = SickOrchestrator(commands=10_000)
        port = self.serve(sick)
        client = cares.WorkerClient(f"127.0.0.1:{port}", "steady", cares.LocalSampler())
        client.start()
        self.addCleanup(client.stop, False, 0.5)
        # A worker that keeps reading a flood spends a core on it: it leaves, and comes back much later.
        self.assertIsNotNone(wait_until(lambda: "flooded" in client.state.detail, 10))
        self.assertGreater(client.state.retry_at - time.monotonic(), cares.REJECTED_TOKEN_BACKOFF_S - 5)
        self.assertLessEqual(len(sick.joins), 1)
        self.assertLessEqual(sick.samples, 3)  # at most one sample per interval, never one per command
        lines = texts(client.events)
        self.assertLessEqual(len(lines), 3, lines)  # joined, (an interval,) left: never a line per command

    def test_every_worker_ends_on_the_current_interval(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=1000)
        registry = orchestrator.registry
        stub = raw_stub(self, orchestrator.port)
        ack = stub.JoinCluster(pb.NodeInfo(node_id="late"), timeout=5)
        self.assertEqual(ack.heartbeat_interval_ms, 1000)
        orchestrator.set_heartbeat_interval(500).result(5)  # changed between its join and its stream
        stream = OpenStream(self, stub, "late", ack.session_id)
        self.assertEqual(next(stream.replies).set_heartbeat_interval_ms, 500)
        # Workers joining while the interval changes over and over all end on the final one.
        clients = [self.start_worker(orchestrator, f"racer-{n}") for n in range(12)]
        for milliseconds in (2000, 250, 5000, 1000, 500, 2000, 750):
            orchestrator.set_heartbeat_interval(milliseconds)
            time.sleep(0.05)
        orchestrator.set_heartbeat_interval(750).result(5)
        self.assertIsNotNone(wait_until(lambda: all(client.state.heartbeat_interval == 0.75 for client in clients),
                                        5), [client.state.heartbeat_interval for client in clients])
        self.assertEqual(registry.heartbeat_interval, 0.75)

    def test_token_guessing_is_throttled_per_address(self):
        orchestrator = self.start_orchestrator("[::]:0", token="s3cret")
        registry = orchestrator.registry
        guesser = raw_stub(self, orchestrator.port, "127.0.0.1")
        calls = [guesser.JoinCluster.future(pb.NodeInfo(node_id="x"), metadata=(("cares-token", f"guess-{n}"),),
                                            timeout=15) for n in range(100)]
        answers, errors = [], {}
        for call in calls:
            with self.assertRaises(grpc.RpcError) as caught:
                call.result()
            answers.append(caught.exception.details())
            # Each refusal carries its reason as trailing metadata, matching its code and words.
            reason = cares.refusal_reason(caught.exception)
            self.assertEqual(caught.exception.code(), reason.code)
            self.assertEqual(reason is cares.RefusalReason.WRONG_TOKEN, answers[-1] == "missing or wrong join token")
            errors[reason] = caught.exception
        self.assertEqual(answers.count("missing or wrong join token"), cares.TOKEN_LOCKOUT_FAILURES)
        self.assertTrue(all(answer.startswith("too many wrong tokens from 127.0.0.1") for answer in answers
                            if answer != "missing or wrong join token"), set(answers))
        # The worker says why from the reason, not from the words of the message.
        self.assertEqual(cares.describe_rpc_error(errors[cares.RefusalReason.WRONG_TOKEN]),
                         "the orchestrator rejected the join token")
        self.assertTrue(cares.describe_rpc_error(errors[cares.RefusalReason.THROTTLED]).startswith(
            "the orchestrator refused: too many wrong tokens from 127.0.0.1"))
        # Another address is not slowed down.
        other = raw_stub(self, orchestrator.port, "::1")
        other.JoinCluster(pb.NodeInfo(node_id="member"), metadata=(("cares-token", "s3cret"),), timeout=2)
        refusals = [text for text in texts(registry.events) if "refused" in text]
        self.assertLessEqual(len(refusals), 2, refusals)
        counts = registry.counters()["refusals"]
        self.assertEqual(counts[("join", cares.RefusalReason.WRONG_TOKEN)], cares.TOKEN_LOCKOUT_FAILURES)
        self.assertEqual(counts[("join", cares.RefusalReason.THROTTLED)], 100 - cares.TOKEN_LOCKOUT_FAILURES)


# ---------------------------------------------------------------------------
# Compatibility: an old worker with a new orchestrator, and the reverse
# ---------------------------------------------------------------------------

# cluster.proto as cares 0.2.0 shipped it (commit fc29e51): the serialized FileDescriptorProto that
# its generated cluster_pb2.py registered, base64-encoded. The tests speak that protocol themselves.
OLD_PROTOCOL = (
    "Cg1jbHVzdGVyLnByb3RvEghjYXJlcy52MSKFAQoITm9kZUluZm8SDwoHbm9kZV9pZBgBIAEoCRIQCghob3N0bmFtZRgCIAEoCRIR"
    "CgljcHVfY291bnQYAyABKA0SGgoSbWVtb3J5X3RvdGFsX2J5dGVzGAQgASgEEhAKCHBsYXRmb3JtGAUgASgJEhUKDWNhcmVzX3Zl"
    "cnNpb24YBiABKAkiZwoPQWNrbm93bGVkZ2VtZW50EhAKCGFjY2VwdGVkGAEgASgIEg8KB21lc3NhZ2UYAiABKAkSEgoKc2Vzc2lv"
    "bl9pZBgDIAEoCRIdChVoZWFydGJlYXRfaW50ZXJ2YWxfbXMYBCABKA0izQEKC05vZGVNZXRyaWNzEg8KB25vZGVfaWQYASABKAkS"
    "EgoKc2Vzc2lvbl9pZBgCIAEoCRITCgtjcHVfcGVyY2VudBgDIAEoARIWCg5tZW1vcnlfcGVyY2VudBgEIAEoARIZChFtZW1vcnlf"
    "dXNlZF9ieXRlcxgFIAEoBBIaChJtZW1vcnlfdG90YWxfYnl0ZXMYBiABKAQSEgoKc2VudF9hdF9tcxgHIAEoAxIQCghzZXF1ZW5j"
    "ZRgIIAEoBBIPCgdsZWF2aW5nGAkgASgIInMKE09yY2hlc3RyYXRvckNvbW1hbmQSIwoZc2V0X2hlYXJ0YmVhdF9pbnRlcnZhbF9t"
    "cxgBIAEoDUgAEiwKCHNodXRkb3duGAIgASgLMhguY2FyZXMudjEuU2h1dGRvd25Ob3RpY2VIAEIJCgdjb21tYW5kIiAKDlNodXRk"
    "b3duTm90aWNlEg4KBnJlYXNvbhgBIAEoCSISChBMaXN0Tm9kZXNSZXF1ZXN0IrEBCgpOb2RlU3RhdHVzEg8KB25vZGVfaWQYASAB"
    "KAkSDwoHYWRkcmVzcxgCIAEoCRIOCgZzdGF0dXMYAyABKAkSEwoLY3B1X3BlcmNlbnQYBCABKAESFgoObWVtb3J5X3BlcmNlbnQY"
    "BSABKAESGAoQbGFzdF9zZWVuX3VuaXhfcxgGIAEoARIQCghob3N0bmFtZRgHIAEoCRIYChBqb2luZWRfYXRfdW5peF9zGAggASgB"
    "Ii8KCE5vZGVMaXN0EiMKBW5vZGVzGAEgAygLMhQuY2FyZXMudjEuTm9kZVN0YXR1czKVAQoOQ2x1c3RlclNlcnZpY2USPAoLSm9p"
    "bkNsdXN0ZXISEi5jYXJlcy52MS5Ob2RlSW5mbxoZLmNhcmVzLnYxLkFja25vd2xlZGdlbWVudBJFCglIZWFydGJlYXQSFS5jYXJl"
    "cy52MS5Ob2RlTWV0cmljcxodLmNhcmVzLnYxLk9yY2hlc3RyYXRvckNvbW1hbmQoATABMkwKDVN0YXR1c1NlcnZpY2USOwoJTGlz"
    "dE5vZGVzEhouY2FyZXMudjEuTGlzdE5vZGVzUmVxdWVzdBoSLmNhcmVzLnYxLk5vZGVMaXN0YgZwcm90bzM="
)


def old_messages():
    """The 0.2.0 message classes, from their own descriptor pool (they would clash with today's)."""
    import base64
    from google.protobuf import descriptor_pool, message_factory
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(base64.b64decode("".join(OLD_PROTOCOL)))
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"cares.v1.{name}"))
            for name in ("NodeInfo", "Acknowledgement", "NodeMetrics", "OrchestratorCommand")}


def old_worker_calls(test, port, old, commands=None):
    """JoinCluster and Heartbeat as a 0.2.0 worker calls them (its messages); the commands it
    receives are read as the given class (by default the 0.2.0 one, as that worker reads them)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    test.addCleanup(channel.close)
    join = channel.unary_unary("/cares.v1.ClusterService/JoinCluster",
                               request_serializer=old["NodeInfo"].SerializeToString,
                               response_deserializer=old["Acknowledgement"].FromString)
    heartbeat = channel.stream_stream("/cares.v1.ClusterService/Heartbeat",
                                      request_serializer=old["NodeMetrics"].SerializeToString,
                                      response_deserializer=(commands or old["OrchestratorCommand"]).FromString)
    return join, heartbeat


class CompatibilityTest(ClusterTestCase):
    def test_an_old_worker_joins_a_new_orchestrator(self):
        old = old_messages()
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        join, heartbeat = old_worker_calls(self, orchestrator.port, old)
        ack = join(old["NodeInfo"](node_id="veteran", hostname="old-host", cpu_count=4, memory_total_bytes=8 << 30,
                                   platform="Linux-5.10-x86_64", cares_version="0.2.0"), timeout=5)
        done = threading.Event()
        self.addCleanup(done.set)

        def samples():
            for sequence in range(1, 100):
                yield old["NodeMetrics"](node_id="veteran", session_id=ack.session_id, cpu_percent=21.5,
                                         memory_percent=43.0, memory_used_bytes=3 << 30, memory_total_bytes=8 << 30,
                                         sent_at_ms=int(time.time() * 1000), sequence=sequence)
                if done.wait(0.2):
                    return
        replies = heartbeat(samples(), timeout=30, metadata=((cares.NODE_METADATA_KEY, "veteran"),
                                                             (cares.SESSION_METADATA_KEY, ack.session_id)))
        self.assertEqual(next(replies).set_heartbeat_interval_ms, 200)  # the old worker understands it
        self.assertIsNotNone(wait_until(lambda: cpu_of(orchestrator.registry, "veteran") == 21.5, 5))
        row = next(row for row in cares.fetch_status(f"127.0.0.1:{orchestrator.port}") if row["node_id"] == "veteran")
        self.assertEqual((row["status"], row["cpu_percent"], row["memory_percent"], row["version"]),
                         ("Active", 21.5, 43.0, "0.2.0"))
        self.assertEqual(row["metrics"]["memory_used_bytes"], 3 << 30)
        for name in ("load_average_1m", "swap_percent", "root_fs_used_percent", "net_receive_bytes_per_s"):
            self.assertIsNone(row["metrics"][name], name)  # not sent: unknown, not 0
        text = row_text(cares.node_row(orchestrator.registry.get("veteran"), cares.table_layout(200), time.time()))
        self.assertIn("21.5%", text)
        self.assertEqual(text.count("–"), 4, text)

    def test_status_rows_carry_the_state_enum_and_the_old_words(self):
        registry = cares.NodeRegistry()
        active(registry, "a")
        row = cares.node_status_message(registry.get("a"))
        self.assertEqual((row.state, row.status), (pb.NODE_STATE_ACTIVE, "Active"))  # the words stay for old clients
        self.assertEqual(cares.status_row(row)["status"], "Active")
        old = pb.NodeStatus(node_id="o", status="Missing")  # an orchestrator older than the field
        self.assertEqual(cares.status_row(old)["status"], "Missing")
        self.assertIs(cares.NodeStatus.of_row(0, "Missing"), cares.NodeStatus.MISSING)
        self.assertIs(cares.NodeStatus.of_row(pb.NODE_STATE_JOINING, "Active"), cares.NodeStatus.JOINING)  # state wins
        self.assertIsNone(cares.NodeStatus.of_row(99, "Active"))  # a newer state this client does not know
        self.assertEqual(cares.status_row(pb.NodeStatus(node_id="n", state=99, status="Resting\x1b[2J"))["status"],
                         "Resting?[2J")
        self.assertEqual({status.wire for status in cares.NodeStatus},
                         {pb.NODE_STATE_JOINING, pb.NODE_STATE_ACTIVE, pb.NODE_STATE_DISCONNECTED, pb.NODE_STATE_MISSING})

    def test_a_new_worker_streams_to_an_old_orchestrator(self):
        old = old_messages()
        received, joins = [], []

        def join(request, context):
            joins.append(request)
            return old["Acknowledgement"](accepted=True, session_id="old-session", heartbeat_interval_ms=100)

        def heartbeat(request_iterator, context):
            for message in request_iterator:
                received.append(message)
                if message.leaving:
                    return
            yield from ()

        handler = grpc.method_handlers_generic_handler("cares.v1.ClusterService", {
            "JoinCluster": grpc.unary_unary_rpc_method_handler(
                join, request_deserializer=old["NodeInfo"].FromString,
                response_serializer=old["Acknowledgement"].SerializeToString),
            "Heartbeat": grpc.stream_stream_rpc_method_handler(
                heartbeat, request_deserializer=old["NodeMetrics"].FromString,
                response_serializer=old["OrchestratorCommand"].SerializeToString)})
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        client = cares.WorkerClient(f"127.0.0.1:{port}", "modern", FixedSampler(12.0, 34.0), secret="s" * 32,
                                    labels={"role": "web"})
        client.start()
        self.addCleanup(client.stop, False, 0.5)
        self.assertIsNotNone(wait_until(lambda: len(received) >= 5, 10), received)
        self.assertEqual(client.state.phase, cares.ConnectionPhase.CONNECTED)
        self.assertEqual((joins[0].node_id, joins[0].cares_version), ("modern", cares.VERSION))
        sample = received[-1]
        self.assertEqual((sample.node_id, sample.session_id, sample.cpu_percent, sample.memory_percent),
                         ("modern", "old-session", 12.0, 34.0))
        self.assertEqual([message.sequence for message in received], list(range(1, len(received) + 1)))
        client.stop()
        self.assertIsNotNone(wait_until(lambda: received[-1].leaving, 5), "no goodbye")


# ---------------------------------------------------------------------------
# On-demand detail (issue 17): processes, mounts, interfaces, sensors and
# containers of the real machine, asked over the Heartbeat stream only while
# someone looks, bounded both ways.
# ---------------------------------------------------------------------------

BUSY_LOOP = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass"


def busy_process(test, seconds=60, marker="cares-busy-marker"):
    """A real process that keeps one CPU busy (ended on cleanup, or after seconds on its own)."""
    process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(seconds), marker], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    test.addCleanup(process.wait, 10)
    test.addCleanup(process.kill)
    return process


def mount_tmpfs(test, size):
    """A real tmpfs of size (e.g. "8m") on a new folder, unmounted on cleanup; the test is skipped,
    with the reason, where the machine does not allow mounting."""
    folder = tempfile.mkdtemp(prefix="cares-test-tmpfs-")
    test.addCleanup(os.rmdir, folder)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True,
                             text=True) if shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        test.skipTest(f"cannot mount a tmpfs here: {mounted.stderr.strip() if mounted else 'no mount(8)'}")
    test.addCleanup(subprocess.run, ["umount", "-l", folder], capture_output=True)
    return folder


def top_pid(detail, key=lambda process: process.cpu_percent):
    if detail is None or not detail.processes:
        return None
    return max(detail.processes, key=key).pid


def pids_in(detail):
    return {process.pid for process in detail.processes} if detail is not None else set()


class DetailSamplerTest(unittest.TestCase):
    def test_a_busy_process_tops_the_cpu_order_and_leaves_when_it_ends(self):
        busy = busy_process(self)
        sampler = cares.DetailSampler()
        first = sampler.snapshot()
        self.assertEqual(first.window_s, 0)  # rates need two readings: none are invented
        self.assertTrue(all(process.cpu_percent == 0 for process in first.processes))
        snapshots = []
        self.assertIsNotNone(wait_until(lambda: snapshots.append(sampler.snapshot()) or
                                        top_pid(snapshots[-1]) == busy.pid, 10, interval=0.3),
                             [(p.pid, p.name, p.cpu_percent) for p in snapshots[-1].processes[:5]])
        process = next(p for p in snapshots[-1].processes if p.pid == busy.pid)
        self.assertGreater(process.cpu_percent, 40)
        self.assertEqual(process.user, pwd.getpwuid(os.getuid()).pw_name)
        self.assertEqual(process.command_line, "")  # names only unless the worker shares command lines
        self.assertTrue(process.name.startswith("python"), process.name)
        self.assertGreaterEqual(process.threads, 1)
        self.assertGreater(process.rss_bytes, 1 << 20)  # a Python process holds a few MiB at least
        self.assertGreaterEqual(snapshots[-1].process_count, len(snapshots[-1].processes))
        self.assertLessEqual(len(snapshots[-1].processes), 3 * cares.TOP_PROCESSES)
        # The top by memory is there too, whatever its CPU.
        biggest = max(psutil.process_iter(["memory_info"], ad_value=None),
                      key=lambda p: p.info["memory_info"].rss if p.info["memory_info"] else 0)
        self.assertIn(biggest.pid, pids_in(sampler.snapshot()))
        busy.kill()
        busy.wait(10)
        self.assertNotIn(busy.pid, pids_in(sampler.snapshot()))
        self.assertEqual(sampler.taken, len(snapshots) + 3)

    def test_command_lines_only_when_shared_and_no_processes_when_off(self):
        busy = busy_process(self, marker="cares-secret-in-argv")
        shared = cares.DetailSampler(share_command_lines=True).snapshot()
        mine = next(p for p in shared.processes if p.pid == os.getpid() or p.pid == busy.pid)
        self.assertTrue(mine.command_line, mine)
        busy_line = [p.command_line for p in shared.processes if p.pid == busy.pid]
        if busy_line:  # among the top by memory or I/O it may not be, with no CPU window yet
            self.assertIn("cares-secret-in-argv", busy_line[0])
        self.assertLessEqual(max(len(p.command_line) for p in shared.processes), cares.COMMAND_LINE_LIMIT)
        hidden = cares.DetailSampler(share_processes=False).snapshot()
        self.assertEqual((len(hidden.processes), hidden.process_count), (0, 0))
        self.assertIn("/", [mount.mountpoint for mount in hidden.mounts])  # the rest is still shared

    def test_mounts_and_interfaces_are_the_machines_own(self):
        detail = cares.DetailSampler().snapshot()
        root = next(mount for mount in detail.mounts if mount.mountpoint == "/")
        usage = psutil.disk_usage("/")
        self.assertEqual(root.total_bytes, usage.total)
        self.assertAlmostEqual(root.used_percent, usage.percent, delta=1.0)
        expected = {name for name in psutil.net_if_stats() if name != "lo"}
        self.assertEqual({nic.name for nic in detail.interfaces}, expected)
        for nic in detail.interfaces:
            self.assertEqual(nic.up, psutil.net_if_stats()[nic.name].isup)
        kinds = {pb.TEMPERATURE_CELSIUS: "temperatures", pb.FAN_RPM: "fans"}
        reported = sum(len(readings) for name in kinds.values()
                       for readings in (getattr(psutil, f"sensors_{name}", lambda: {})() or {}).values())
        self.assertEqual(len(detail.sensors), min(reported, cares.DETAIL_LIST_LIMIT))

    def test_a_tmpfs_mounted_here_shows_with_its_size(self):
        folder = mount_tmpfs(self, "8m")
        with open(os.path.join(folder, "filler"), "wb") as file:
            file.write(os.urandom(1 << 20))
        mount = next((m for m in cares.read_mounts() if m.mountpoint == folder), None)
        self.assertIsNotNone(mount, [m.mountpoint for m in cares.read_mounts()])
        self.assertEqual((mount.fstype, mount.total_bytes), ("tmpfs", 8 << 20))
        self.assertGreaterEqual(mount.used_bytes, 1 << 20)
        self.assertAlmostEqual(mount.used_percent, 12.5, delta=1.0)

    def test_a_cgroup_with_a_busy_process_shows_with_its_cpu(self):
        root = cares.cgroup2_root()
        if not root:
            self.skipTest("no cgroup v2 hierarchy is mounted here")
        name = f"cares-test-{os.getpid()}"
        path = os.path.join(root, name)
        try:
            os.mkdir(path)
        except OSError as error:
            self.skipTest(f"cannot create a cgroup under {root}: {error.strerror}")
        self.addCleanup(lambda: wait_until(lambda: _try_rmdir(path), 5))
        busy = busy_process(self)
        with open(os.path.join(path, "cgroup.procs"), "w") as procs:
            procs.write(str(busy.pid))
        sampler = cares.DetailSampler()
        found = []

        def busy_group():
            found[:] = [c for c in sampler.snapshot().containers if c.id == name]
            return found and found[0].cpu_percent > 40
        self.assertIsNotNone(wait_until(busy_group, 10, interval=0.3), found)
        self.assertEqual((found[0].name, found[0].engine, found[0].pids), (name, "cgroup", 1))
        busy.kill()
        busy.wait(10)
        self.assertIsNotNone(wait_until(lambda: not [c for c in sampler.snapshot().containers if c.id == name], 5))

    def test_container_names_come_from_the_engine_api_on_its_socket(self):
        container_id = "ab" * 32
        self.assertEqual(cares.cgroup_identity(f"system.slice/docker-{container_id}.scope", {}),
                         ("docker", container_id, container_id[:12]))
        self.assertEqual(cares.cgroup_identity(f"machine.slice/libpod-{container_id}.scope", {}),
                         ("podman", container_id, container_id[:12]))
        self.assertEqual(cares.cgroup_identity("system.slice/nginx.service", {}),
                         ("systemd", "system.slice/nginx.service", "nginx.service"))
        # An HTTP server on a unix socket answering the Engine API's /containers/json, as dockerd does.
        folder = tempfile.mkdtemp(prefix="cares-test-engine-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "docker.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4)
        self.addCleanup(listener.close)
        body = json.dumps([{"Id": container_id, "Names": ["/web-frontend"]}, {"Id": 7}, "junk"]).encode()

        def serve():
            connection, _ = listener.accept()
            with connection:
                request = connection.recv(65536)
                ok = request.startswith(b"GET /containers/json ")
                connection.sendall((b"HTTP/1.1 200 OK\r\n" if ok else b"HTTP/1.1 404 Not Found\r\n") +
                                   b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        threading.Thread(target=serve, daemon=True).start()
        self.assertEqual(cares.engine_container_names(path), {container_id: "web-frontend", "7": ""})
        self.assertEqual(cares.cgroup_identity(f"system.slice/docker-{container_id}.scope",
                                               {container_id: ("docker", "web-frontend")}),
                         ("docker", container_id, "web-frontend"))
        self.assertEqual(cares.engine_container_names(os.path.join(folder, "absent.sock")), {})
        listener.close()
        os.unlink(path)
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts and never answers
        silent.bind(path)
        silent.listen(1)
        self.addCleanup(silent.close)
        self.assertEqual(cares.engine_container_names(path, timeout=0.2), {})

    def test_any_number_of_entries_fits_under_the_receive_cap(self):
        detail = pb.NodeDetail()
        for number in range(3000):
            detail.processes.add(pid=number, name="n" * 64, user="u" * 32, command_line="c" * 200)
            detail.mounts.add(mountpoint="/m" * 64, device="d" * 64)
            detail.containers.add(id="i" * 64, name="n" * 64)
        cut = cares.fit_detail(detail, cares.DETAIL_BYTE_BUDGET)
        self.assertLessEqual(detail.ByteSize(), cares.DETAIL_BYTE_BUDGET)
        self.assertEqual(cut, 9000 - len(detail.processes) - len(detail.mounts) - len(detail.containers))
        message = metrics("n", "s" * 32, 1, detail=detail, **{name: 1.0 for name in (
            "swap_percent", "load_average_1m", "disk_read_bytes_per_s", "net_receive_bytes_per_s")})
        self.assertLess(message.ByteSize(), cares.MAX_MESSAGE_BYTES)
        real = cares.DetailSampler(share_command_lines=True).snapshot()
        self.assertLessEqual(real.ByteSize(), cares.DETAIL_BYTE_BUDGET)


class DetailTextTest(unittest.TestCase):
    def test_the_notice_says_where_the_data_comes_from_or_why_there_is_none(self):
        offer, now = cares.DetailOffer(processes=True, command_lines=False), 1000.0
        detail = pb.NodeDetail(process_count=212, window_s=1.0)
        active, gone = cares.NodeStatus.ACTIVE, cares.NodeStatus.DISCONNECTED
        self.assertEqual(cares.detail_notice("0.3.0", None, active, None, 0.0, now),
                         "This node runs cares 0.3.0, which cannot send processes, disks or containers on demand "
                         "(0.4 and later can).")
        self.assertIn("Asking the worker", cares.detail_notice("0.4.0", offer, active, None, 0.0, now))
        self.assertEqual(cares.detail_notice("0.4.0", offer, gone, None, 0.0, now), "No detail: the node is Disconnected.")
        self.assertEqual(cares.detail_notice("0.4.0", offer, active, detail, 998.0, now),
                         "Snapshot 2s ago: 212 processes, command lines not shared (names only).")
        detail.own_processes_only, detail.left_out = True, 7
        text = cares.detail_notice("0.4.0", cares.DetailOffer(True, True), gone, detail, 880.0, now)
        self.assertEqual(text, "Snapshot 2m ago (from 2m ago, the node is Disconnected): 212 processes (its own "
                               "user's only: the worker's sandbox hides the rest), command lines shared "
                               "(--share-cmdlines), 7 entries left out to fit.")
        self.assertIn("processes not shared (--no-processes)",
                      cares.detail_notice("0.4.0", cares.DetailOffer(False, False), active, detail, now, now))

    def test_rows_sort_like_htop_and_the_selection_follows_the_process(self):
        detail = pb.NodeDetail()
        for pid, cpu, rss, rate in ((10, 5.0, 300, 0.0), (11, 90.0, 100, 5.0), (12, 1.0, 900, 2.0), (13, 0.0, 50, 9.0)):
            detail.processes.add(pid=pid, cpu_percent=cpu, rss_bytes=rss, io_bytes_per_s=rate, name=f"p{pid}",
                                 user="root", state="running", threads=1)
        state = cares.DetailState()
        orders = {cares.ProcessOrder.CPU: [11, 10, 12, 13], cares.ProcessOrder.MEMORY: [12, 10, 11, 13],
                  cares.ProcessOrder.IO: [13, 11, 12, 10]}
        for order, pids in orders.items():
            state.order = order
            self.assertEqual([p.pid for p in cares.prepare_processes(detail, state, 10).rows], pids, order)
        state.order, state.selected_pid = cares.ProcessOrder.CPU, 12
        view = cares.prepare_processes(detail, state, 2)  # two rows: the selection is kept in view
        self.assertEqual(([p.pid for p in view.rows], view.selected_index), ([10, 12], 2))
        cares.move_process_selection(state, view, -2, detail)
        self.assertEqual(state.selected_pid, 11)
        self.assertEqual([p.pid for p in cares.prepare_processes(detail, state, 2).rows], [11, 10])
        line = cares.process_line(detail.processes[1])
        self.assertEqual(line.split()[:7], ["11", "root", "90.0", "100", "B", "5B", "R"])
        self.assertEqual(cares.worker_exec_args("10.0.0.5:50051", detail_offer=cares.DetailOffer(False, True)),
                         ["worker", "10.0.0.5:50051", "--headless", "--share-cmdlines", "--no-processes"])


def _try_rmdir(path):
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


class DetailOverHeartbeatTest(ClusterTestCase):
    def test_the_orchestrator_sees_a_busy_process_within_three_intervals_and_then_sees_it_go(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=1000)
        worker = self.start_worker(orchestrator, "looked-at")
        registry = orchestrator.registry
        self.assert_becomes(registry, "looked-at", cares.NodeStatus.ACTIVE, 5)
        self.assertEqual(registry.get("looked-at").detail_offer, cares.DetailOffer(processes=True, command_lines=False))
        self.assertIsNone(worker.detail.sampler)  # nobody asked: no sampler, no /proc walks
        busy = busy_process(self)

        def watched(predicate):
            def check():
                orchestrator.watch_detail("looked-at")  # what an open detail view does each redraw
                return predicate(registry.get("looked-at").detail)
            return check
        interval = 1.0
        # Its first request primes the worker's reading; the snapshot after it carries the rates.
        self.assertIsNotNone(wait_until(watched(lambda detail: top_pid(detail) == busy.pid), 3 * interval + 0.5),
                             "the busy process was not at the top within three intervals")
        busy.kill()
        busy.wait(10)
        self.assertIsNotNone(wait_until(watched(lambda detail: busy.pid not in pids_in(detail)), 3 * interval + 0.5),
                             "the ended process was still listed after three intervals")

    def test_a_detail_nobody_looks_at_any_more_lapses_on_both_sides(self):
        # Apart from the busy process above: that one must have the CPU to itself (see EXCLUSIVE).
        orchestrator = self.start_orchestrator(heartbeat_ms=1000)
        worker = self.start_worker(orchestrator, "looked-at")
        registry = orchestrator.registry
        self.assert_becomes(registry, "looked-at", cares.NodeStatus.ACTIVE, 5)
        self.assertIsNone(worker.detail.sampler)  # nobody asked: no sampler, no /proc walks
        orchestrator.watch_detail("looked-at")
        self.assertIsNotNone(wait_until(lambda: registry.get("looked-at").detail is not None, 5),
                             "no detail came while it was watched")
        # Nobody looks any more: the asking lapses on both sides and the worker stops on its own.
        self.assertIsNotNone(wait_until(lambda: not registry.detail_watched() and
                                        worker.detail.until < time.monotonic(), 10))
        taken = worker.detail.sampler.taken
        time.sleep(1.5)  # proving nothing happens takes waiting: longer than a detail period (1 s)
        self.assertEqual(worker.detail.sampler.taken, taken)

    def test_a_worker_asked_far_too_often_snapshots_once_a_period_and_stays(self):
        received, asked, finished = [], threading.Event(), threading.Event()
        self.addCleanup(finished.set)

        class Asker(pb_grpc.ClusterServiceServicer):
            def JoinCluster(self, request, context):
                return pb.Acknowledgement(accepted=True, session_id="s", heartbeat_interval_ms=100)

            def Heartbeat(self, request_iterator, context):
                def read():
                    with contextlib.suppress(grpc.RpcError):  # the call ends when the test does
                        for message in request_iterator:
                            received.append(message)
                threading.Thread(target=read, daemon=True).start()
                for _ in range(40):  # a burst below the flood limit, all at once
                    yield pb.OrchestratorCommand(request_detail=pb.DetailRequest())
                asked.set()
                while context.is_active() and not finished.wait(0.05):  # the stream stays open until the test ends
                    pass
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_ClusterServiceServicer_to_server(Asker(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        client = cares.WorkerClient(f"127.0.0.1:{port}", "asked", FixedSampler(1.0, 2.0))
        client.start()
        self.addCleanup(client.stop, False, 0.5)
        self.assertIsNotNone(wait_until(lambda: len(received) >= 25, 15), len(received))
        with_detail = [message for message in received if message.HasField("detail")]
        span = (received[-1].sent_at_ms - received[0].sent_at_ms) / 1000.0
        # One snapshot per DETAIL_MIN_PERIOD_S at most (the prime is never sent), whatever was asked.
        self.assertGreaterEqual(len(with_detail), 1)
        self.assertLessEqual(len(with_detail), span / cares.DETAIL_MIN_PERIOD_S + 1, (len(with_detail), span))
        self.assertLessEqual(client.detail.sampler.taken, len(with_detail) + 1)
        self.assertEqual(client.state.phase, cares.ConnectionPhase.CONNECTED)

    def test_detail_unasked_or_hostile_is_ignored_or_made_safe(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        stub = raw_stub(self, orchestrator.port)
        offer = pb.DetailOffer(processes=True, command_lines=False)
        session = stub.JoinCluster(pb.NodeInfo(node_id="liar", detail_offer=offer), timeout=5).session_id
        stream = OpenStream(self, stub, "liar", session)
        hostile = pb.NodeDetail(window_s=float("nan"), process_count=3)
        hostile.processes.add(pid=1, name="evil\x1b[2Jname", user="\x07root", command_line="--password=hunter2",
                              cpu_percent=float("inf"), io_bytes_per_s=-5.0)
        for number in range(200):
            hostile.mounts.add(mountpoint=f"/m{number}\n", used_percent=float("nan"))
        hostile.sensors.add(kind=99, chip="x", value=float("-inf"))
        stream.send(metrics("liar", session, 1, detail=hostile))
        registry = orchestrator.registry
        self.assertIsNotNone(wait_until(lambda: cpu_of(registry, "liar") == 10.0, 5))
        self.assertIsNone(registry.get("liar").detail)  # nobody asked: not even stored
        orchestrator.watch_detail("liar")
        stream.send(metrics("liar", session, 2, detail=hostile))
        self.assertIsNotNone(wait_until(lambda: registry.get("liar").detail is not None, 5))
        safe = cares.safe_detail(registry.get("liar").detail, registry.get("liar").detail_offer)
        process = safe.processes[0]
        self.assertEqual((process.name, process.user, process.command_line), ("evil?[2Jname", "?root", ""))
        self.assertEqual((process.cpu_percent, process.io_bytes_per_s, safe.window_s), (0.0, 0.0, 0.0))
        self.assertEqual(len(safe.mounts), cares.DETAIL_LIST_LIMIT)
        self.assertEqual(safe.left_out, 200 - cares.DETAIL_LIST_LIMIT)
        self.assertEqual(safe.mounts[0].mountpoint, "/m0?")
        self.assertEqual((safe.sensors[0].kind, safe.sensors[0].value), (0, 0.0))
        # More than the receive cap: that stream is refused, the orchestrator serves on.
        flood = pb.NodeDetail()
        for number in range(2000):
            flood.processes.add(pid=number, command_line="x" * 200)
        stream.send(metrics("liar", session, 3, detail=flood))
        self.assertEqual(stream.outcome(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual([row["node_id"] for row in cares.fetch_status(f"127.0.0.1:{orchestrator.port}")], ["liar"])


class DetailStatusCommandTest(ClusterTestCase):
    def test_status_top_prints_the_workers_detail_as_json_and_as_text(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        self.start_worker(orchestrator, "inspected")
        self.assert_becomes(orchestrator.registry, "inspected", cares.NodeStatus.ACTIVE, 5)
        address = f"127.0.0.1:{orchestrator.port}"
        result = self.run_cares("status", address, "inspected", "--top", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        reply = json.loads(result.stdout)
        self.assertEqual((reply["node"]["node_id"], reply["shares"]), ("inspected", {"processes": True,
                                                                                    "command_lines": False}))
        detail = reply["detail"]
        self.assertGreater(detail["window_s"], 0)
        self.assertIn(os.getpid(), [process["pid"] for process in detail["processes"]])  # this test is big enough
        self.assertTrue(all(process["command_line"] is None for process in detail["processes"]))
        self.assertIn("/", [mount["mountpoint"] for mount in detail["mounts"]])
        self.assertEqual({nic["name"] for nic in detail["interfaces"]},
                         {name for name in psutil.net_if_stats() if name != "lo"})
        self.assertIn("names only", reply["notice"])
        text = self.run_cares("status", address, "inspected", "--top")
        self.assertEqual(text.returncode, 0, text.stderr)
        for expected in ("Node inspected  Active", "PID USER", "MOUNTED ON", "INTERFACE", "Sensors",
                         "Containers and services"):
            self.assertIn(expected, text.stdout)
        unknown = self.run_cares("status", address, "nobody", "--top")
        self.assert_one_line_error(unknown, 1)
        self.assertIn("no node 'nobody' is known", unknown.stderr)
        usage = self.run_cares("status", address, "inspected")
        self.assert_one_line_error(usage, 2)


class DetailCompatibilityTest(ClusterTestCase):
    def test_an_old_worker_is_never_asked_and_status_says_so_in_one_line(self):
        old = old_messages()
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        # Commands read as today's messages: a DetailRequest would show, where the old worker would skip it.
        join, heartbeat = old_worker_calls(self, orchestrator.port, old, commands=pb.OrchestratorCommand)
        ack = join(old["NodeInfo"](node_id="veteran", cares_version="0.2.0"), timeout=5)
        done = threading.Event()
        self.addCleanup(done.set)

        def samples():
            for sequence in range(1, 200):
                yield old["NodeMetrics"](node_id="veteran", session_id=ack.session_id, cpu_percent=1.0,
                                         memory_percent=2.0, sequence=sequence)
                if done.wait(0.2):
                    return
        replies = heartbeat(samples(), timeout=30, metadata=((cares.NODE_METADATA_KEY, "veteran"),
                                                             (cares.SESSION_METADATA_KEY, ack.session_id)))
        commands = []
        threading.Thread(target=lambda: commands.extend(replies), daemon=True).start()
        self.assert_becomes(orchestrator.registry, "veteran", cares.NodeStatus.ACTIVE, 5)
        result = self.run_cares("status", f"127.0.0.1:{orchestrator.port}", "veteran", "--top")
        self.assertEqual(result.returncode, 1, result)
        self.assertIn("runs cares 0.2.0, which cannot send processes", result.stdout)
        self.assertNotIn("Traceback", result.stderr)
        done.set()
        self.assertIsNotNone(wait_until(lambda: commands and not replies.running(), 10))
        self.assertEqual({command.WhichOneof("command") for command in commands}, {"set_heartbeat_interval_ms"})

    def test_status_top_against_an_orchestrator_older_than_detail(self):
        handler = grpc.method_handlers_generic_handler("cares.v1.StatusService", {
            "ListNodes": grpc.unary_unary_rpc_method_handler(
                lambda request, context: pb.NodeList(), request_deserializer=pb.ListNodesRequest.FromString,
                response_serializer=pb.NodeList.SerializeToString)})
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        result = self.run_cares("status", f"127.0.0.1:{port}", "anyone", "--top")
        self.assert_one_line_error(result, 1)
        self.assertIn("older than cares 0.4 and cannot fetch a node's detail", result.stderr)


# ---------------------------------------------------------------------------
# History (issue 18): downsampled tiers in SQLite, written by their own thread,
# surviving restarts, full disks, locks and corruption.
# ---------------------------------------------------------------------------

class SequenceSampler(cares.LocalSampler):
    """A worker's sampler that reports a known sequence and records every sample it hands out."""

    def __init__(self, values):
        super().__init__()
        self.values, self.sent = list(values), []

    def sample(self):
        cpu = self.values[len(self.sent) % len(self.values)]
        metrics = cares.Metrics(cpu_percent=cpu, memory_percent=100.0 - cpu, load_average_1m=cpu / 10.0,
                                net_receive_bytes_per_s=cpu * 1000.0)
        self.sent.append(metrics)
        return metrics


class ManualClock:
    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def history_store(test, clock=None, days=cares.DEFAULT_HISTORY_DAYS, folder=None):
    folder = folder or tempfile.mkdtemp(prefix="cares-test-history-")
    test.addCleanup(shutil.rmtree, folder, True)
    events = cares.EventLog()
    store = cares.HistoryStore(folder, "127.0.0.1:1", events, days, clock=clock or time.time)
    test.addCleanup(store.stop, 2.0)
    return store, events, folder


def expected_buckets(samples, bucket_s):
    """(start -> (count, average, max)) of (time, value) samples, computed here, not by cares."""
    buckets = collections.defaultdict(list)
    for at, value in samples:
        buckets[int(at // bucket_s * bucket_s)].append(value)
    return {start: (len(values), sum(values) / len(values), max(values)) for start, values in buckets.items()}


class HistoryStoreTest(unittest.TestCase):
    def test_samples_waiting_for_their_write_are_nothing_the_garbage_collector_counts(self):
        # At 10,000 nodes, an object kept per sample until the minute's write (a copy, or the
        # Metrics itself past the registry's next sample) meant ~200 more garbage collections a
        # minute in the orchestrator (+5-8 % of a core). The collector starts one after every 700
        # objects made and still alive (gc.get_count()[0]); the registry's own use is net zero:
        # each sample's Metrics replaces its node's last one.
        clock = ManualClock()
        clock.now = 1_800_000_000.0
        store, _, _ = history_store(self, clock)
        node_ids = [f"node-{number:05d}" for number in range(2000)]
        latest = {node_id: cares.Metrics() for node_id in node_ids}  # each node's last sample, as the registry keeps it
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        before = gc.get_count()[0]
        for round_ in range(10):
            for number, node_id in enumerate(node_ids):
                latest[node_id] = metrics = cares.Metrics(cpu_percent=float((number + round_) % 100), memory_percent=5.0)
                store.add(node_id, metrics)
        self.assertIsNotNone(wait_until(lambda: not store._pending, 10), "the history thread never took them")
        self.assertLess(gc.get_count()[0] - before, 200)
        gc.enable()
        # ... and they are all there: each node's ten samples in its minute, not written yet.
        expected = [(10, sum(float((7 + round_) % 100) for round_ in range(10)) / 10)]
        series = store.series("node-00007", cares.HistoryRange.HOUR)
        self.assertEqual([(bucket.samples, bucket.averages["cpu_percent"]) for bucket in series.buckets], expected)
        # The write makes each node's row as SQLite takes it: all 2,000 built first (and the
        # rows they came from) were tens of thousands of objects alive at once, dozens of
        # collections (and a push into the oldest generation) every minute.
        collections_started = []

        def count(phase, info):
            if phase == "start":
                collections_started.append(info["generation"])
        gc.callbacks.append(count)
        self.addCleanup(gc.callbacks.remove, count)
        store.flush()
        self.assertLessEqual(len(collections_started), 6, collections_started)
        series = store.series("node-00007", cares.HistoryRange.HOUR)  # now read back from SQLite
        self.assertEqual([(bucket.samples, bucket.averages["cpu_percent"]) for bucket in series.buckets], expected)

    def test_every_tier_holds_the_average_and_maximum_of_what_was_sent(self):
        clock = ManualClock()
        store, events, _ = history_store(self, clock)
        samples = []
        for step in range(400):  # 400 samples, 5 s apart: 34 minutes, four 10-minute buckets
            clock.now = 1_800_000_000.0 + step * 5
            value = round((step * 37) % 1000 / 10.0, 1)
            samples.append((clock.now, value))
            store.add("web07", cares.Metrics(cpu_percent=value, memory_percent=50.0))
        store.flush()
        for span in (cares.HistoryRange.HOUR, cares.HistoryRange.DAY, cares.HistoryRange.WEEK):
            series = store.series("web07", span)
            expected = expected_buckets(samples, series.bucket_s)
            got = {bucket.start: (bucket.samples, bucket.averages["cpu_percent"], bucket.maxima["cpu_percent"])
                   for bucket in series.buckets}
            self.assertEqual(set(got), set(expected), span)
            for start, (count, average, peak) in expected.items():
                self.assertEqual(got[start][0], count)
                self.assertAlmostEqual(got[start][1], average, places=6)
                self.assertEqual(got[start][2], peak)
            self.assertNotIn("swap_percent", series.buckets[0].averages)  # never sent: not a zero
        self.assertEqual([text for text in texts(events) if "history" in text.lower()], [])

    def test_coarse_tiers_are_rolled_up_once_across_restarts_and_pruning(self):
        """Three hours of samples with a restart in the middle: the 1-minute buckets older than
        an hour are gone, and the 10-minute and 1-hour buckets still hold every sample once."""
        clock = ManualClock()
        store, _, folder = history_store(self, clock)
        samples = []
        for step in range(3 * 720):  # 5 s apart, a write every 30 s as the history thread does
            clock.now = 1_800_000_000.0 + step * 5
            value = round((step * 53) % 997 / 10.0, 1)
            samples.append((clock.now, value))
            store.add("steady", cares.Metrics(cpu_percent=value, memory_percent=1.0))
            if step % 6 == 5:
                store.flush()
            if step == 1000:  # the orchestrator restarts: the roll-up goes on where it stopped
                store.stop()
                store, _, _ = history_store(self, clock, folder=folder)
            if step % 720 == 719:
                store._prune()
        store.flush()
        for span in (cares.HistoryRange.DAY, cares.HistoryRange.WEEK):
            series = store.series("steady", span)
            expected = expected_buckets(samples, series.bucket_s)
            got = {bucket.start: (bucket.samples, round(bucket.averages["cpu_percent"], 6),
                                  bucket.maxima["cpu_percent"]) for bucket in series.buckets}
            self.assertEqual(got, {start: (count, round(average, 6), peak)
                                   for start, (count, average, peak) in expected.items()}, span)
        db = sqlite3.connect(os.path.join(folder, "history-127.0.0.1_1.sqlite"))
        self.addCleanup(db.close)
        oldest_minute = db.execute("SELECT min(start) FROM buckets WHERE tier = 0").fetchone()[0]
        self.assertGreaterEqual(oldest_minute, clock.now - 3600 - 2 * 60)

    def test_a_database_from_before_the_roll_up_is_not_counted_twice(self):
        folder = tempfile.mkdtemp(prefix="cares-test-history-")
        self.addCleanup(shutil.rmtree, folder, True)
        db = sqlite3.connect(os.path.join(folder, "history-127.0.0.1_1.sqlite"), isolation_level=None)
        for statement in cares._HISTORY_SCHEMA:
            if "rollup" not in statement:  # the schema as 0.4.0's first history wrote it
                db.execute(statement)
        db.execute("INSERT INTO nodes (node_id) VALUES ('old')")
        minute = 1_800_000_000 - 300
        blank = [None] * (2 * len(cares.HISTORY_METRICS) - 2)
        for tier, tier_spec in enumerate(cares.HISTORY_TIERS):  # every tier written directly, as then
            db.execute(cares._BUCKET_UPSERT, (1, tier, minute // tier_spec.bucket_s * tier_spec.bucket_s, 4,
                                              200, 80, *blank))
        db.close()
        clock = ManualClock()
        store, _, _ = history_store(self, clock, folder=folder)
        store.add("old", cares.Metrics(cpu_percent=20.0, memory_percent=1.0))
        clock.now += 600
        store.flush()
        day = store.series("old", cares.HistoryRange.DAY)
        self.assertEqual(sum(bucket.samples for bucket in day.buckets), 5)
        self.assertAlmostEqual(day.summary("cpu_percent")[1], (20.0 + 4 * 5.0) / 5, places=6)

    def test_a_gap_is_a_gap_and_old_buckets_are_pruned(self):
        clock = ManualClock()
        store, _, folder = history_store(self, clock, days=1)
        for offset in (0, 5, 1200, 1205):  # nothing for 20 minutes in between
            clock.now = 1_800_000_000.0 + offset
            store.add("gappy", cares.Metrics(cpu_percent=40.0, memory_percent=10.0))
        store.flush()
        series = store.series("gappy", cares.HistoryRange.HOUR)
        values = series.values("cpu_percent", 60)
        self.assertEqual([round(value) for value in values if not math.isnan(value)], [40, 40])
        self.assertGreaterEqual(sum(math.isnan(value) for value in values), 58)  # blanks, never zeros
        self.assertNotIn(0.0, values)
        clock.now += 2 * 3600  # the 1-minute tier keeps an hour; the 10-minute tier a day
        store.add("gappy", cares.Metrics(cpu_percent=1.0, memory_percent=1.0))
        store._prune()
        store.flush()
        db = sqlite3.connect(os.path.join(folder, "history-127.0.0.1_1.sqlite"))
        self.addCleanup(db.close)
        tiers = dict(db.execute("SELECT tier, count(*) FROM buckets WHERE start < ? GROUP BY tier",
                                (int(clock.now) - 3600,)))
        self.assertEqual(tiers.get(0), None)
        self.assertEqual(tiers.get(1), 2)
        clock.now += 2 * 86400  # --history-days 1: nothing is kept beyond a day, whatever the tier
        store._prune()
        self.assertEqual(db.execute("SELECT count(*) FROM buckets").fetchone()[0], 0)

    def test_a_partial_bucket_and_the_rest_after_a_restart_add_up(self):
        clock = ManualClock()
        store, _, folder = history_store(self, clock)
        store.add("n", cares.Metrics(cpu_percent=10.0, memory_percent=1.0))
        store.stop()
        again, _, _ = history_store(self, clock, folder=folder)
        clock.now += 10
        again.add("n", cares.Metrics(cpu_percent=30.0, memory_percent=1.0))
        again.flush()
        bucket = again.series("n", cares.HistoryRange.HOUR).buckets[-1]
        self.assertEqual((bucket.samples, bucket.averages["cpu_percent"], bucket.maxima["cpu_percent"]),
                         (2, 20.0, 30.0))
        again.forget(["n"])
        again.flush()
        self.assertEqual(again.series("n", cares.HistoryRange.HOUR).buckets, [])

    def test_a_corrupt_file_is_kept_aside_and_history_starts_again(self):
        folder = tempfile.mkdtemp(prefix="cares-test-history-")
        path = os.path.join(folder, "history-127.0.0.1_1.sqlite")
        with open(path, "wb") as file:
            file.write(b"this is no database" * 500)
        store, events, _ = history_store(self, folder=folder)
        warnings = [text for text in texts(events) if "history database" in text]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(f"kept as {path}.corrupt, starting a new one; still serving", warnings[0])
        with open(path + ".corrupt", "rb") as file:
            self.assertTrue(file.read().startswith(b"this is no database"))
        store.add("n", cares.Metrics(cpu_percent=5.0, memory_percent=5.0))
        store.flush()
        self.assertEqual(store.series("n", cares.HistoryRange.HOUR).buckets[-1].samples, 1)

    def test_a_locked_database_costs_a_batch_and_one_line(self):
        store, events, folder = history_store(self)
        holder = sqlite3.connect(os.path.join(folder, "history-127.0.0.1_1.sqlite"), isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("BEGIN EXCLUSIVE")
        for _ in range(3):
            store.add("n", cares.Metrics(cpu_percent=5.0, memory_percent=5.0))
            store.flush()
        warnings = [text for text in texts(events) if "Cannot write the history database" in text]
        self.assertEqual(len(warnings), 1, texts(events))
        self.assertIn("locked by another process; still serving", warnings[0])
        self.assertEqual(store.dropped, 3)
        holder.execute("ROLLBACK")
        store.add("n", cares.Metrics(cpu_percent=7.0, memory_percent=5.0))
        store.flush()
        self.assertIn(f"The history database {store.path} is written again.", texts(events))
        self.assertEqual([bucket.averages["cpu_percent"] for bucket in store.series("n", cares.HistoryRange.HOUR).buckets],
                         [7.0])

    def test_a_full_disk_costs_a_batch_and_one_line(self):
        folder = mount_tmpfs(self, "256k")
        store, events, _ = history_store(self, folder=folder)
        filler = os.path.join(folder, "filler")
        descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # the rest of the file system, to the last block
            while os.write(descriptor, b"\0" * 4096):
                pass
        except OSError as error:
            self.assertEqual(error.errno, errno.ENOSPC)
        finally:
            os.close(descriptor)
        for round_ in range(3):
            for number in range(300):
                store.add(f"node-{round_}-{number}", cares.Metrics(cpu_percent=5.0, memory_percent=5.0))
            store.flush()
        warnings = [text for text in texts(events) if "Cannot write the history database" in text]
        self.assertEqual(len(warnings), 1, texts(events))
        self.assertIn("the disk is full", warnings[0])
        os.remove(filler)
        store.add("after", cares.Metrics(cpu_percent=9.0, memory_percent=5.0))
        store.flush()
        self.assertIn(f"The history database {store.path} is written again.", texts(events))
        self.assertEqual(store.series("after", cares.HistoryRange.HOUR).buckets[-1].samples, 1)
        store.stop()


class HistoryAcrossRestartTest(ClusterTestCase):
    def test_buckets_match_what_the_workers_sent_across_an_orchestrator_restart(self):
        folder = tempfile.mkdtemp(prefix="cares-test-history-")
        self.addCleanup(shutil.rmtree, folder, True)
        port = free_port()
        sampler = SequenceSampler([12.5, 40.0, 97.5, 3.0, 55.5])

        def session(orchestrator, count):
            worker = cares.WorkerClient(f"127.0.0.1:{port}", "recorded", sampler, secret="k" * 32)
            worker.start()
            self.addCleanup(worker.stop, False, 0.5)
            self.assertIsNotNone(wait_until(lambda: len(sampler.sent) >= count, 15), len(sampler.sent))
            worker.stop()  # its goodbye comes after every sample it sent
            self.assert_becomes(orchestrator.registry, "recorded", cares.NodeStatus.DISCONNECTED, 5)

        # 200 ms: at 100 ms a worker thread starved for 0.3 s on a loaded machine is lost, not left.
        first = self.start_orchestrator(f"127.0.0.1:{port}", heartbeat_ms=200, state_dir=folder)
        session(first, 12)
        first.stop(0.2)  # writes what history still holds
        before_restart = len(sampler.sent)
        second = self.start_orchestrator(f"127.0.0.1:{port}", heartbeat_ms=200, state_dir=folder)
        session(second, before_restart + 8)
        second.history.flush()
        sent = [metrics.cpu_percent for metrics in sampler.sent]
        series = second.history.series("recorded", cares.HistoryRange.HOUR)
        self.assertEqual(sum(bucket.samples for bucket in series.buckets), len(sent))
        low, average, peak = series.summary("cpu_percent")
        self.assertAlmostEqual(average, sum(sent) / len(sent), places=6)
        self.assertEqual((low <= min(sent) + 100, peak), (True, max(sent)))
        self.assertAlmostEqual(series.summary("load_average_1m")[1], sum(sent) / len(sent) / 10.0, places=2)
        self.assertEqual(series.summary("net_receive_bytes_per_s")[2], max(sent) * 1000.0)
        kinds = [kind for _, kind, _ in series.events]
        self.assertEqual(kinds.count("joined") + kinds.count("rejoined"), 2, kinds)
        self.assertEqual(kinds.count("left"), 2, (kinds, texts(second.registry.events), series.events))
        # The same through `status NODE --history 1h --json`, as an operator reads it.
        result = self.run_cares("status", f"127.0.0.1:{port}", "recorded", "--history", "1h", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        printed = json.loads(result.stdout)
        self.assertEqual(sum(bucket["samples"] for bucket in printed["buckets"]), len(sent))
        self.assertEqual(max(bucket["cpu_percent"]["max"] for bucket in printed["buckets"]), max(sent))
        self.assertIn("left", [event["kind"] for event in printed["events"]])
        text = self.run_cares("status", f"127.0.0.1:{port}", "recorded", "--history", "24h")
        self.assertEqual(text.returncode, 0, text.stderr)
        self.assertIn("24h in 10 min buckets", text.stdout)
        self.assertIn("has left the cluster", text.stdout)

    def test_no_history_kept_and_bad_ranges_are_said_in_one_line(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)  # no state directory: no history
        self.start_worker(orchestrator, "unrecorded")
        self.assert_becomes(orchestrator.registry, "unrecorded", cares.NodeStatus.ACTIVE, 5)
        address = f"127.0.0.1:{orchestrator.port}"
        result = self.run_cares("status", address, "unrecorded", "--history", "1h")
        self.assertEqual(result.returncode, 1, result)
        self.assertIn("keeps no history", result.stdout)
        bad_range = self.run_cares("status", address, "unrecorded", "--history", "2h")  # argparse: usage, then one line
        self.assertEqual(bad_range.returncode, 2)
        self.assertEqual(bad_range.stderr.strip().splitlines()[-1],
                         "cares status: error: argument --history: a history range is one of 1h, 24h, 7d, 30d")
        self.assert_one_line_error(self.run_cares("status", address, "nobody", "--history", "1h"), 1)
        self.assert_one_line_error(self.run_cares("status", address, "unrecorded", "--history", "1h", "--top"), 2)

    def test_a_file_size_limit_costs_history_not_serving(self):
        folder = tempfile.mkdtemp(prefix="cares-test-history-")
        self.addCleanup(shutil.rmtree, folder, True)
        address = f"127.0.0.1:{free_port()}"
        limit = 64  # bytes: neither the state file nor the database can grow
        script = ("import sys, cares; cares.HISTORY_FLUSH_S = 0.3; "
                  "sys.exit(cares.main(sys.argv[1:]))")
        process = subprocess.Popen([sys.executable, "-c", script, "orchestrator", "--listen", address, "--headless",
                                    "--state-dir", folder, "--heartbeat-ms", "200"], cwd=HERE,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                                                    (limit, limit)))
        self.addCleanup(process.stderr.close)
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.kill)
        log = LineCollector(process.stderr)
        client = cares.WorkerClient(address, "limited", cares.LocalSampler())
        client.start()
        self.addCleanup(client.stop, False, 0.5)
        self.assertIsNotNone(wait_until(lambda: "history database" in log.text(), 15), log.text())
        self.assertIsNotNone(wait_until(lambda: [row["status"] for row in cares.fetch_status(address)] == ["Active"],
                                        10))
        wait_until(lambda: False, 1.5)  # several flush periods: the line must not repeat
        self.assertEqual(log.text().count("Cannot write the history database"), 1, log.text())
        self.assertIn("still serving", log.text())
        self.assertNotIn("Traceback", log.text())
        process.terminate()
        self.assertEqual(process.wait(10), 0)


# ---------------------------------------------------------------------------
# Routine operations must not break cares (issue 9): logs that break, stall or
# fill up, SIGHUP, restarts, 10,000-node status, clients from the proto alone.
# ---------------------------------------------------------------------------

def generate_events(test, port, count, prefix="churn"):
    """count joins and goodbyes (two log lines each) from raw clients, as fast as they go."""
    stub = raw_stub(test, port)
    for number in range(count):
        node_id = f"{prefix}-{number:04d}"
        session = stub.JoinCluster(pb.NodeInfo(node_id=node_id), metadata=(("cares-token", "t0k3n"),),
                                   timeout=5).session_id
        stream = OpenStream(test, stub, node_id, session)
        stream.send(metrics(node_id, session, 1), metrics(node_id, session, 2, leaving=True))
        stream.close()
        stream.outcome()


class RoutineOperationsTest(ClusterTestCase):
    def headless_orchestrator(self, *extra, stderr=subprocess.PIPE, wait=True, **kwargs):
        address = f"127.0.0.1:{free_port()}"
        process = self.spawn("orchestrator", "--listen", address, "--headless", "--heartbeat-ms", "100",
                             "--token", "t0k3n", *extra, stderr=stderr, **kwargs)
        if wait:
            self.assert_answers(address)
        return process, address

    def assert_answers(self, address):
        self.assertIsNotNone(wait_until(lambda: listening(address) and self.answers(address), 10),
                             "the orchestrator never answered")

    @staticmethod
    def answers(address, timeout=2.0):
        try:
            return cares.fetch_status(address, token="t0k3n", timeout=timeout) is not None
        except grpc.RpcError:
            return False

    def assert_still_serving(self, address):
        """Joins, streams, the liveness sweep and status all still work."""
        port = int(address.rpartition(":")[2])
        tag = f"probe-{random.randrange(10**6)}"
        client = cares.WorkerClient(address, tag, cares.LocalSampler(), token="t0k3n")
        client.start()
        self.addCleanup(client.stop, False, 0.5)

        def row(node_id):
            rows = [row for row in cares.fetch_status(address, token="t0k3n") if row["node_id"] == node_id]
            return rows[0] if rows else {}
        self.assertIsNotNone(wait_until(lambda: row(tag).get("status") == "Active", 10), f"{tag} never Active")
        stub = raw_stub(self, port)
        session = stub.JoinCluster(pb.NodeInfo(node_id=f"{tag}-mute"), metadata=(("cares-token", "t0k3n"),),
                                   timeout=5).session_id
        mute = OpenStream(self, stub, f"{tag}-mute", session)
        mute.send(metrics(f"{tag}-mute", session, 1))
        self.assertIsNotNone(wait_until(lambda: row(f"{tag}-mute").get("status") == "Disconnected", 10),
                             "the liveness sweep no longer ends silent streams")

    def test_a_closed_or_broken_stderr_never_stops_serving(self):
        started = {"2>&-": self.headless_orchestrator(stderr=subprocess.DEVNULL, preexec_fn=lambda: os.close(2),
                                                      wait=False),
                   "reader gone": self.headless_orchestrator(wait=False)}  # both start at once
        for mode, (process, address) in started.items():
            with self.subTest(mode):
                self.assert_answers(address)
                if mode == "reader gone":
                    process.stderr.close()  # a `| tee` that exited, a log shipper restarting
                generate_events(self, int(address.rpartition(":")[2]), 20)
                self.assert_still_serving(address)
                process.send_signal(signal.SIGTERM)
                self.assertEqual(process.wait(10), 0)

    def test_a_stopped_log_reader_never_stops_serving(self):
        # Every churn node must leave, not be lost: a 1 s heartbeat, as a 0.3 s silence limit is
        # shorter than a stall of this test's own client on a loaded machine (CI: one was lost).
        process, address = self.headless_orchestrator("--heartbeat-ms", "1000")
        # A paused pager or Ctrl-S: nobody reads. A small pipe fills after a few dozen lines.
        fcntl.fcntl(process.stderr.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
        generate_events(self, int(address.rpartition(":")[2]), 150)
        self.assert_still_serving(address)
        log = LineCollector(process.stderr)  # the reader comes back: nothing was lost meanwhile
        generate_events(self, int(address.rpartition(":")[2]), 1, prefix="after")
        self.assertIsNotNone(wait_until(lambda: "Node 'after-0000' has left the cluster." in log.text(), 10))
        lines = log.text()
        for number in range(150):
            self.assertIn(f"Node 'churn-{number:04d}' has left the cluster.", lines)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(10), 0)
        self.assertNotIn("Traceback", log.text())

    def test_an_unhandled_loop_error_with_stderr_unread_never_stalls_the_loop(self):
        script = textwrap.dedent("""
            import asyncio, os, sys, time
            import cares
            read_end, write_end = os.pipe()
            os.set_blocking(write_end, False)
            try:  # fill the pipe: stderr now blocks, like a log nobody reads
                while True:
                    os.write(write_end, b"x" * 4096)
            except BlockingIOError:
                pass
            os.set_blocking(write_end, True)
            os.dup2(write_end, 2)
            loop = cares.grpc_loop()
            for number in range(300):
                loop.call_soon_threadsafe(loop.call_exception_handler,
                                          {"message": "probe", "exception": ValueError(number)})
            cares.run_on_grpc_loop(asyncio.sleep(0), timeout=10)  # the loop still runs
            print("loop runs", flush=True)
            os.set_blocking(read_end, False)
            seen, deadline = b"", time.monotonic() + 10
            while b"ValueError: 99" not in seen and time.monotonic() < deadline:
                try:
                    seen += os.read(read_end, 65536)
                except BlockingIOError:
                    time.sleep(0.01)
            print(seen.decode(errors="replace").replace("x", ""), flush=True)
        """)
        result = subprocess.run([sys.executable, "-c", script], cwd=BYTECODE, capture_output=True, text=True,
                                timeout=60, stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stdout[-500:])
        self.assertIn("loop runs", result.stdout)
        # Once read again, the log gets the first lines (100 wait; the rest are counted as dropped).
        self.assertIn("cares: internal error on the gRPC loop (probe): ValueError: 0\n", result.stdout)
        self.assertIn("log line(s) were dropped", result.stdout)

    def test_a_full_log_disk_never_stops_serving(self):
        folder = tempfile.mkdtemp(prefix="cares-test-full-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "orchestrator.log")
        limit = 16 * 1024
        with open(path, "w") as log:
            process, address = self.headless_orchestrator(
                stderr=log, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
        generate_events(self, int(address.rpartition(":")[2]), 200)  # ~25 kB of log lines
        self.assert_still_serving(address)
        self.assertIsNone(process.poll(), "the orchestrator died on a full disk")
        self.assertLessEqual(os.path.getsize(path), limit)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(10), 0)

    def test_a_worker_whose_stderr_broke_rejoins_after_an_orchestrator_restart(self):
        first = cares.Orchestrator("127.0.0.1:0")
        first.start()
        port = first.port
        worker = self.spawn("worker", f"127.0.0.1:{port}", "--node-id", "orphan", "--headless")
        self.assert_becomes(first.registry, "orphan", cares.NodeStatus.ACTIVE, 10)
        worker.stderr.close()  # the ssh session that started it is gone
        first.stop(0.2)
        second = self.start_orchestrator(f"127.0.0.1:{port}")
        self.assert_becomes(second.registry, "orphan", cares.NodeStatus.ACTIVE, 10)
        self.assertIsNone(worker.poll())

    def test_sighup_keeps_headless_processes_serving(self):
        process, address = self.headless_orchestrator()
        orchestrator_log = LineCollector(process.stderr)
        worker = self.spawn("worker", address, "--node-id", "hangup", "--token", "t0k3n", "--headless")
        worker_log = LineCollector(worker.stderr)
        self.assertIsNotNone(wait_until(lambda: "Node 'hangup' has joined" in orchestrator_log.text(), 10))
        for child, log in ((process, orchestrator_log), (worker, worker_log)):
            child.send_signal(signal.SIGHUP)
            self.assertIsNotNone(wait_until(lambda: "SIGHUP" in log.text(), 5), log.text())
            self.assertIsNone(child.poll())
        self.assert_still_serving(address)
        worker.send_signal(signal.SIGTERM)
        self.assertEqual(worker.wait(10), 0)
        self.assertIsNotNone(wait_until(lambda: "Node 'hangup' has left the cluster." in orchestrator_log.text(), 5),
                             f"orchestrator:\n{orchestrator_log.text()}\nworker:\n{worker_log.text()}")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(10), 0)

    def test_a_hangup_before_the_screen_is_up_still_leaves_cleanly(self):
        # The ssh session drops while the dashboard is still starting (importing asciimatics
        # takes a moment, and the worker is already streaming): it leaves the way q does.
        orchestrator = self.start_orchestrator()
        script = textwrap.dedent("""
            import os, signal, sys, time
            import cares
            config = cares.WorkerConfig(target=sys.argv[1], node_id="early-hangup", state_dir=None)
            app = cares.TuiApp(worker_config=config)

            def start_then_hang_up():
                app.start_worker(config)
                deadline = time.monotonic() + 15
                while app.worker.state.phase is not cares.ConnectionPhase.CONNECTED and time.monotonic() < deadline:
                    time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(5)  # the screen would come up here
                sys.exit("the hangup was not acted on")
            sys.exit(app.run(start=start_then_hang_up))
            """)
        process = subprocess.run([sys.executable, "-c", script, f"127.0.0.1:{orchestrator.port}"], cwd=HERE,
                                 capture_output=True, text=True, timeout=30)
        self.assertEqual((process.returncode, process.stderr), (0, ""))
        self.assert_becomes(orchestrator.registry, "early-hangup", cares.NodeStatus.DISCONNECTED, 10)
        self.assertIn("Node 'early-hangup' has left the cluster.", texts(orchestrator.registry.events))

    def test_refusal_floods_become_summaries(self):
        orchestrator = self.start_orchestrator()
        registry = orchestrator.registry
        registry.refusals.summary.window_s = 0.5
        stub = raw_stub(self, orchestrator.port)
        # 250 in flight at a time: 2,000 at once on one connection made gRPC itself cancel a few
        # (CANCELLED) on a loaded machine, before cares saw them.
        started = time.monotonic()
        for batch in range(0, 2000, 250):
            calls = [stub.JoinCluster.future(pb.NodeInfo(node_id=f"bad id {n}"), timeout=10)
                     for n in range(batch, batch + 250)]
            for call in calls:
                self.assertEqual(call.exception().code(), grpc.StatusCode.INVALID_ARGUMENT)
        def refusals():
            return [text for text in texts(registry.events) if "refused" in text]

        def summed():
            return sum(int(text.split()[0]) for text in refusals()[1:])
        # The first refusal is logged at once; the other 1,999 only as counts in summary lines.
        self.assertIsNotNone(wait_until(lambda: summed() == 1999, 5), refusals())
        # The first line, then at most one summary per window while they came in (and one after).
        windows = (time.monotonic() - started) / registry.refusals.summary.window_s
        self.assertLessEqual(len(refusals()), 2 + math.ceil(windows), refusals())
        self.assertIn("Join from 127.0.0.1 refused: invalid node ID 'bad id ", refusals()[0])
        self.assertRegex(refusals()[1], r"^\d+ joins refused from 127\.0\.0\.1 in the last \d+ s: invalid join\.$")
        self.assertEqual(registry.counters()["refusals"][("join", cares.RefusalReason.INVALID_JOIN)], 2000)

    def test_restarts_leave_no_ghost_rows(self):
        orchestrator = self.start_orchestrator(forget_after_s=1.0)
        registry = orchestrator.registry
        address = f"127.0.0.1:{orchestrator.port}"
        base = cares.default_node_id(socket.gethostname(), cares.machine_identity(), cares.user_name())
        expected = [base, f"{base}-2"]

        def start_both():  # at once: whichever claims the host's ID first, the other takes the next one
            both = [self.spawn("worker", address, "--headless") for _ in expected]
            for node_id in expected:
                self.assert_becomes(registry, node_id, cares.NodeStatus.ACTIVE, 10)
            return both
        for _ in range(2):  # two workers on one host, started and killed twice
            for process in start_both():
                process.kill()
                process.wait(5)
            for node_id in expected:
                self.assert_becomes(registry, node_id, cares.NodeStatus.DISCONNECTED, 5)
            # No third row, in either round (a row may already be forgotten: --forget-after 1 s).
            self.assertLessEqual({node.node_id for node in registry.snapshot()}, set(expected))
        # Rows gone for longer than --forget-after are aged out, headless or not.
        self.assertIsNotNone(wait_until(lambda: len(registry) == 0, 5))
        # Two rows forgotten once, or twice when a loaded machine took over a second to restart
        # them; in one sweep or two each time: never a third row.
        forgot = [text for text in texts(registry.events) if text.startswith("Forgot ")]
        self.assertTrue(all(re.fullmatch(r"Forgot [12] node\(s\) gone for over 1s\.", text) for text in forgot), forgot)
        self.assertIn(sum(int(text.split()[1]) for text in forgot), (2, 4), forgot)

    def test_status_lists_ten_thousand_nodes(self):
        orchestrator = self.start_orchestrator()
        registry = orchestrator.registry
        sample = cares.LocalSampler().sample()
        for number in range(10_000):
            node_id = f"worker-prod-eu-west-1a-{number:05d}"
            session = joined(registry, node_id, address=f"10.{number // 256 % 256}.{number % 256}.7:41234",
                             hostname=f"ip-10-0-{number % 256}-7.eu-west-1.compute.internal",
                             labels={"role": "web", "zone": "eu-west-1a"})
            registry.update(node_id, session, sample, 1)
        address = f"127.0.0.1:{orchestrator.port}"
        result, table = run_side_by_side([([*CARES, "status", address, *extra, "--timeout", "30"], {})
                                          for extra in (["--json"], [])], timeout=60)  # both at once
        self.assertEqual(result.returncode, 0, result.stderr[-500:])
        rows = json.loads(result.stdout)["nodes"]
        self.assertEqual(len(rows), 10_000)
        self.assertEqual(rows[-1]["node_id"], "worker-prod-eu-west-1a-09999")
        self.assertEqual(rows[0]["labels"], {"role": "web", "zone": "eu-west-1a"})
        self.assertEqual(table.returncode, 0, table.stderr[-500:])
        self.assertEqual(len(table.stdout.splitlines()), 10_001)
        # Every reply stayed within the page budget; what the orchestrator receives keeps its 64 KiB cap.
        reply = pb_grpc.StatusServiceStub(grpc.insecure_channel(address)).ListNodes(
            pb.ListNodesRequest(page_size=1000), timeout=10)
        self.assertLessEqual(reply.ByteSize(), cares.STATUS_PAGE_BYTES + 4096)
        self.assertEqual(reply.total_nodes, 10_000)
        with self.assertRaises(grpc.RpcError) as caught:
            raw_stub(self, orchestrator.port).JoinCluster(pb.NodeInfo(node_id="big", hostname="x" * 70_000),
                                                          timeout=5)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)

    def test_a_worker_written_from_the_proto_alone(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        registry = orchestrator.registry
        channel = grpc.insecure_channel(f"127.0.0.1:{orchestrator.port}")
        self.addCleanup(channel.close)
        stub = pb_grpc.ClusterServiceStub(channel)  # nothing of cares: the generated stubs only
        ack = stub.JoinCluster(pb.NodeInfo(node_id="plain", hostname="from-spec"), timeout=5)
        done = threading.Event()
        self.addCleanup(done.set)

        def samples():
            for sequence in range(1, 200):
                yield pb.NodeMetrics(node_id="plain", session_id=ack.session_id, cpu_percent=33.0,
                                     memory_percent=44.0, sequence=sequence)
                if done.wait(0.2):
                    return
        replies = stub.Heartbeat(samples(), timeout=30)
        self.assertIsNotNone(wait_until(lambda: cpu_of(registry, "plain") == 33.0, 5))
        self.assertEqual(registry.get("plain").status, cares.NodeStatus.ACTIVE)
        self.assertEqual(next(replies).set_heartbeat_interval_ms, 200)
        refused = stub.Heartbeat(iter([pb.NodeMetrics(node_id="plain", session_id="guess", sequence=1)]), timeout=5)
        with self.assertRaises(grpc.RpcError) as caught:
            list(refused)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertIn("Heartbeat stream from 127.0.0.1 refused: no joined session.", texts(registry.events))
        self.assertEqual(registry.get("plain").status, cares.NodeStatus.ACTIVE)

    def test_no_invented_values(self):
        orchestrator = self.start_orchestrator()
        registry = orchestrator.registry
        stub = raw_stub(self, orchestrator.port)
        session = stub.JoinCluster(pb.NodeInfo(node_id="silent"), timeout=5).session_id
        OpenStream(self, stub, "silent", session)  # bound, no sample yet
        self.assert_becomes(registry, "silent", cares.NodeStatus.JOINING, 5)
        active(registry, "busy", cpu=80.0, memory=60.0)
        rows = {row["node_id"]: row for row in cares.fetch_status(f"127.0.0.1:{orchestrator.port}")}
        silent = rows["silent"]
        self.assertEqual((silent["status"], silent["cpu_percent"], silent["memory_percent"], silent["last_seen"]),
                         ("Joining", None, None, None))
        self.assertEqual(set(silent["metrics"].values()), {None})
        # An older worker sends CPU and memory only: the rest stays unknown, not 0.
        self.assertIsNone(rows["busy"]["metrics"]["load_average_1m"])
        self.assertEqual(rows["busy"]["metrics"]["cpu_percent"], 80.0)
        table = cares.format_status_table(list(rows.values()))
        self.assertRegex(table, r"silent +\S+ +Joining +- +-  -")
        summary = cares.summarize(registry.snapshot(with_history=False))
        self.assertEqual((summary.cpu_percent, summary.memory_percent), (80.0, 60.0))

    def test_headless_processes_never_load_the_tui(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        script = ("import os, signal, sys, threading, cares\n"
                  "threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()\n"
                  "code = cares.main(sys.argv[1:])\n"
                  "print(sorted(name for name in ('asciimatics', 'curses', 'wcwidth') if name in sys.modules))\n"
                  "sys.exit(code)\n")
        commands = [([sys.executable, "-c", script, *args], {"cwd": BYTECODE})
                    for args in (["worker", f"127.0.0.1:{orchestrator.port}", "--node-id", "lean", "--headless"],
                                 ["orchestrator", "--listen", "127.0.0.1:0", "--headless"])]
        for result in run_side_by_side(commands):
            self.assertEqual((result.returncode, result.stdout.strip()), (0, "[]"), result.stderr)
        self.assertIn("Node 'lean' has left the cluster.", texts(orchestrator.registry.events))

    def test_bad_inputs_get_one_clear_line(self):
        commands = [([*CARES, *args], {"env": {**os.environ, **environment}})
                    for args, environment in ((["status", "127.0.0.1:1", "--token", "pässwort"], {}),
                                              (["worker", "127.0.0.1:1"], {"CARES_TOKEN": "tab\tbed"}))]
        terminals = []
        for term in ("dumb", None):
            environment = {key: value for key, value in os.environ.items() if key != "TERM"}
            if term:
                environment["TERM"] = term
            leader, follower = os.openpty()
            self.addCleanup(os.close, leader)
            self.addCleanup(os.close, follower)
            terminals.append(follower)
            commands.append(([*CARES, "orchestrator", "--listen", "127.0.0.1:0"],
                             {"stdin": follower, "stdout": follower, "env": environment}))
        results = run_side_by_side(commands)  # all four at once
        for result in results[:2]:
            self.assert_one_line_error(result, 2)
            self.assertIn(cares.TOKEN_RULE, result.stderr)
        for result in results[2:]:
            self.assert_one_line_error(result, 1)
            self.assertIn("cannot show the dashboard; run with --headless", result.stderr)
        parser = cares.build_parser()
        for target in ("my_host:50051", "dns:///orchestrator:50051", "bücher.example:1"):
            self.assertTrue(parser.parse_args(["worker", target]).orchestrator_address, target)


class LineWriterTest(unittest.TestCase):
    """The headless log writer on real pipes and devices: callers never wait, losses are reported."""

    def test_a_stopped_reader_costs_dropped_lines_not_a_blocked_caller(self):
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
        writer = cares.LineWriter(write_end, capacity=20)
        putter = threading.Thread(target=lambda: [writer.put(f"line {n:03d} " + "x" * 100) for n in range(500)])
        putter.start()
        putter.join(10)
        self.assertFalse(putter.is_alive(), "put() waited for the reader")
        received = bytearray()
        reader = threading.Thread(target=lambda: [received.extend(chunk) for chunk in
                                                  iter(lambda: os.read(read_end, 65536), b"")], daemon=True)
        reader.start()  # the reader comes back; once the queue has drained, a new line goes through
        self.assertIsNotNone(wait_until(lambda: b"were dropped" in received, 10))
        self.assertIsNotNone(wait_until(lambda: writer.flush(0.1), 10))
        writer.put("after")
        self.assertIsNotNone(wait_until(lambda: b"after\n" in received, 10))
        text = received.decode()
        # The writer may report drops more than once (a notice, more drops, another notice): all count.
        dropped = sum(int(count) for count in re.findall(
            r"cares: (\d+) log line\(s\) were dropped \(the log was not being read\)\.", text))
        delivered = len(re.findall(r"^line \d{3} ", text, re.MULTILINE))
        # How many got through depends on the pipe and on when the writer thread ran (20 to 119
        # of 500 seen here); what holds always: lines were dropped, and every line is accounted for.
        self.assertGreater(dropped, 0)
        self.assertEqual(dropped + delivered, 500)
        self.assertEqual(writer.dropped, 0)

    def test_write_errors_are_counted_and_reported_once_writing_works(self):
        fd = os.open("/dev/full", os.O_WRONLY)  # every write: no space left on device
        self.addCleanup(os.close, fd)
        writer = cares.LineWriter(fd)
        writer.put("lost 1")
        writer.put("lost 2")
        self.assertIsNotNone(wait_until(lambda: writer.dropped == 2, 5))
        with tempfile.TemporaryFile() as disk:
            os.dup2(disk.fileno(), fd)  # space again
            writer.put("back")
            self.assertTrue(writer.flush(5))
            disk.seek(0)
            self.assertEqual(disk.read().decode(), "cares: 2 log line(s) were dropped (no space left on device).\n"
                                                   "back\n")

    def test_a_closed_pipe_is_counted_not_raised(self):
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        os.close(read_end)
        writer = cares.LineWriter(write_end)
        for number in range(10):
            writer.put(f"into the void {number}")
        self.assertIsNotNone(wait_until(lambda: writer.dropped == 10, 5))
        self.assertEqual(writer._drop_reason, "broken pipe")


# ---------------------------------------------------------------------------
# 8. The command line
# ---------------------------------------------------------------------------

class CommandLineTest(ClusterTestCase):
    def test_version_and_help(self):
        self.assertEqual(self.exit_code("--version")[0], 0)
        result = self.run_cares("--help", source=True)
        self.assertEqual(result.returncode, 0)
        for command in ("orchestrator", "worker", "status"):
            self.assertIn(command, result.stdout)

    def test_no_arguments_without_a_terminal_is_a_usage_error(self):
        result = self.run_cares(source=True)
        self.assertEqual(result.returncode, 2)
        self.assertIn("usage:", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    def test_usage_errors_exit_2_without_traceback(self):
        for args in (["worker", "nohost"], ["worker", "[::1]:99999"], ["worker", "h:1", "--node-id", "bad id"],
                     ["orchestrator", "--listen", "1.2.3.4"], ["status"], ["bogus"],
                     ["orchestrator", "--max-nodes", "0"], ["orchestrator", "--forget-after", "soon"],
                     ["worker", "h:1", "--label", "Bad=x"], ["worker", "h:1", *["--label", "k=v"] * 2,
                                                             *[f"--label=k{n}=v" for n in range(16)]]):
            code, stderr = self.exit_code(*args)
            self.assertEqual(code, 2, (args, stderr))
            self.assertNotIn("Traceback", stderr)
        code, stderr = self.exit_code("worker", "h:1", "--label", "Bad=x")
        self.assertIn(cares.LABEL_RULE, stderr)

    def test_port_in_use_exits_1_naming_the_port(self):
        orchestrator = self.start_orchestrator()
        result = self.run_cares("orchestrator", "--listen", f"127.0.0.1:{orchestrator.port}", "--headless")
        self.assert_one_line_error(result, 1)
        self.assertEqual(result.stderr.strip(),
                         f"cares: cannot listen on 127.0.0.1:{orchestrator.port}: "
                         f"port {orchestrator.port} is already in use")

    def test_status_of_unreachable_orchestrator_exits_1(self):
        result = self.run_cares("status", f"127.0.0.1:{free_port()}", "--timeout", "3")
        self.assert_one_line_error(result, 1)
        self.assertIn("unreachable", result.stderr)

    def test_status_into_a_closed_pipe_is_quiet(self):
        orchestrator = self.start_orchestrator()
        for number in range(300):
            active(orchestrator.registry, f"n{number:03d}")
        process = subprocess.Popen([*CARES, "status", f"127.0.0.1:{orchestrator.port}"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        process.stdout.readline()
        process.stdout.close()  # `cares status | head -1`
        self.assertEqual(process.wait(20), 0)
        with process.stderr:
            self.assertEqual(process.stderr.read(), b"")

    def test_status_json_shows_what_each_worker_sent(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        sent = {f"exact-{n}": (11.0 * n, 7.5 * n) for n in range(1, 5)}
        for node_id, (cpu, memory) in sent.items():
            self.start_worker(orchestrator, node_id, FixedSampler(cpu, memory), labels={"n": node_id[-1]})
        self.assertIsNotNone(wait_until(
            lambda: all(cpu_of(orchestrator.registry, n) == v[0] for n, v in sent.items()), 5))
        result = self.run_cares("status", f"127.0.0.1:{orchestrator.port}", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        nodes = {node["node_id"]: node for node in json.loads(result.stdout)["nodes"]}
        self.assertEqual(set(nodes), set(sent))
        for node_id, (cpu, memory) in sent.items():
            node = nodes[node_id]
            self.assertEqual((node["status"], node["cpu_percent"], node["memory_percent"], node["labels"]),
                             ("Active", cpu, memory, {"n": node_id[-1]}))
            self.assertAlmostEqual(node["last_seen"], time.time(), delta=5)
            self.assertEqual(set(node), {"node_id", "address", "status", "cpu_percent", "memory_percent",
                                         "last_seen", "hostname", "joined_at", "labels", "platform", "version",
                                         "cpu_count", "memory_total_bytes", "metrics", "left", "alerts"})
            self.assertEqual(node["hostname"], socket.gethostname()[:cares.HOSTNAME_LIMIT])
            self.assertEqual(node["version"], cares.VERSION)
            self.assertLessEqual(node["joined_at"], node["last_seen"])

    def test_headless_orchestrator_and_four_headless_workers(self):
        address = f"127.0.0.1:{free_port()}"
        orchestrator = self.spawn("orchestrator", "--listen", address, "--headless", "--heartbeat-ms", "200",
                                  source=True)
        workers = [self.spawn("worker", address, "--node-id", f"proc-{n}", "--headless", source=True)
                   for n in range(4)]

        def nodes():
            try:  # gRPC only once it listens: a refused connect would hold gRPC back for a second
                return cares.fetch_status(address, timeout=2) if listening(address) else []
            except grpc.RpcError:
                return []
        self.assertIsNotNone(wait_until(
            lambda: len([n for n in nodes() if n["status"] == "Active" and n["memory_percent"]]) == 4,
            20, interval=0.1))
        rows = nodes()
        self.assertEqual(sorted(row["node_id"] for row in rows), [f"proc-{n}" for n in range(4)])
        here = cares.psutil.virtual_memory().percent
        for row in rows:
            self.assertAlmostEqual(row["memory_percent"], here, delta=5)
            self.assertTrue(0 <= row["cpu_percent"] <= 100)
        workers[0].send_signal(signal.SIGTERM)
        self.assertEqual(workers[0].wait(10), 0)
        self.assertIsNotNone(wait_until(
            lambda: {n["node_id"]: n["status"] for n in nodes()}.get("proc-0") == "Disconnected", 5))
        orchestrator.send_signal(signal.SIGINT)
        self.assertEqual(orchestrator.wait(10), 0)
        log = orchestrator.stderr.read()
        self.assertIn("[INFO] Node 'proc-1' has joined the cluster.", log)
        self.assertIn("[INFO] Node 'proc-0' has left the cluster.", log)
        self.assertNotIn("Traceback", log)
        for worker in workers[1:]:
            self.assertIsNone(worker.poll(), "workers keep running when the orchestrator goes")
            worker.send_signal(signal.SIGTERM)
            self.assertEqual(worker.wait(10), 0)
            self.assertIn("[INFO] Disconnected: the orchestrator is shutting down; retrying.", worker.stderr.read())

    def test_json_log_lines(self):
        address = f"127.0.0.1:{free_port()}"
        orchestrator = self.spawn("orchestrator", "--listen", address, "--headless", "--log-format", "json")
        worker = self.spawn("worker", address, "--node-id", "jsonic", "--headless", "--log-format", "json")
        log = LineCollector(orchestrator.stderr)
        self.assertIsNotNone(wait_until(lambda: '"event": "joined"' in log.text(), 15), log.text())
        worker.terminate()
        self.assertEqual(worker.wait(10), 0)
        self.assertIsNotNone(wait_until(lambda: '"event": "left"' in log.text(), 5))
        orchestrator.terminate()
        self.assertEqual(orchestrator.wait(10), 0)
        records = [json.loads(line) for _, line in log.lines]
        joined_record = next(record for record in records if record["event"] == "joined")
        self.assertEqual((joined_record["node_id"], joined_record["level"]), ("jsonic", "info"))
        self.assertRegex(joined_record["ts"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertEqual(joined_record["hostname"], socket.gethostname()[:cares.HOSTNAME_LIMIT])


# ---------------------------------------------------------------------------
# 6. The TUI: pure layout, rows, filter and graphs; then scenes on a mock
#    Screen with a real Canvas (asciimatics' own widget-test pattern); then the
#    real thing in tmux.
# ---------------------------------------------------------------------------

def make_node(node_id, cpu=10.0, memory=20.0, status=cares.NodeStatus.ACTIVE, last_seen=None, hostname="",
              labels=None, **more):
    node = cares.Node(node_id=node_id, address="10.0.0.1:4000", status=status, hostname=hostname,
                      labels=labels or {}, metrics=values(cpu, memory, **more),
                      last_seen=time.time() if last_seen is None else last_seen)
    for moment in range(5):
        node.history.add(node.metrics, moment, 1.0)
    return node


def row_text(segments):
    return "".join(part for part, _ in segments)


class TableLayoutTest(unittest.TestCase):
    def test_layout_fits_every_width_and_keeps_the_essentials(self):
        for width in range(cares.MIN_WIDTH, 320):
            layout = cares.table_layout(width)
            total = sum(cells for _, cells in layout.columns) + len(layout.columns) - 1
            self.assertLessEqual(total, width, (width, layout))
            shown = [column for column, _ in layout.columns]
            for essential in (cares.Column.NODE_ID, cares.Column.STATUS, cares.Column.CPU, cares.Column.MEMORY):
                self.assertIn(essential, shown, width)
            self.assertGreaterEqual(layout.bar, 4)
            self.assertEqual(cares.display_width(cares.table_header(layout, cares.SortKey.NODE_ID, False)), total)
            node = make_node("n" * 63, hostname="h" * 80, load_average_1m=1.5, root_fs_used_percent=40.0,
                             net_receive_bytes_per_s=1e6, net_transmit_bytes_per_s=2e3)
            self.assertEqual(cares.display_width(row_text(cares.node_row(node, layout, time.time()))), total)
        wide = [column for column, _ in cares.table_layout(200).columns]
        self.assertEqual(wide, list(cares.Column))

    def test_rows_show_every_metric_or_a_dash(self):
        layout = cares.table_layout(200)
        node = make_node("web-1", cpu=37.5, memory=90.0, hostname="web1.example", load_average_1m=2.25,
                         root_fs_used_percent=71.0, net_receive_bytes_per_s=1536.0, net_transmit_bytes_per_s=0.0)
        text = row_text(cares.node_row(node, layout, time.time()))
        for expected in ("web-1", "web1.example", "Active", "37.5%", "90.0%", "2.25", "71.0%", "1.5K/0B", "now"):
            self.assertIn(expected, text)
        styles = [style for _, style in cares.node_row(node, layout, time.time())]
        self.assertIn("high", styles)  # memory at 90 %
        older = cares.Node("old-worker", status=cares.NodeStatus.ACTIVE, metrics=values(5, 6), last_seen=time.time())
        text = row_text(cares.node_row(older, layout, time.time()))
        self.assertEqual(text.count("–"), 4, text)  # load, disk, and both rates: never sent, never 0
        joining = cares.Node("new", status=cares.NodeStatus.JOINING)
        text = row_text(cares.node_row(joining, layout, time.time()))
        self.assertNotIn("0.0%", text)
        self.assertIn("Joining", text)

    def test_gone_rows_are_dimmed_but_keep_their_last_values(self):
        layout = cares.table_layout(120)
        for status in (cares.NodeStatus.DISCONNECTED, cares.NodeStatus.MISSING):
            segments = cares.node_row(make_node("gone", cpu=70.0, status=status, last_seen=time.time() - 42),
                                      layout, time.time())
            text = row_text(segments)
            self.assertIn(status.value, text)
            self.assertIn("70.0%", text)
            self.assertIn("42s ago", text)
            self.assertEqual({style for _, style in segments}, {"dim", "gone"})

    def test_ascii_glyphs_draw_only_ascii(self):
        glyphs = cares.ASCII_GLYPHS
        layout = cares.table_layout(200)
        node = make_node("n" * 63, cpu=55.5, hostname="h" * 40, net_receive_bytes_per_s=5.0)
        self.assertTrue(row_text(cares.node_row(node, layout, time.time(), glyphs)).isascii())
        self.assertTrue(cares.table_header(layout, cares.SortKey.CPU, True, glyphs).isascii())
        self.assertTrue(all(line.isascii() for line in cares.graph_rows([10, 50, 90], 10, 3, glyphs)))
        self.assertEqual(cares.format_percent(None, unicode=False), "-")

    def test_text_widths_follow_wcwidth(self):
        self.assertEqual(cares.fit("節點節點", 5), "節點…")
        self.assertEqual(cares.display_width(cares.fit("節點節點", 5)), 5)
        self.assertEqual(cares.fit("節", 3), "節 ")
        self.assertEqual(cares.display_width("e\u0301te\u0301"), 3)  # combining acute accents take no cell
        self.assertEqual(cares.fit("cafe\u0301-01", 7), "cafe\u0301-01")
        layout = cares.table_layout(160)
        total = sum(cells for _, cells in layout.columns) + len(layout.columns) - 1
        for hostname in ("ホスト名-東京", "cafe\u0301" * 10, "😀emoji-host"):
            node = make_node("x", hostname=hostname, labels={"team": "東京"})
            self.assertEqual(cares.display_width(row_text(cares.node_row(node, layout, time.time()))), total)

    def test_sorting_summary_and_filter(self):
        nodes = [make_node("b", cpu=50, memory=10, hostname="zeta", labels={"role": "db"}),
                 make_node("a", cpu=90, memory=5, hostname="alpha", labels={"role": "web", "zone": "eu"}),
                 make_node("c", cpu=10, memory=80, status=cares.NodeStatus.DISCONNECTED, hostname="mid"),
                 cares.Node("d", status=cares.NodeStatus.JOINING)]
        ids = lambda key, reverse=False: [n.node_id for n in cares.sort_nodes(nodes, key, reverse)]
        self.assertEqual(ids(cares.SortKey.NODE_ID), ["a", "b", "c", "d"])
        self.assertEqual(ids(cares.SortKey.CPU), ["a", "b", "c", "d"])  # never measured: last
        self.assertEqual(ids(cares.SortKey.MEMORY), ["c", "b", "a", "d"])
        self.assertEqual(ids(cares.SortKey.STATUS), ["a", "b", "d", "c"])
        self.assertEqual(ids(cares.SortKey.HOST), ["d", "a", "c", "b"])
        self.assertEqual(ids(cares.SortKey.NODE_ID, True), ["d", "c", "b", "a"])
        summary = cares.summarize(nodes)
        self.assertEqual(summary.describe(), "2 active, 1 joining, 1 disconnected")
        self.assertEqual((summary.cpu_percent, summary.memory_percent), (70.0, 7.5))
        self.assertIsNone(cares.summarize([]).cpu_percent)
        matches = lambda query: sorted(n.node_id for n in nodes if cares.node_matches(n, query))
        self.assertEqual(matches(""), ["a", "b", "c", "d"])
        self.assertEqual(matches("ALP"), ["a"])
        self.assertEqual(matches("role=web"), ["a"])
        self.assertEqual(matches("role=we"), [])  # KEY=VALUE is exact
        self.assertEqual(matches("zone"), ["a"])
        self.assertEqual(matches("d"), ["b", "c", "d"])  # label role=db, host "mid", ID "d"

    def test_selection_follows_its_node_and_stays_in_view(self):
        nodes = [make_node(f"n{number:03d}", cpu=number) for number in range(100)]
        state = cares.TableState()
        view = cares.prepare_table(nodes, state, 10)
        self.assertEqual((state.selected, view.first, len(view.rows)), ("n000", 0, 10))
        cares.move_selection(state, view, 15)
        view = cares.prepare_table(nodes, state, 10)
        self.assertEqual(state.selected, "n015")
        self.assertTrue(view.first <= view.selected_index < view.first + 10)
        state.sort_key = cares.SortKey.CPU  # the selection stays on n015 wherever it goes
        view = cares.prepare_table(nodes, state, 10)
        self.assertEqual(view.rows[view.selected_index - view.first].node_id, "n015")
        cares.move_selection(state, view, 10**9)
        view = cares.prepare_table(nodes, state, 10)
        self.assertEqual(view.rows[-1].node_id, state.selected)
        state.query = "n05"
        view = cares.prepare_table(nodes, state, 10)
        self.assertEqual((view.matching, view.total), (10, 100))
        self.assertTrue(state.selected.startswith("n05"))
        state.query = "nothing like it"
        view = cares.prepare_table(nodes, state, 10)
        self.assertEqual((view.rows, view.selected_index, state.selected), ([], -1, ""))

    def test_graphs_rates_and_durations(self):
        self.assertEqual(cares.graph_rows([0, 50, 100], 3, 2), ["  █", " ██"])
        self.assertEqual(cares.graph_rows([25, float("nan")], 4, 1), ["  ▂ "])  # two eighths
        self.assertEqual(cares.sparkline([0, 50, 100], 5), "  ▁▄█")
        self.assertEqual(cares.sparkline([float("nan"), 100], 2), " █")
        self.assertEqual(cares.format_rate(512), "512B")
        self.assertEqual(cares.format_rate(1536), "1.5K")
        self.assertEqual(cares.format_rate(3 * 1024**3), "3.0G")
        self.assertEqual(cares.format_rate(None), "–")
        self.assertEqual(cares.format_uptime(3 * 86400 + 4 * 3600 + 5), "3d 4h")
        self.assertEqual(cares.format_uptime(125), "2m")

    def test_heartbeat_steps_stay_above_the_measured_loop_jitter(self):
        self.assertEqual(cares.next_heartbeat_ms(1000, longer=True), 2000)
        self.assertEqual(cares.next_heartbeat_ms(1000, longer=False), 500)
        self.assertEqual(cares.next_heartbeat_ms(700, longer=False), 500)
        self.assertIsNone(cares.next_heartbeat_ms(5000, longer=True))
        self.assertIsNone(cares.next_heartbeat_ms(cares.HEARTBEAT_STEPS_MS[0], longer=False))

    def test_the_locale_as_the_user_set_it_decides_utf8(self):
        cases = [({"LANG": "en_US.UTF-8"}, False, True), ({"LANG": "de_DE.utf8@euro"}, False, True),
                 ({"LANG": "C"}, False, False), ({}, False, False), ({"LANG": "POSIX"}, False, False),
                 ({"LC_ALL": "C", "LANG": "C.UTF-8"}, False, False),  # LC_ALL wins
                 ({"LC_CTYPE": "C.UTF-8", "LANG": "C"}, False, True),  # set by the user
                 ({"LC_CTYPE": "C.UTF-8", "LANG": "C"}, True, False),  # set by Python's coercion
                 ({"LC_CTYPE": "C.UTF-8", "LANG": "en_GB.UTF-8"}, True, True)]
        for environment, python_chose_utf8, expected in cases:
            self.assertIs(cares.locale_is_utf8(environment, python_chose_utf8), expected, environment)

    def test_colour_modes(self):
        self.assertIs(cares.colour_mode(256, {"NO_COLOR": "1"}), cares.ColourMode.NONE)
        self.assertIs(cares.colour_mode(256, {"NO_COLOR": ""}), cares.ColourMode.EXTENDED)
        self.assertIs(cares.colour_mode(8, {}), cares.ColourMode.BASIC)
        styles = cares.load_tui().styles_for
        default = Screen.COLOUR_DEFAULT
        for mode in cares.ColourMode:
            table = styles(mode)
            for name in ("text", "dim", "gone", "low", "high", "WARN", "header", "bold"):
                colour, attr, background = table[name]
                self.assertEqual(background, default, (mode, name))  # the terminal's own background
                self.assertNotEqual((colour, attr), (Screen.COLOUR_BLACK, Screen.A_BOLD), (mode, name))
            self.assertEqual(table["text"][0], default)
        self.assertEqual({colour for colour, _, _ in styles(cares.ColourMode.NONE).values()}, {default})
        self.assertEqual(styles(cares.ColourMode.EXTENDED)["dim"][0], 244)


def make_canvas(width=120, height=40, unicode=True, colours=8):
    screen = mock.MagicMock(spec=Screen, colours=colours, unicode_aware=unicode)
    return Canvas(screen, height, width, 0, 0)


def render(frame):
    if frame.scene is None:
        Scene([frame], -1).reset()
    frame.update(0)
    canvas = frame.canvas
    return ["".join(chr(canvas.get_from(x, y)[0]) for x in range(canvas.width)) for y in range(canvas.height)]


def render_frame(frame):
    render(frame)
    return frame


def press(frame, *keys):
    for key in keys:
        frame.process_event(KeyboardEvent(ord(key) if isinstance(key, str) else key))


def type_text(frame, text):
    press(frame, *text)


def clear_field(frame):
    press(frame, Screen.KEY_END, *([Screen.KEY_BACK] * 40))


def line_with(lines, needle):
    return next((line for line in lines if needle in line), None)


TUI = cares.load_tui()


class TuiSceneTest(ClusterTestCase):
    def assert_quits(self, frame, key):
        """The frame passes the key on, and Screen.play's handler for such keys quits."""
        event = frame.process_event(KeyboardEvent(ord(key) if isinstance(key, str) else key))
        self.assertIsNotNone(event, "the frame swallowed a quit key")
        with self.assertRaises(StopApplication):
            TUI.quit_on_key(event)

    def assert_shows(self, view, action):
        with self.assertRaises(NextScene) as caught:
            action()
        self.assertEqual(caught.exception.name, view.value)

    def make_app(self, node_id=None):
        app = cares.TuiApp(worker_config=cares.WorkerConfig(node_id=node_id))
        self.addCleanup(app.shutdown)
        return app

    def test_menu_navigation(self):
        app = self.make_app()
        frame = TUI.MenuFrame(make_canvas(), app)
        lines = render(frame)
        self.assertIn("> [1] Create a new cluster (Orchestrator)", line_with(lines, "[1]"))
        self.assertNotIn(">", line_with(lines, "[2] Join an existing cluster (Worker)"))
        press(frame, Screen.KEY_DOWN)
        lines = render(frame)
        self.assertIn("> [2] Join an existing cluster (Worker)", line_with(lines, "[2]"))
        self.assert_shows(cares.View.JOIN, lambda: press(frame, 13))
        self.assertEqual(app.view, cares.View.JOIN)
        self.assert_shows(cares.View.CREATE, lambda: press(frame, "1"))
        press(frame, Screen.KEY_UP, "z")
        self.assertEqual(app.menu_choice, 1)
        self.assert_quits(frame, "q")

    def test_join_form_validates_inline_and_stays_editable(self):
        app = self.make_app()
        frame = TUI.AddressFrame(make_canvas(), app, cares.View.JOIN)
        lines = render(frame)
        self.assertTrue(line_with(lines, "Orchestrator address:").strip().endswith(" 127.0.0.1:50051"))
        for bad, reason in (("nohost", "missing :PORT"), ("1.2.3.4:70000", "port must be 1-65535"),
                            ("::1:5", "brackets")):
            clear_field(frame)
            type_text(frame, bad)
            press(frame, 13)
            lines = render(frame)
            self.assertIn(reason, "\n".join(lines), bad)
            self.assertIn(bad, line_with(lines, "Orchestrator address"))
            self.assertEqual(app.view, cares.View.MENU)
            self.assertIsNone(app.worker)
        type_text(frame, "q")  # a letter for the field, not a quit
        self.assertIn("::1:5q", line_with(render(frame), "Orchestrator address"))
        self.assert_quits(frame, 3)
        self.assert_shows(cares.View.MENU, lambda: press(frame, Screen.KEY_ESCAPE))
        self.assertEqual(app.forms[cares.View.JOIN].address, "::1:5q")

    def test_join_form_fuzz_never_raises(self):
        app = self.make_app()
        frame = TUI.AddressFrame(make_canvas(), app, cares.View.JOIN)
        render(frame)
        rng = random.Random(99)
        keys = [ord(c) for c in "0123456789.:[]abc-_ "] + [0x202E, 0x1B, 0x200B, 0x7F, 0x10FFFF + 5,
                                                           Screen.KEY_LEFT, Screen.KEY_BACK, 9]
        for _ in range(150):
            clear_field(frame)
            press(frame, *(rng.choice(keys) for _ in range(rng.randint(0, 25))))
            try:
                press(frame, 13)
            except NextScene:
                app.shutdown()
                app.worker = None
                app.view = cares.View.JOIN
            for line in render(frame):
                for char in line:
                    self.assertNotIn(unicodedata.category(char), ("Cc", "Cf"), repr(line))

    def test_join_form_starts_a_worker_that_joins(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        app = self.make_app(node_id="from-form")
        frame = TUI.AddressFrame(make_canvas(), app, cares.View.JOIN)
        render(frame)
        clear_field(frame)
        type_text(frame, f"127.0.0.1:{orchestrator.port}")
        self.assert_shows(cares.View.WORKER, lambda: press(frame, 13))
        self.assert_becomes(orchestrator.registry, "from-form", cares.NodeStatus.ACTIVE, 5)

    def test_create_form_starts_the_orchestrator_or_says_why_not(self):
        busy = self.start_orchestrator()
        app = self.make_app()
        frame = TUI.AddressFrame(make_canvas(), app, cares.View.CREATE)
        self.assertTrue(line_with(render(frame), "Listen address:").strip().endswith(" [::]:50051"))
        clear_field(frame)
        type_text(frame, f"127.0.0.1:{busy.port}")
        press(frame, 13)
        self.assertIn(f"port {busy.port} is already in use", "\n".join(render(frame)))
        self.assertIsNone(app.orchestrator)
        clear_field(frame)
        type_text(frame, "127.0.0.1:0")
        self.assert_shows(cares.View.DASHBOARD, lambda: press(frame, 13))
        self.assertGreater(app.orchestrator.port, 0)

    def start_app_orchestrator(self, app, **config):
        """An orchestrator with a state directory of its own: the inventory file is named after the
        listen address, 127.0.0.1:0 in every test here, so one test's nodes came back as Missing
        in the next test that ran in the same process."""
        state_dir = tempfile.mkdtemp(prefix="cares-test-tui-state-")
        self.addCleanup(shutil.rmtree, state_dir, True)
        app.start_orchestrator(cares.OrchestratorConfig("127.0.0.1:0", state_dir=state_dir, **config))

    def dashboard(self, width=120, height=40, config=None, **canvas):
        app = self.make_app()
        self.start_app_orchestrator(app, **(config or {}))
        return app, TUI.DashboardFrame(make_canvas(width, height, **canvas), app)

    def test_dashboard_starts_empty_with_a_hint(self):
        app, frame = self.dashboard()
        lines = render(frame)
        self.assertIn(f"listening on 127.0.0.1:{app.orchestrator.port}", lines[0])
        self.assertIn("open cluster", lines[0])
        self.assertIn("Nodes: 0 active, 0 disconnected", lines[2])
        self.assertIsNotNone(line_with(lines, "Waiting for workers - join with: cares worker 127.0.0.1:"))
        self.assertIsNotNone(line_with(lines, "Orchestrator listening on 127.0.0.1:"))

    def populate(self, registry):
        for number, cpu in ((1, 12.5), (2, 64.0), (3, 97.0)):
            session = joined(registry, f"node-{number}", f"10.0.0.{number}:5000", hostname=f"host-{number}",
                             labels={"role": "web" if number < 3 else "db"})
            registry.update(f"node-{number}", session, values(cpu, 50, load_average_1m=0.5 * number), 1)
        registry.disconnect("node-2", registry.get("node-2").session_id, "test")

    def test_dashboard_shows_the_registry_rows(self):
        app, frame = self.dashboard(width=160)
        self.populate(app.orchestrator.registry)
        lines = render(frame)
        row = line_with(lines, "node-1 ")
        for expected in ("host-1", "Active", "12.5%", "█", "0.50"):
            self.assertIn(expected, row)
        self.assertIn("Disconnected", line_with(lines, "node-2 "))
        self.assertIn("Nodes: 2 active, 1 disconnected", lines[2])
        self.assertIsNotNone(line_with(lines, "[INFO] Node 'node-3' has joined the cluster."))
        self.assertIsNotNone(line_with(lines, "[WARN] Node 'node-2' lost: test."))
        canvas = frame.canvas
        y = lines.index(line_with(lines, "node-3 "))
        self.assertEqual(canvas.get_from(lines[y].index("█"), y)[1], Screen.COLOUR_RED)  # 97 % is red
        y = lines.index(line_with(lines, "node-1 "))  # the selected row
        self.assertEqual(canvas.get_from(0, y)[3], Screen.COLOUR_CYAN)

    def test_a_redraw_prints_only_rows_that_changed_and_shows_what_a_new_frame_shows(self):
        app, frame = self.dashboard()
        self.populate(app.orchestrator.registry)
        render(frame)
        canvas = frame.canvas

        def cells(frame):
            return [[frame.canvas.get_from(x, y) for x in range(frame.canvas.width)] for y in range(frame.canvas.height)]

        with mock.patch.object(canvas, "print_at", wraps=canvas.print_at) as printed:
            lines = render(frame)
        events_top = lines.index(line_with(lines, "Events"))
        self.assertEqual([call for call in printed.call_args_list if call.args[2] >= events_top], [])
        # Rows that change, grow, shrink and go away: the canvas must hold no trace of what was there.
        registry = app.orchestrator.registry
        registry.disconnect("node-1", registry.get("node-1").session_id, "a reason long enough to need the rows below")
        press(frame, Screen.KEY_DOWN)
        render(frame)
        press(frame, "x")  # forget the gone nodes: two rows fewer, two more events
        render(frame)
        self.assertEqual(cells(frame), cells(render_frame(TUI.DashboardFrame(make_canvas(), app))))
        frame.reset()  # a new scene: every row is drawn again, on asciimatics' fresh canvas
        render(frame)
        self.assertEqual(cells(frame), cells(render_frame(TUI.DashboardFrame(make_canvas(), app))))

    def test_the_screens_text_waits_for_the_flush_even_unbuffered(self):
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        os.set_blocking(read_end, False)
        # What python -u and PYTHONUNBUFFERED=1 make of stdout: no buffer, each write goes through.
        stream = io.TextIOWrapper(io.FileIO(write_end, "w"), encoding="utf-8", write_through=True)
        self.addCleanup(stream.close)
        with cares.written_a_redraw_at_a_time(stream):
            for text in ("\x1b[3;59H", "\u2588", "\x1b[32m", "42.0%"):
                stream.write(text)
            with self.assertRaises(BlockingIOError):
                os.read(read_end, 100)  # nothing written yet
            stream.flush()  # asciimatics, once a redraw
            self.assertEqual(os.read(read_end, 100).decode(), "\x1b[3;59H\u2588\x1b[32m42.0%")
        self.assertTrue(stream.write_through)  # as it was
        stream.write("after")
        self.assertEqual(os.read(read_end, 100), b"after")
        with cares.written_a_redraw_at_a_time(None):  # no stdout at all: the screen's own problem
            pass

    def quiet_thousand_node_dashboard(self):
        """A dashboard of 1,000 nodes, drawn once, whose orchestrator's own threads stay quiet (no node
        falls silent within a 30 s heartbeat, no history to write): what the collector sees is the redraw's."""
        app, frame = self.dashboard(config={"heartbeat_ms": 30_000, "history_days": 0})
        registry = app.orchestrator.registry
        for number in range(1000):
            registry.update(f"n{number:04d}", joined(registry, f"n{number:04d}"), values(number % 100, 50), 1)
        render(frame)
        return frame

    def test_a_redraw_of_a_thousand_nodes_leaves_nothing_for_the_garbage_collector(self):
        # Objects made and still alive count towards the collector's next run: the dashboard's
        # copies of every node, kept from one redraw to the next, were 2,000 of them a second at
        # 1,000 nodes, collected (and promoted) mostly on the gRPC loop.
        # The collector counts every thread's objects, so the orchestrator is a quiet one, and the
        # fewest of three redraws is what a redraw keeps (each of them kept 2,263 before).
        frame = self.quiet_thousand_node_dashboard()
        survivors = []
        for _ in range(3):
            time.sleep(cares.NODES_MAX_AGE_S + 0.05)  # the next redraw reads the nodes again
            gc.collect()
            gc.disable()
            try:
                lines = render(frame)
                gc.collect(0)  # what the redraw made and still holds moves on to the next generation
                survivors.append(len(gc.get_objects(generation=1)))
            finally:
                gc.enable()
            self.assertIn("Nodes: 1000 active", lines[2])
        self.assertLess(min(survivors), 500, f"objects a redraw made and keeps, for the collector to scan again: "
                                             f"{survivors}")

    def test_a_redraw_sets_off_no_garbage_collection(self):
        # A collection set off by a redraw's own short-lived objects would scan the gRPC loop's
        # young objects too (about 20,000 at 1,000 nodes), on the main thread: the screen's loop
        # runs each turn with the collector paused (draw_next). A low threshold makes any redraw
        # that allocates with the collector on set one off.
        frame = self.quiet_thousand_node_dashboard()
        time.sleep(cares.NODES_MAX_AGE_S + 0.05)  # the next redraw reads the nodes again
        lines, drawing = [], []

        def draw_next_frame():
            drawing.append(True)
            lines.extend(render(frame))
            drawing.clear()

        screen = types.SimpleNamespace(draw_next_frame=draw_next_frame)
        collections = collections_started(
            self, lambda: drawing and threading.get_ident() == threading.main_thread().ident)
        TUI.draw_next(screen)
        self.assertIn("Nodes: 1000 active", lines[2])
        self.assertEqual(collections, [], "collections the redraw set off on the main thread, by generation")
        self.assertTrue(gc.isenabled())

    def test_default_background_everywhere_but_the_selection(self):
        for colours in (8, 256):
            app, frame = self.dashboard(colours=colours)
            self.populate(app.orchestrator.registry)
            lines = render(frame)
            selected = lines.index(line_with(lines, "node-1 "))
            canvas = frame.canvas
            backgrounds = {canvas.get_from(x, y)[3] for y in range(canvas.height) if y != selected
                           for x in range(canvas.width)}
            self.assertEqual(backgrounds, {Screen.COLOUR_DEFAULT}, colours)
            gone = lines.index(line_with(lines, "node-2 "))
            foreground, attribute = canvas.get_from(0, gone)[1:3]
            self.assertFalse(foreground == Screen.COLOUR_BLACK and attribute == Screen.A_BOLD)

    def test_no_color_uses_no_colour(self):
        with mock.patch.dict(os.environ, {"NO_COLOR": "1"}):
            app, frame = self.dashboard(colours=256)
        self.populate(app.orchestrator.registry)
        lines = render(frame)
        canvas = frame.canvas
        colours = {canvas.get_from(x, y)[1] for y in range(canvas.height) for x in range(canvas.width)}
        backgrounds = {canvas.get_from(x, y)[3] for y in range(canvas.height) for x in range(canvas.width)}
        self.assertEqual((colours, backgrounds), ({Screen.COLOUR_DEFAULT}, {Screen.COLOUR_DEFAULT}))
        self.assertIn("Disconnected", line_with(lines, "node-2 "))  # states stay readable as text
        selected = lines.index(line_with(lines, "node-1 "))
        self.assertEqual(canvas.get_from(0, selected)[2], Screen.A_REVERSE)

    def test_a_non_utf8_terminal_gets_ascii_only(self):
        app, frame = self.dashboard(width=200, unicode=False)
        self.populate(app.orchestrator.registry)
        registry = app.orchestrator.registry
        active(registry, "wide", hostname="ホスト-東京", labels={"team": "東京"})
        press(frame, "c", "r")
        lines = render(frame)
        for line in lines:
            self.assertTrue(line.isascii(), line)
        self.assertIn("CPUv", line_with(lines, "NODE ID") or "")

    def test_sorts_scrolls_and_keeps_the_selection_in_view(self):
        app, frame = self.dashboard()
        registry = app.orchestrator.registry
        for number in range(1000):
            active(registry, f"n{number:04d}", cpu=number / 10, memory=1)
        lines = render(frame)
        header = line_with(lines, "NODE ID")
        self.assertRegex(header, r"1-\d+ of 1000\s*$")
        self.assertIsNotNone(line_with(lines, "n0000 "))
        press(frame, Screen.KEY_PAGE_DOWN, Screen.KEY_PAGE_DOWN)
        lines = render(frame)
        self.assertIsNone(line_with(lines, "n0000 "))
        self.assertIsNotNone(line_with(lines, app.table.selected + " "))
        press(frame, Screen.KEY_END)
        lines = render(frame)
        self.assertIsNotNone(line_with(lines, "n0999 "))
        self.assertEqual(app.table.selected, "n0999")
        press(frame, "c", Screen.KEY_HOME)
        lines = render(frame)
        first_row = lines[lines.index(line_with(lines, "NODE ID")) + 1]
        self.assertTrue(first_row.startswith("n0999 "), first_row)
        press(frame, "r", Screen.KEY_HOME)
        lines = render(frame)
        first_row = lines[lines.index(line_with(lines, "NODE ID")) + 1]
        self.assertTrue(first_row.startswith("n0000 "), first_row)
        self.assertIs(app.table.sort_key, cares.SortKey.CPU)

    def test_filter_narrows_the_table_and_esc_clears_it(self):
        app, frame = self.dashboard()
        self.populate(app.orchestrator.registry)
        press(frame, "/")
        type_text(frame, "role=db")
        lines = render(frame)
        self.assertIn("Filter: role=db_", lines[-1])
        self.assertIn("1 of 3 shown", lines[2])
        self.assertIsNotNone(line_with(lines, "node-3 "))
        self.assertIsNone(line_with(lines, "node-1 "))
        press(frame, 13)  # keep it; keys act on the table again
        self.assertFalse(app.table.editing_query)
        self.assertEqual(app.table.query, "role=db")
        press(frame, "/", Screen.KEY_BACK, Screen.KEY_BACK, Screen.KEY_BACK, Screen.KEY_BACK, "q")
        self.assertEqual(app.table.query, "rolq")  # q is a letter while typing a filter
        press(frame, Screen.KEY_ESCAPE)
        lines = render(frame)
        self.assertEqual(app.table.query, "")
        self.assertNotIn("shown", lines[2])
        self.assertIsNotNone(line_with(lines, "node-1 "))
        self.assert_quits(frame, "q")

    def test_enter_opens_the_detail_view_and_esc_returns_to_the_same_place(self):
        app, frame = self.dashboard()
        self.populate(app.orchestrator.registry)
        registry = app.orchestrator.registry
        active(registry, "detailed", cpu=42.5, memory=33.0, hostname="db7", labels={"rack": "b12"}, version=cares.VERSION)
        render(frame)
        press(frame, "n", Screen.KEY_DOWN)
        self.assertIsNotNone(line_with(render(frame), "node-1 "))
        self.assertEqual(app.table.selected, "node-1")
        press(frame, Screen.KEY_UP, Screen.KEY_UP, Screen.KEY_DOWN)  # keys faster than redraws count too
        self.assert_shows(cares.View.DETAIL, lambda: press(frame, 13))
        self.assertEqual(app.table.selected, "detailed")
        detail = TUI.DetailFrame(make_canvas(), app)
        lines = render(detail)
        self.assertIn("Node detailed", lines[0])
        self.assertIn("Active", lines[0])
        text = "\n".join(lines)
        for expected in ("db7", "rack=b12", "42.5%", "33.0%", "CPU 60s", "Mem 60s", "Net in", cares.VERSION):
            self.assertIn(expected, text)
        self.assertIsNotNone(line_with(lines, "[INFO] Node 'detailed' has joined the cluster."))
        self.assertIsNone(line_with(lines, "node-3"))  # only its own events
        self.assert_shows(cares.View.DASHBOARD, lambda: press(detail, Screen.KEY_ESCAPE))
        self.assertEqual(app.table.selected, "detailed")

    def test_help_lists_the_keys(self):
        app, frame = self.dashboard()
        self.assert_shows(cares.View.HELP, lambda: press(frame, "?"))
        lines = render(TUI.HelpFrame(make_canvas(), app))
        for key_help in cares.DASHBOARD_KEYS + cares.DETAIL_KEYS:
            self.assertIsNotNone(line_with(lines, key_help.does), key_help)

    def test_the_key_tables_are_the_bindings(self):
        """One table per view drives both its help and its keys: every command's action exists,
        no key is bound twice, and each key line is made of the table's own hints."""
        for frame_class, table in ((TUI.DashboardFrame, cares.DASHBOARD_KEYS), (TUI.DetailFrame, cares.DETAIL_KEYS)):
            codes = [cares.key_code(key) for command in table if command.action for key in command.keys]
            self.assertEqual(len(codes), len(set(codes)), frame_class)
            for command in table:
                if command.action:
                    self.assertTrue(callable(getattr(frame_class, command.action, None)), command)
                    self.assertIs(frame_class.bindings[cares.key_code(command.keys[0])], command)
            self.assertEqual(set(frame_class.bindings), set(codes))
        app, frame = self.dashboard()
        self.assertIn("x forget gone", "".join(render(frame)))
        self.assertTrue(cares.key_line(cares.DETAIL_KEYS).startswith("q quit  Esc back  Tab or 1-4 section"))

    def test_every_style_has_colours_and_no_other_name_does(self):
        for mode in cares.ColourMode:
            styles = TUI.styles_for(mode)
            self.assertEqual(set(styles), set(cares.Style), mode)
            with self.assertRaises(KeyError):
                styles["bolt"]  # a typo draws nothing rather than plain: the views' tests fail on it
        self.assertEqual(cares.Style.for_status(cares.NodeStatus.ACTIVE, alerting=True), cares.Style.ALERT)
        self.assertEqual(cares.Style.for_level(cares.Level.INFO), cares.Style.TEXT)

    def test_mouse_click_selects_and_double_click_opens(self):
        from asciimatics.event import MouseEvent
        app, frame = self.dashboard()
        self.populate(app.orchestrator.registry)
        lines = render(frame)
        y = lines.index(line_with(lines, "node-3 "))
        frame.process_event(MouseEvent(5, y, MouseEvent.LEFT_CLICK))
        self.assertEqual(app.table.selected, "node-3")
        self.assert_shows(cares.View.DETAIL, lambda: frame.process_event(MouseEvent(5, y, MouseEvent.DOUBLE_CLICK)))
        self.assertEqual(app.detail_node, "node-3")

    def test_dashboard_keys_change_heartbeat_and_forget_gone_nodes(self):
        app, frame = self.dashboard()
        registry = app.orchestrator.registry
        registry.disconnect("gone", joined(registry, "gone"), "test")
        render(frame)
        press(frame, "x")
        self.assertIsNone(registry.get("gone"))
        press(frame, "+")
        self.assertIsNotNone(wait_until(lambda: registry.heartbeat_interval == 2.0, 3))
        press(frame, "-", "-")
        self.assertIsNotNone(wait_until(lambda: registry.heartbeat_interval == 0.5, 3))
        press(frame, "-")
        self.assertEqual(app.orchestrator.heartbeat_ms, cares.HEARTBEAT_STEPS_MS[0])
        self.assert_quits(frame, 3)

    def test_hostile_join_never_reaches_the_screen_raw(self):
        app, frame = self.dashboard()
        stub = raw_stub(self, app.orchestrator.port)
        with self.assertRaises(grpc.RpcError) as caught:
            stub.JoinCluster(pb.NodeInfo(node_id="\x1b[2J\x1b]0;owned\x07"), timeout=5)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        with self.assertRaises(grpc.RpcError) as caught:
            stub.JoinCluster(pb.NodeInfo(node_id="ok", labels={"note": "\u202e!"}), timeout=5)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        session = stub.JoinCluster(pb.NodeInfo(node_id="ok", hostname="\x1b[31m\u202eevil" * 50), timeout=5)
        OpenStream(self, stub, "ok", session.session_id).send(metrics("ok", session.session_id, 1))
        self.assertIsNotNone(wait_until(lambda: cpu_of(app.orchestrator.registry, "ok") is not None, 5))
        lines = render(frame)
        self.assertIsNotNone(line_with(lines, "refused: invalid node ID '?[2J?]0;owned?'"))
        for line in lines:
            for char in line:
                self.assertNotIn(unicodedata.category(char), ("Cc", "Cf"), repr(line))
        self.assertNotIn("\x1b", app.orchestrator.registry.get("ok").hostname)

    def test_worker_view_shows_every_local_metric_while_unreachable(self):
        app = self.make_app(node_id="solo")
        app.start_worker(cares.WorkerConfig(f"127.0.0.1:{free_port()}", node_id="solo", labels={"role": "db"}))
        frame = TUI.WorkerFrame(make_canvas(), app)
        self.assertIsNotNone(wait_until(lambda: app.worker.state.phase is cares.ConnectionPhase.RETRYING, 5))
        lines = render(frame)
        self.assertIn("node solo", lines[0])
        self.assertIn("retrying in", lines[1])
        self.assertIn("unreachable", lines[1])
        self.assertIn("role=db", lines[2])
        memory = line_with(lines, "Memory")
        self.assertIn(cares.format_bytes(cares.psutil.virtual_memory().total), memory)
        for name in ("Swap", "Root FS", "Load", "Uptime", "Disk", "Network", "CPU 60s", "Mem 60s"):
            self.assertIsNotNone(line_with(lines, name), name)
        self.assertIn(cares.format_number(os.getloadavg()[2]), line_with(lines, "Load"))
        self.assertIsNotNone(line_with(lines, "[WARN] Cannot join: orchestrator unreachable (connection refused)"))
        self.assert_quits(frame, "Q")

    @staticmethod
    def quitting_screen(width=120, height=40, frames=1, resized=False):
        """A mock Screen whose user quits at the given frame (the first by default)."""
        screen = mock.MagicMock(spec=Screen, width=width, height=height, colours=8, unicode_aware=False)
        screen.draw_next_frame.side_effect = [None] * (frames - 1) + [StopApplication("q")]
        screen.has_resized.return_value = resized
        return screen

    def test_the_screen_waits_for_input_between_ticks_and_stops_on_a_resize(self):
        app = self.make_app()
        screen = self.quitting_screen(frames=3)
        TUI.play(app, screen)  # returns once the user quits
        waits = [call.args[0] for call in screen.wait_for_input.call_args_list]
        self.assertEqual(len(waits), 2)
        self.assertTrue(all(0.0 <= wait <= cares.TICK_S for wait in waits), waits)
        self.assertEqual(cares.REDRAW_FRAMES * cares.TICK_S, 1.0)  # live data once a second
        screen = self.quitting_screen(frames=3, resized=True)
        with self.assertRaises(TUI.ResizeScreenError):
            TUI.play(app, screen)
        self.assertEqual(screen.draw_next_frame.call_count, 1)

    def test_tiny_terminal_gets_a_notice_instead_of_a_crash(self):
        app = self.make_app()
        for width, height in ((40, 30), (120, 10), (1, 1)):
            screen = self.quitting_screen(width, height)
            TUI.play(app, screen)
            scenes = screen.set_scenes.call_args[0][0]
            self.assertEqual([scene.name for scene in scenes], ["too-small"])
            notice = scenes[0].effects[0]
            notice.update(0)
            text = screen.print_at.call_args[0][0]
            self.assertEqual(len(text), width)
            if width >= 40:
                self.assertTrue(text.startswith(f"terminal too small (need {cares.MIN_WIDTH}x{cares.MIN_HEIGHT})"))
        screen = self.quitting_screen()
        app.view = cares.View.JOIN
        TUI.play(app, screen)
        self.assertEqual(screen.set_scenes.call_args[1]["start_scene"].name, "join")

    def test_every_view_fits_the_smallest_terminal(self):
        app = self.make_app()
        self.start_app_orchestrator(app)
        self.populate(app.orchestrator.registry)
        app.detail_node = "node-1"
        for frame_class in (TUI.DashboardFrame, TUI.DetailFrame, TUI.HelpFrame):
            lines = render(frame_class(make_canvas(cares.MIN_WIDTH, cares.MIN_HEIGHT), app))
            self.assertEqual(len(lines), cares.MIN_HEIGHT)
        lines = render(TUI.DashboardFrame(make_canvas(cares.MIN_WIDTH, cares.MIN_HEIGHT), app))
        row = line_with(lines, "node-1 ")
        self.assertIn("Active", row)
        self.assertEqual(len(re.findall(r"\d+\.\d%", row)), 2, row)


class TmuxEndToEndTest(ClusterTestCase):
    """The spec's verification list and the dashboard's keys, driven like a user would: keys into
    real terminals, screens read back with capture-pane."""

    def setUp(self):
        if shutil.which("tmux") is None:
            if IN_CI:
                self.fail("tmux is not installed; .ci/run should have installed it")
            self.skipTest("tmux is not installed")
        self.socket = f"cares-test-{os.getpid()}-{random.randrange(10**6)}"
        self.workdir = tempfile.mkdtemp(prefix="cares-tmux-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.addCleanup(subprocess.run, ["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        self.session_started = False

    def tmux(self, *args):
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              timeout=10).stdout

    def open_pane(self, name, *args, environment="LC_ALL=C.UTF-8", width=120, height=40):
        """A tmux window running cares (with args, or the menu) that records its exit code."""
        err, rc = (os.path.join(self.workdir, f"{name}.{ext}") for ext in ("err", "rc"))
        # ESCDELAY: curses otherwise waits a second after Escape, in case a key sequence follows.
        command = (f"ESCDELAY=25 {environment} {sys.executable} {CARES_PY} {' '.join(args)} 2>{err}; "
                   f"echo $? >{rc}; sleep 60")
        if not self.session_started:
            self.tmux("new-session", "-d", "-s", "cares", "-x", str(width), "-y", str(height), "-n", name, command)
            self.session_started = True
        else:
            self.tmux("new-window", "-t", "cares", "-n", name, command)

    def screen(self, name, escapes=False):
        return self.tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", f"cares:{name}")

    def wait_for(self, name, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen(name)
            if predicate(text):
                return text
            time.sleep(0.1)
        self.fail(f"pane {name}: {what} not seen within {timeout} s; screen was:\n{self.screen(name)}")

    def keys(self, name, *keys, literal=False):
        self.tmux("send-keys", "-t", f"cares:{name}", *(["-l"] if literal else []), *keys)

    def fill_address(self, name, label, address):
        self.wait_for(name, lambda text: label in text, 10, label)
        self.keys(name, "End", *(["BSpace"] * 30))
        self.keys(name, address, literal=True)
        self.keys(name, "Enter")

    def exit_code(self, name, timeout=10):
        """The pane's cares exit code and stderr, once it has exited."""
        def read(ext):
            path = os.path.join(self.workdir, f"{name}.{ext}")
            if not os.path.exists(path):
                return ""
            with open(path) as file:
                return file.read()
        self.assertIsNotNone(wait_until(lambda: read("rc").strip(), timeout), f"{name} did not exit")
        return int(read("rc")), read("err")

    @staticmethod
    def node_rows(text):
        return {match.group(1): match.group(0) for match in
                re.finditer(r"^(\S+)\s.*?\b(Active|Joining|Disconnected|Missing)\b.*$", text, re.MULTILINE)}

    def test_orchestrator_and_four_workers_through_the_menus(self):
        address = f"127.0.0.1:{free_port()}"
        self.open_pane("orch")
        self.wait_for("orch", lambda text: "pick a role" in text, 15, "the mode menu")
        self.keys("orch", "Enter")
        self.fill_address("orch", "Listen address", address)
        self.wait_for("orch", lambda text: f"listening on {address}" in text and "Waiting for workers" in text,
                      10, "an empty dashboard")
        node_ids = []
        for number in range(4):  # the four start at once, then each is driven through its menus
            self.open_pane(f"w{number}")
        for number in range(4):
            name = f"w{number}"
            self.wait_for(name, lambda text: "pick a role" in text, 15, "the mode menu")
            self.keys(name, "Down", "Enter")
            self.fill_address(name, "Orchestrator address", address)
            text = self.wait_for(name, lambda text: "heartbeat every" in text and "Root FS" in text,
                                 15, "a connected worker view")
            node_ids.append(re.search(r"node (\S+)", text).group(1))
        dashboard = self.wait_for(
            "orch", lambda text: sum(" Active " in row for row in self.node_rows(text).values()) == 4,
            10, "four Active rows")
        rows = self.node_rows(dashboard)
        self.assertEqual(sorted(rows), sorted(node_ids))
        for row in rows.values():
            self.assertRegex(row, "[▏▎▍▌▋▊▉█]")  # memory is never 0 %, so every row has a bar
            self.assertEqual(len(re.findall(r"\d+\.\d%", row)), 3, row)  # CPU, memory, disk

        def percentages(text):
            return {node: re.findall(r"\d+\.\d%", row) for node, row in self.node_rows(text).items()}
        before = percentages(dashboard)
        self.wait_for("orch", lambda text: percentages(text) != before, 10, "values changing")

        victim = node_ids[1]
        shell = int(self.tmux("display-message", "-p", "-t", "cares:w1", "#{pane_pid}").strip())
        for child in cares.psutil.Process(shell).children():
            child.kill()
        # Both in one capture: tmux may catch a redraw half written (its rows go out top to bottom).
        text = self.wait_for("orch", lambda text: "Disconnected" in self.node_rows(text).get(victim, "")
                             and f"Node '{victim}' lost" in text, 3, f"{victim} Disconnected, and the event saying so")
        self.assertEqual(sum(" Active " in row for row in self.node_rows(text).values()), 3)

        self.tmux("resize-window", "-t", "cares:orch", "-x", "60", "-y", "15")
        self.wait_for("orch", lambda text: "terminal too small (need 70x18)" in text, 5, "the too-small notice")
        self.tmux("resize-window", "-t", "cares:orch", "-x", "120", "-y", "40")
        self.wait_for("orch", lambda text: len(self.node_rows(text)) == 4, 5, "the dashboard back after a resize")

        self.keys("orch", "q")
        code, err = self.exit_code("orch")
        self.assertEqual(code, 0, err)
        self.assertNotIn("Traceback", err)
        self.wait_for("w0", lambda text: "the orchestrator is shutting down" in text, 5, "the shutdown notice")
        for name in ("w0", "w2", "w3"):  # all three quit at once
            self.keys(name, "q")
        for name in ("w0", "w2", "w3"):
            code, err = self.exit_code(name)
            self.assertEqual((code, err), (0, ""))

    def test_labels_filter_detail_view_and_help(self):
        address = f"127.0.0.1:{free_port()}"
        self.open_pane("orch", "orchestrator", "--listen", address, "--heartbeat-ms", "500", width=160)
        self.wait_for("orch", lambda text: "Waiting for workers" in text, 15, "an empty dashboard")
        for number, role in enumerate(("web", "web", "db")):
            self.spawn("worker", address, "--node-id", f"{role}-{number}", "--label", f"role={role}",
                       "--label", f"rack=r{number}", "--headless")
        text = self.wait_for("orch", lambda text: sum(" Active " in row for row in self.node_rows(text).values())
                             == 3, 15, "three Active rows")
        self.assertIn("rack=r2,role=db", self.node_rows(text)["db-2"])
        self.keys("orch", "/")
        self.keys("orch", "role=db", literal=True)
        # A capture can fall between tmux drawing the header and the rows: wait for both.
        self.wait_for("orch", lambda text: "1 of 3 shown" in text and list(self.node_rows(text)) == ["db-2"], 5,
                      "the filtered table, db-2 alone")
        self.keys("orch", "Enter", "Enter")  # keep the filter, then open the selected node
        # A capture can fall while the view is being drawn: wait for all of it, then check each.
        details = ("Node db-2", "rack=r2 role=db", "Root FS", "CPU 60s", "Mem 60s", "Net in", cares.VERSION,
                   "Node 'db-2' has joined the cluster.")
        text = self.wait_for("orch", lambda text: all(expected in text for expected in details), 5, "the detail view")
        for expected in details:
            self.assertIn(expected, text)
        self.assertNotIn("web-0", text)
        self.keys("orch", "Escape")
        text = self.wait_for("orch", lambda text: "1 of 3 shown" in text and "db-2" in text, 5, "the table again")
        self.keys("orch", "Escape")
        self.wait_for("orch", lambda text: len(self.node_rows(text)) == 3, 5, "the filter cleared")
        self.keys("orch", "?")
        text = self.wait_for("orch", lambda text: "Keys" in text and "forget Disconnected" in text, 5, "the help")
        self.keys("orch", "Escape")
        self.wait_for("orch", lambda text: len(self.node_rows(text)) == 3, 5, "the dashboard after the help")
        self.keys("orch", "q")
        self.assertEqual(self.exit_code("orch")[0], 0)

    @staticmethod
    def colours_used(escaped):
        """The SGR foreground and background colour codes in a capture-pane -e screen."""
        codes = set()
        for parameters in re.findall(r"\x1b\[([0-9;]*)m", escaped):
            numbers = [int(part) for part in parameters.split(";") if part]
            index = 0
            while index < len(numbers):
                number = numbers[index]
                if number in (38, 48):
                    codes.add(("fg" if number == 38 else "bg", tuple(numbers[index + 1:index + 3])))
                    index += 3
                    continue
                if 30 <= number <= 37 or 90 <= number <= 97:
                    codes.add(("fg", number))
                if 40 <= number <= 47 or 100 <= number <= 107:
                    codes.add(("bg", number))
                index += 1
        return codes

    def test_a_redraw_reaches_the_terminal_in_few_writes_with_python_unbuffered(self):
        port = free_port()
        self.open_pane("orch", "orchestrator", "--listen", f"127.0.0.1:{port}", "--no-state",
                       environment="LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1")
        self.wait_for("orch", lambda text: "Waiting for workers" in text, 15, "an empty dashboard")
        shell = cares.psutil.Process(int(self.tmux("display-message", "-p", "-t", "cares:orch", "#{pane_pid}")))
        pid = next(child.pid for child in shell.children() if CARES_PY in child.cmdline())
        stub = raw_stub(self, port)
        streams = {}
        for number in range(30):
            node_id = f"busy-{number:02d}"
            session = stub.JoinCluster(pb.NodeInfo(node_id=node_id), timeout=5).session_id
            streams[node_id] = (OpenStream(self, stub, node_id, session), session)
        rng = random.Random(7)

        def written():
            """Bytes and write calls of the screen's thread (the main one)."""
            with open(f"/proc/{pid}/task/{pid}/io") as file:
                counters = dict(line.split(": ") for line in file.read().splitlines())
            return int(counters["wchar"]), int(counters["syscw"])

        before = None
        for sequence in range(1, 6):
            for node_id, (stream, session) in streams.items():
                stream.send(metrics(node_id, session, sequence, cpu=rng.uniform(0, 100), memory=rng.uniform(0, 100)))
            shown = self.screen("orch")
            self.wait_for("orch", lambda text: text != shown and "30 active" in text, 10, "new values drawn")
            if before is None:  # from the first redraw of 30 nodes on
                before = written()
        after = written()
        size, calls = after[0] - before[0], after[1] - before[1]
        self.assertGreater(calls, 0)
        # asciimatics writes each escape sequence and character on its own: 6 bytes a call on average
        # when each went through; a redraw's worth at a time is hundreds.
        self.assertGreater(size / calls, 200, f"{size} bytes in {calls} writes")
        self.keys("orch", "q")
        self.assertEqual(self.exit_code("orch")[0], 0)

    def test_no_color_and_a_light_background(self):
        orchestrator = self.start_orchestrator()
        for number in range(3):
            self.start_worker(orchestrator, f"tone-{number}")
        address = f"127.0.0.1:{orchestrator.port}"
        self.open_pane("light", "worker", address, "--node-id", "light-view")
        self.tmux("set-option", "-g", "window-style", "fg=black,bg=white")  # a light theme
        self.open_pane("nocolor", "worker", address, "--node-id", "no-colour", environment="LC_ALL=C.UTF-8 NO_COLOR=1")
        for name in ("light", "nocolor"):
            self.wait_for(name, lambda text: "heartbeat every" in text, 15, "a connected worker view")
        light = self.colours_used(self.screen("light", escapes=True))
        self.assertFalse([code for code in light if code[0] == "bg"], light)  # the terminal's own background
        self.assertTrue([code for code in light if code[0] == "fg"], "no colour at all with colours allowed")
        self.assertEqual(self.colours_used(self.screen("nocolor", escapes=True)), set())
        for name in ("light", "nocolor"):
            self.keys(name, "q")
            self.assertEqual(self.exit_code(name)[0], 0)

    def test_a_c_locale_gets_an_ascii_screen(self):
        orchestrator = self.start_orchestrator()
        address = f"127.0.0.1:{orchestrator.port}"
        self.open_pane("utf8", "worker", address, "--node-id", "utf8-view")
        # LANG=C as a user's profile sets it: Python would quietly switch itself to UTF-8.
        self.open_pane("ascii", "worker", address, "--node-id", "ascii-view",
                       environment="env -u LC_ALL -u LC_CTYPE -u PYTHONUTF8 LANG=C")
        # "used / total" memory is there once the first sample is (MiB or GiB, as much as is used).
        screens = {name: self.wait_for(name, lambda text: "heartbeat every" in text and re.search(r"iB / \d", text),
                                       15, "a connected worker view with its bars")
                   for name in ("utf8", "ascii")}
        self.assertTrue([char for char in screens["utf8"] if ord(char) > 127], "the UTF-8 view drew no bar glyphs")
        self.assertEqual([char for char in screens["ascii"] if ord(char) > 127], [], screens["ascii"])
        for name in ("utf8", "ascii"):
            self.keys(name, "q")
            self.assertEqual(self.exit_code(name)[0], 0)

    def test_a_closed_terminal_leaves_the_cluster_cleanly(self):
        orchestrator = self.start_orchestrator()
        self.open_pane("hup", "worker", f"127.0.0.1:{orchestrator.port}", "--node-id", "hangup-tui")
        self.assert_becomes(orchestrator.registry, "hangup-tui", cares.NodeStatus.ACTIVE, 15)
        self.tmux("kill-server")  # the terminal goes away: SIGHUP
        self.assert_becomes(orchestrator.registry, "hangup-tui", cares.NodeStatus.DISCONNECTED, 10)
        self.assertIn("Node 'hangup-tui' has left the cluster.", texts(orchestrator.registry.events))

    def test_a_nodes_processes_disks_and_containers_in_its_detail_view(self):
        address = f"127.0.0.1:{free_port()}"
        self.open_pane("orch", "orchestrator", "--listen", address, "--heartbeat-ms", "500", "--no-state",
                       width=140, height=40)
        self.wait_for("orch", lambda text: "Waiting for workers" in text, 15, "an empty dashboard")
        self.spawn("worker", address, "--node-id", "hot-node", "--headless", "--no-state", "--share-cmdlines")
        self.wait_for("orch", lambda text: "hot-node" in self.node_rows(text), 15, "the worker's row")
        busy = busy_process(self)
        self.keys("orch", "Enter")
        self.wait_for("orch", lambda text: "Node hot-node" in text and "1 Graphs" in text, 5, "the detail view")
        self.keys("orch", "2")
        def top_row(text):
            return text.split("sorted by CPU")[1].splitlines()[1] if "sorted by CPU" in text else ""
        text = self.wait_for("orch", lambda text: top_row(text).startswith(f"{busy.pid:>7} ") and
                             "python -c import sys" in top_row(text), 10,
                             "the busy process, its command line shared, at the top of the process table")
        self.assertIn("command lines shared (--share-cmdlines)", text)
        self.keys("orch", "m")
        self.wait_for("orch", lambda text: "sorted by memory" in text, 5, "the table sorted by memory")
        self.keys("orch", "Down")
        self.keys("orch", "3")
        text = self.wait_for("orch", lambda text: "MOUNTED ON" in text and "INTERFACE" in text, 5,
                             "disks and network")
        self.assertIsNotNone(re.search(r"^/\s+\S+\s+\S+\s+[0-9.]+ [KMGT]?i?B", text, re.MULTILINE), text)
        self.keys("orch", "Tab")
        self.wait_for("orch", lambda text: "Containers and services" in text and "Sensors" in text, 5,
                      "containers and sensors")
        self.keys("orch", "Tab")
        self.wait_for("orch", lambda text: "CPU 60s" in text, 5, "the graphs again")
        self.keys("orch", "Escape")
        self.wait_for("orch", lambda text: "hot-node" in self.node_rows(text), 5, "the table again")
        self.keys("orch", "q")
        self.assertEqual(self.exit_code("orch")[0], 0)

    def test_the_graphs_switch_to_history_ranges_with_events_marked(self):
        address = f"127.0.0.1:{free_port()}"
        self.open_pane("orch", "orchestrator", "--listen", address, "--heartbeat-ms", "200", "--state-dir",
                       self.workdir, width=120, height=40)
        self.wait_for("orch", lambda text: "Waiting for workers" in text, 15, "an empty dashboard")
        self.spawn("worker", address, "--node-id", "remembered", "--headless", "--no-state")
        self.wait_for("orch", lambda text: "remembered" in self.node_rows(text), 15, "the worker's row")
        self.keys("orch", "Enter")
        self.wait_for("orch", lambda text: "CPU 60s" in text and "1 Graphs 60s" in text, 5, "the live graphs")
        self.keys("orch", "t")
        self.wait_for("orch", lambda text: all(expected in text for expected in (
            "1 Graphs 1h", "History 1h (1 min buckets", "CPU 1h", "Mem 1h", "-1h", "J joined")) and
            re.search(r"^events\s+J\s*$", text, re.MULTILINE) and
            # the samples too: on a loaded machine the view can open before the first one is kept
            re.search(r"min [0-9.]+  avg [0-9.]+  max [0-9.]+ %", text), 10,
            "an hour of history, its samples summed up, with the join marked")
        self.keys("orch", "t")
        self.wait_for("orch", lambda text: "History 24h (10 min buckets" in text and "CPU 24h" in text, 5, "a day")
        for span in ("7d", "30d"):
            self.keys("orch", "t")
            self.wait_for("orch", lambda text: f"CPU {span}" in text, 5, span)
        self.keys("orch", "t")  # round again to the live graphs
        self.wait_for("orch", lambda text: "CPU 60s" in text and "History" not in text, 5, "the live graphs again")
        self.keys("orch", "T")
        self.wait_for("orch", lambda text: "CPU 30d" in text, 5, "back a step, to 30 days")
        self.keys("orch", "q")
        self.assertEqual(self.exit_code("orch")[0], 0)


# ---------------------------------------------------------------------------
# Access: tokens, TLS, streams bound to their session
# ---------------------------------------------------------------------------

class AccessTest(ClusterTestCase):
    _tls_files = None

    def make_tls_files(self):
        """A certificate and its key, made once for the class (the tests only read them)."""
        if shutil.which("openssl") is None:
            if IN_CI:
                self.fail("the openssl command is missing")
            self.skipTest("the openssl command is missing")
        if AccessTest._tls_files is None:
            folder = tempfile.mkdtemp(prefix="cares-tls-")
            self.addClassCleanup(shutil.rmtree, folder, True)
            self.addClassCleanup(setattr, AccessTest, "_tls_files", None)
            AccessTest._tls_files = self._new_tls_files(folder)
        return AccessTest._tls_files

    @staticmethod
    def _new_tls_files(folder):
        cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=60)
        return cert, key

    def test_wrong_or_missing_token_is_refused_and_backs_off(self):
        orchestrator = self.start_orchestrator(token="s3cret")
        for token in (None, "guess"):
            client = cares.WorkerClient(f"127.0.0.1:{orchestrator.port}", f"intruder-{token}",
                                        cares.LocalSampler(), token=token)
            client.start()
            self.addCleanup(client.stop, False, 0.5)
            self.assertIsNotNone(wait_until(lambda: client.state.phase is cares.ConnectionPhase.RETRYING, 5))
            state = client.state
            self.assertEqual(state.detail, "the orchestrator rejected the join token")
            self.assertGreaterEqual(state.retry_at - time.monotonic(), cares.REJECTED_TOKEN_BACKOFF_S - 2)
            self.assertIsNone(orchestrator.registry.get(f"intruder-{token}"))
        self.assertIn("Join from 127.0.0.1 refused: missing or wrong token.", texts(orchestrator.registry.events))
        self.assertEqual(orchestrator.registry.counters()["refusals"][("join", cares.RefusalReason.WRONG_TOKEN)], 2)
        self.start_worker_with_token(orchestrator, "s3cret")

    def start_worker_with_token(self, orchestrator, token):
        client = cares.WorkerClient(f"127.0.0.1:{orchestrator.port}", "member", cares.LocalSampler(), token=token)
        client.start()
        self.addCleanup(client.stop, False, 0.5)
        self.assert_becomes(orchestrator.registry, "member", cares.NodeStatus.ACTIVE, 5)

    def test_token_from_the_environment_and_the_status_command(self):
        orchestrator = self.start_orchestrator(token="from-env")
        worker = self.spawn("worker", f"127.0.0.1:{orchestrator.port}", "--node-id", "env-worker", "--headless",
                            env={**os.environ, "CARES_TOKEN": "from-env"})
        self.assert_becomes(orchestrator.registry, "env-worker", cares.NodeStatus.ACTIVE, 10)
        without_token = {k: v for k, v in os.environ.items() if k != "CARES_TOKEN"}
        refused, allowed = run_side_by_side(  # both at once
            [([*CARES, "status", f"127.0.0.1:{orchestrator.port}", "--json", *extra],
              {"env": without_token}) for extra in ([], ["--token", "from-env"])], timeout=20)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("rejected", refused.stderr)
        self.assertEqual(allowed.returncode, 0, allowed.stderr)
        self.assertEqual([node["node_id"] for node in json.loads(allowed.stdout)["nodes"]], ["env-worker"])
        worker.terminate()

    def test_tls_worker_joins_and_plaintext_worker_gets_a_clear_error(self):
        cert, key = self.make_tls_files()
        with open(cert, "rb") as cert_file, open(key, "rb") as key_file:
            cert_pem, key_pem = cert_file.read(), key_file.read()
        orchestrator = self.start_orchestrator(tls_cert=cert_pem, tls_key=key_pem)
        secure = cares.WorkerClient(f"127.0.0.1:{orchestrator.port}", "secure", cares.LocalSampler(),
                                    tls_ca=cert_pem)
        secure.start()
        self.addCleanup(secure.stop, False, 0.5)
        self.assert_becomes(orchestrator.registry, "secure", cares.NodeStatus.ACTIVE, 5)
        plain = cares.WorkerClient(f"127.0.0.1:{orchestrator.port}", "plain", cares.LocalSampler())
        plain.start()
        self.addCleanup(plain.stop, False, 0.5)
        self.assertIsNotNone(wait_until(lambda: plain.state.phase is cares.ConnectionPhase.RETRYING, 3), "a plaintext worker hung")
        self.assertIn("if it uses TLS, pass --tls-ca", plain.state.detail)
        result = subprocess.run([*CARES, "status", f"127.0.0.1:{orchestrator.port}",
                                 "--tls-ca", cert, "--json"], capture_output=True, text=True, timeout=20)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("secure", result.stdout)

    def test_tls_file_mistakes_are_one_line_errors(self):
        cert, key = self.make_tls_files()
        listen = ["orchestrator", "--listen", "127.0.0.1:0", "--headless"]
        cases = (([*listen, "--tls-cert", "/nonexistent.pem", "--tls-key", key], 1, "No such file"),
                 ([*listen, "--tls-cert", key, "--tls-key", cert], 1, "unusable TLS files"),
                 ([*listen, "--tls-cert", cert], 2, "--tls-cert and --tls-key go together"),
                 (["status", "127.0.0.1:1", "--tls-ca", key], 1, "unusable TLS files"))
        results = run_side_by_side([([*CARES, *args], {}) for args, _, _ in cases], timeout=20)
        for (args, code, needle), result in zip(cases, results):  # all four ran at once
            self.assertEqual(result.returncode, code, (args, result.stderr))
            self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
            self.assertIn(needle, result.stderr)
            self.assertNotIn("Traceback", result.stderr)

    def test_streams_are_bound_to_their_session(self):
        orchestrator = self.start_orchestrator()
        stub = raw_stub(self, orchestrator.port)
        alice = stub.JoinCluster(pb.NodeInfo(node_id="alice"), timeout=5).session_id
        bob = stub.JoinCluster(pb.NodeInfo(node_id="bob"), timeout=5).session_id
        for node_id, session in (("bob", alice), ("alice", "forged"), ("alice", ""), (None, None)):
            impostor = OpenStream(self, stub, node_id, session)
            impostor.send(metrics("bob", alice, 1))
            self.assertEqual(impostor.outcome(), grpc.StatusCode.PERMISSION_DENIED, (node_id, session))
        stream = OpenStream(self, stub, "alice", alice)
        stream.send(metrics("alice", alice, 1, cpu=11))
        self.assertIsNotNone(wait_until(lambda: cpu_of(orchestrator.registry, "alice") == 11, 5))
        second = OpenStream(self, stub, "alice", alice)
        second.send(metrics("alice", alice, 2))
        self.assertEqual(second.outcome(), grpc.StatusCode.PERMISSION_DENIED)
        stream.send(metrics("alice", bob, 2, cpu=99))
        self.assertEqual(stream.outcome(), grpc.StatusCode.PERMISSION_DENIED)
        # The client can see the status before the handler's clean-up has run.
        self.assert_becomes(orchestrator.registry, "alice", cares.NodeStatus.DISCONNECTED, 2)
        rejoined = stub.JoinCluster(pb.NodeInfo(node_id="alice"), timeout=5).session_id
        stream = OpenStream(self, stub, "alice", rejoined)
        stream.send(metrics("bob", bob, 2, cpu=99))
        self.assertEqual(stream.outcome(), grpc.StatusCode.PERMISSION_DENIED)
        self.assert_becomes(orchestrator.registry, "alice", cares.NodeStatus.DISCONNECTED, 2)
        self.assertIsNone(orchestrator.registry.get("bob"), "bob never streamed: no row")


# ---------------------------------------------------------------------------
# Hostile input: each gets a clear status or a dropped sample, a log line, and
# leaves the registry and dashboard intact.
# ---------------------------------------------------------------------------

class RefusalTableTest(ClusterTestCase):
    def test_a_status_refusal_carries_its_reason_too(self):
        orchestrator = self.start_orchestrator(token="right-token")
        status = grpc.insecure_channel(f"127.0.0.1:{orchestrator.port}")
        self.addCleanup(status.close)
        with self.assertRaises(grpc.RpcError) as caught:
            pb_grpc.StatusServiceStub(status).GetNodeDetail(pb.NodeDetailRequest(node_id="nobody"),
                                                            metadata=(("cares-token", "right-token"),), timeout=5)
        self.assertEqual((caught.exception.code(), cares.refusal_reason(caught.exception)),
                         (grpc.StatusCode.NOT_FOUND, cares.RefusalReason.UNKNOWN_NODE))
        self.assertIsNone(cares.refusal_reason(ValueError("not a call")))

    def test_the_table_holds_together(self):
        labels = [reason.label for reason in cares.RefusalReason]
        self.assertEqual(len(labels), len(set(labels)))
        for reason in cares.RefusalReason:
            self.assertIs(cares.RefusalReason.from_label(reason.label), reason)
            self.assertIsInstance(reason.code, grpc.StatusCode)
            self.assertNotEqual(reason.code, grpc.StatusCode.OK)
            self.assertTrue(reason.words)
            self.assertIn(reason.http, (0, 401, 429))
        self.assertEqual({reason for reason in cares.RefusalReason if reason.http},
                         {cares.RefusalReason.WRONG_TOKEN, cares.RefusalReason.THROTTLED})
        self.assertIsNone(cares.RefusalReason.from_label("no such reason"))


class HostileInputTest(ClusterTestCase):
    def joined(self, orchestrator, node_id="target"):
        stub = raw_stub(self, orchestrator.port)
        session = stub.JoinCluster(pb.NodeInfo(node_id=node_id), timeout=5).session_id
        stream = OpenStream(self, stub, node_id, session)
        stream.send(metrics(node_id, session, 1, cpu=42.0, memory=24.0))
        self.assertIsNotNone(wait_until(lambda: cpu_of(orchestrator.registry, node_id) == 42.0, 5))
        return stub, session, stream

    def test_hostile_strings_in_node_info_are_neutralised(self):
        orchestrator = self.start_orchestrator()
        stub = raw_stub(self, orchestrator.port)
        hostile = "\x1b[2J\x1b]0;owned\x07\u202eevil\r\n\x00" * 600  # ~10 kB
        session = stub.JoinCluster(pb.NodeInfo(node_id="odd", hostname=hostile, platform=hostile), timeout=5).session_id
        OpenStream(self, stub, "odd", session).send(metrics("odd", session, 1))
        self.assertIsNotNone(wait_until(lambda: cpu_of(orchestrator.registry, "odd") is not None, 5))
        node = orchestrator.registry.get("odd")
        for text in (node.hostname, node.platform):
            self.assertLessEqual(len(text), cares.PLATFORM_LIMIT)
            self.assertFalse([c for c in text if unicodedata.category(c) in ("Cc", "Cf")], repr(text))
        for node_id in ("\x1b[31mred", "x" * 10_000, "", "a b", "\u202eabc"):
            with self.assertRaises(grpc.RpcError) as caught:
                stub.JoinCluster(pb.NodeInfo(node_id=node_id), timeout=5)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        for labels in ({"Bad Key": "x"}, {"k": "v" * 200}, {f"k{n}": "v" for n in range(20)}, {"k": "a\x1b"}):
            with self.assertRaises(grpc.RpcError) as caught:
                stub.JoinCluster(pb.NodeInfo(node_id="labelled", labels=labels), timeout=5)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(orchestrator.registry.counters()["refusals"][("join", cares.RefusalReason.INVALID_JOIN)], 9)
        for text in texts(orchestrator.registry.events):
            self.assertFalse([c for c in text if unicodedata.category(c) in ("Cc", "Cf")], repr(text))
            self.assertLess(len(text), 300)

    def test_impossible_metrics_are_dropped_and_logged(self):
        orchestrator = self.start_orchestrator()
        _, session, stream = self.joined(orchestrator)
        bad = [metrics("target", session, 2, cpu=float("nan")), metrics("target", session, 3, cpu=float("inf")),
               metrics("target", session, 4, cpu=-5), metrics("target", session, 5, memory=250),
               metrics("target", session, 1, cpu=77)]  # sequence went back
        stream.send(*bad)
        stream.send(metrics("target", session, 6, cpu=33.0, sent_at_ms=2**62))  # far-future clock: fine
        self.assertIsNotNone(wait_until(lambda: cpu_of(orchestrator.registry, "target") == 33.0, 5))
        node = orchestrator.registry.get("target")
        self.assertEqual((node.status, node.metrics.memory_percent), (cares.NodeStatus.ACTIVE, 20.0))
        self.assertEqual(orchestrator.registry.samples_dropped, 5)
        self.assertAlmostEqual(node.last_seen, time.time(), delta=3)
        self.assertIn("Node 'target' sent a bad sample", orchestrator.registry.events.tail(3)[-1].text)

    def test_oversized_messages_are_refused(self):
        orchestrator = self.start_orchestrator()
        stub, session, stream = self.joined(orchestrator)
        with self.assertRaises(grpc.RpcError) as caught:
            stub.JoinCluster(pb.NodeInfo(node_id="big", hostname="x" * 100_000), timeout=5)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        stream.send(pb.NodeMetrics(node_id="target", session_id=session + "x" * 100_000, sequence=2))
        self.assertEqual(stream.outcome(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assert_becomes(orchestrator.registry, "target", cares.NodeStatus.DISCONNECTED, 2)
        self.assertIn("Node 'target' lost", orchestrator.registry.events.tail(1)[0].text)

    def test_a_burst_of_heartbeats_keeps_the_latest_and_a_flood_ends_the_stream(self):
        orchestrator = self.start_orchestrator()
        _, session, stream = self.joined(orchestrator)  # sent sample 1
        burst = cares.FLOOD_SAMPLES - 1
        for sequence in range(2, burst + 1):
            stream.send(metrics("target", session, sequence, cpu=sequence % 100))
        self.assertIsNotNone(wait_until(lambda: orchestrator.registry.get("target").last_sequence == burst, 10))
        node = orchestrator.registry.get("target")
        self.assertEqual((node.status, node.metrics.cpu_percent), (cares.NodeStatus.ACTIVE, burst % 100))
        self.assertLessEqual(len(node.history.cpu), 6)  # one point per heartbeat interval, not per message
        for sequence in range(burst + 1, burst + 3001):  # what a broken peer sends at line rate
            stream.send(metrics("target", session, sequence))
        self.assertEqual(stream.outcome(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assert_becomes(orchestrator.registry, "target", cares.NodeStatus.DISCONNECTED, 5)
        self.assertEqual(orchestrator.registry.get("target").last_sequence, cares.FLOOD_SAMPLES - 1)
        said = [text for text in texts(orchestrator.registry.events) if "flood" in text or "refused" in text]
        self.assertEqual(said, [f"Heartbeat stream from 127.0.0.1 refused: {cares.FLOOD_SAMPLES} samples in under "
                                "5 s; send one per heartbeat interval.", "Node 'target' lost: it flooded the orchestrator with samples."])

    def test_more_nodes_than_max_nodes_are_refused(self):
        orchestrator = self.start_orchestrator(max_nodes=3)
        stub = raw_stub(self, orchestrator.port)
        for number in range(4):
            session = stub.JoinCluster(pb.NodeInfo(node_id=f"n{number}"), timeout=5).session_id
            stream = OpenStream(self, stub, f"n{number}", session)
            stream.send(metrics(f"n{number}", session, 1))
        self.assertEqual(stream.outcome(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("Heartbeat stream from 127.0.0.1 refused: the cluster is full (3 nodes).",
                      texts(orchestrator.registry.events))
        self.assertEqual(len(orchestrator.registry), 3)

    def test_a_stream_that_never_speaks_is_closed(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=100)
        stub = raw_stub(self, orchestrator.port)
        session = stub.JoinCluster(pb.NodeInfo(node_id="mute"), timeout=5).session_id
        stream = OpenStream(self, stub, "mute", session)
        started = time.monotonic()
        self.assertEqual(stream.outcome(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertLess(time.monotonic() - started, 3)
        self.assertIn("Node 'mute' lost: no heartbeat for 0.3 s.", orchestrator.registry.events.tail(1)[0].text)

    def test_status_from_a_hostile_orchestrator_stays_clean(self):
        class HostileStatus(pb_grpc.StatusServiceServicer):
            def ListNodes(self, request, context):
                evil = "\x1b]0;owned\x07\x1b[2J\u202e"
                return pb.NodeList(nodes=[pb.NodeStatus(
                    node_id=evil, address=evil, status=evil + "Active", cpu_percent=float("nan"),
                    memory_percent=float("inf"), last_seen_unix_s=float("nan"))])
        from concurrent import futures
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_StatusServiceServicer_to_server(HostileStatus(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        results = run_side_by_side([([*CARES, "status", f"127.0.0.1:{port}", *extra], {})
                                    for extra in ([], ["--json"])], timeout=20)  # both at once
        for extra, result in zip(([], ["--json"]), results):
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertFalse([c for c in result.stdout if unicodedata.category(c) in ("Cc", "Cf") and c != "\n"],
                             repr(result.stdout))
            if extra:
                def refuse(constant):
                    raise ValueError(f"{constant} is not JSON")
                node = json.loads(result.stdout, parse_constant=refuse)["nodes"][0]
                self.assertEqual((node["cpu_percent"], node["memory_percent"], node["last_seen"]),
                                 (None, None, None))

    def test_cli_address_argument_fuzz_never_crashes(self):
        parser = cares.build_parser()
        rng = random.Random(4321)
        alphabet = "0123456789abcdefxyz:[].-_ %\\\"'\t\x00\x1b\u202e\u00e9\u0663/"
        accepted = 0
        with open(os.devnull, "w") as sink, mock.patch("sys.stderr", sink):
            for _ in range(3000):
                text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
                if text.startswith("-"):
                    continue  # an option, not an address
                try:
                    args = parser.parse_args(["worker", text])
                except SystemExit as exit_request:
                    self.assertEqual(exit_request.code, 2)
                    continue
                accepted += 1
                self.assertEqual(cares.parse_target(args.orchestrator_address), args.orchestrator_address)
        self.assertGreater(accepted, 0)


# ---------------------------------------------------------------------------
# Faults, with real processes
# ---------------------------------------------------------------------------

class FaultTest(ClusterTestCase):
    def test_a_worker_whose_sampling_fails_says_so_and_rejoins(self):
        class FailingSampler(FixedSampler):
            """Samples once, then fails until told to recover: a /proc that went away."""
            failing = threading.Event()

            def sample(self):
                if self.failing.is_set():
                    raise RuntimeError("sensor gone")
                return super().sample()
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        sampler = FailingSampler(10.0, 20.0)
        worker = self.start_worker(orchestrator, "flaky", sampler)
        self.assert_becomes(orchestrator.registry, "flaky", cares.NodeStatus.ACTIVE, 10)
        sampler.failing.set()
        told = lambda: [text for text in texts(worker.events) if "sensor gone" in text]
        self.assertIsNotNone(wait_until(told, 10), "a failing sampler went unnoticed")
        said = told()
        self.assertIn("Disconnected: cannot read this machine's metrics (RuntimeError: sensor gone); retrying.",
                      said[0])
        sampler.failing.clear()
        self.assert_becomes(orchestrator.registry, "flaky", cares.NodeStatus.ACTIVE, 15)

    def test_a_worker_stopped_in_the_middle_of_a_write_still_leaves_cleanly(self):
        # A congested link or a loaded machine: each write of the heartbeat stream takes half a
        # second. grpc.aio cancels the whole call when a write is cancelled mid-send (its own
        # _StreamRequestMixin._write does call.cancel()), which the slow write below does too; a
        # worker that cancelled its sender then could not say goodbye, and was lost, not left.
        writing = threading.Event()
        send = grpc.aio._call._StreamRequestMixin._write

        async def slow_write(call, request):
            writing.set()
            try:
                await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                call.cancel()
                raise
            return await send(call, request)
        orchestrator = self.start_orchestrator(heartbeat_ms=1000)
        with mock.patch.object(grpc.aio._call._StreamRequestMixin, "_write", slow_write):
            worker = self.start_worker(orchestrator, "mid-write", FixedSampler(10.0, 20.0))
            self.assert_becomes(orchestrator.registry, "mid-write", cares.NodeStatus.ACTIVE, 10)
            writing.clear()
            self.assertTrue(writing.wait(10), "no write of a sample began")
            worker.stop()
            self.assert_becomes(orchestrator.registry, "mid-write", cares.NodeStatus.DISCONNECTED, 5)
        self.assertIn("Node 'mid-write' has left the cluster.", texts(orchestrator.registry.events))
        self.assertIn("Left the cluster.", texts(worker.events))

    def test_stopped_worker_is_lost_then_back_after_sigcont(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=100)
        worker = self.spawn("worker", f"127.0.0.1:{orchestrator.port}", "--node-id", "sleepy", "--headless")
        self.addCleanup(lambda: worker.poll() is None and worker.send_signal(signal.SIGCONT))
        self.assert_streaming(orchestrator.registry, "sleepy")
        worker.send_signal(signal.SIGSTOP)
        bound = cares.MISSED_HEARTBEATS * orchestrator.registry.heartbeat_interval + 1.0
        self.assert_becomes(orchestrator.registry, "sleepy", cares.NodeStatus.DISCONNECTED, bound)
        self.assertIn("Node 'sleepy' lost: no heartbeat for 0.3 s.", texts(orchestrator.registry.events))
        worker.send_signal(signal.SIGCONT)
        self.assert_becomes(orchestrator.registry, "sleepy", cares.NodeStatus.ACTIVE, 10)

    def test_orchestrator_killed_and_restarted_every_worker_back(self):
        address = f"127.0.0.1:{free_port()}"
        orchestrator = self.spawn("orchestrator", "--listen", address, "--headless")
        names = [f"survivor-{n}" for n in range(3)]
        for name in names:
            self.spawn("worker", address, "--node-id", name, "--headless")

        def statuses():
            try:  # gRPC only once it listens: a refused connect would hold gRPC back for a second
                return {row["node_id"]: row["status"] for row in cares.fetch_status(address, timeout=1)} \
                    if listening(address) else {}
            except grpc.RpcError:
                return {}
        self.assertIsNotNone(wait_until(lambda: statuses() == dict.fromkeys(names, "Active"), 20, 0.2))
        orchestrator.kill()
        orchestrator.wait(5)
        self.spawn("orchestrator", "--listen", address, "--headless")
        waited = wait_until(lambda: statuses() == dict.fromkeys(names, "Active"), 6, 0.1)
        self.assertIsNotNone(waited, f"not all Active within 6 s of the restart: {statuses()}")

    def test_two_hundred_workers_join_at_once(self):
        orchestrator = self.start_orchestrator()
        clients = [cares.WorkerClient(f"127.0.0.1:{orchestrator.port}", f"crowd-{n:03d}", cares.LocalSampler())
                   for n in range(200)]
        for client in clients:
            client.start()
            self.addCleanup(client.stop, False, 0.5)
        registry = orchestrator.registry
        waited = wait_until(lambda: registry.status_counts()[cares.NodeStatus.ACTIVE] == 200, 30, 0.1)
        self.assertIsNotNone(waited, f"{registry.status_counts()} of 200 Active")
        self.assertFalse([e.text for e in registry.events.tail(1000) if e.level is not cares.Level.INFO])

    def test_black_holed_link_is_noticed_on_both_sides_and_recovers(self):
        if os.geteuid() != 0 or shutil.which("ip") is None:
            if IN_CI:
                self.fail("network namespaces need root and iproute2")
            self.skipTest("network namespaces need root and iproute2 (CI runs this as root)")
        tag = os.getpid() % 100_000
        namespace, outer, inner = f"cares-t{tag}", f"cv{tag}a", f"cv{tag}b"
        subnet = f"10.213.{tag % 250}"

        def ip(*args, namespace_of=None):
            prefix = ["ip", "netns", "exec", namespace_of] if namespace_of else []
            subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, timeout=10)
        ip("netns", "add", namespace)
        self.addCleanup(subprocess.run, ["ip", "netns", "del", namespace], capture_output=True)
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        self.addCleanup(subprocess.run, ["ip", "link", "del", outer], capture_output=True)
        ip("link", "set", inner, "netns", namespace)
        ip("addr", "add", f"{subnet}.1/30", "dev", outer)
        ip("link", "set", outer, "up")
        ip("addr", "add", f"{subnet}.2/30", "dev", inner, namespace_of=namespace)
        ip("link", "set", inner, "up", namespace_of=namespace)

        orchestrator = self.start_orchestrator(f"{subnet}.1:0", heartbeat_ms=200)
        worker = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, CARES_PY, "worker",
                                   f"{subnet}.1:{orchestrator.port}", "--node-id", "far", "--headless"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
        self.addCleanup(worker.communicate, timeout=10)
        self.addCleanup(worker.kill)
        log = LineCollector(worker.stderr)
        self.assert_streaming(orchestrator.registry, "far")
        self.assertEqual(orchestrator.registry.get("far").address.split(":")[0], f"{subnet}.2")

        ip("link", "set", outer, "down")
        cut = time.monotonic()
        self.assert_becomes(orchestrator.registry, "far", cares.NodeStatus.DISCONNECTED, 5)
        self.assertIsNotNone(wait_until(lambda: log.first_after(cut, "Disconnected:"), 5 - (time.monotonic() - cut)),
                             "the worker did not notice the dead link within 5 s")
        ip("link", "set", outer, "up")
        self.assert_becomes(orchestrator.registry, "far", cares.NodeStatus.ACTIVE, 15)


# ---------------------------------------------------------------------------
# Keep running, tell someone, remember (issue 11): hooks, alerts, the
# inventory that survives a restart, status --check
# ---------------------------------------------------------------------------

HOOK_RECORDER = ("import json, os, sys, time\n"
                 "record = {key: value for key, value in os.environ.items() if key.startswith('CARES_')}\n"
                 "record.update(pid=os.getpid(), started=time.time())\n"
                 "time.sleep(float(sys.argv[2]))\n"
                 "record['ended'] = time.time()\n"
                 "with open(sys.argv[1], 'a') as out:\n"
                 "    out.write(json.dumps(record) + '\\n')\n"
                 "sys.exit(int(sys.argv[3]))\n")


def hook_records(path):
    if not os.path.exists(path):
        return []
    with open(path) as file:
        return [json.loads(line) for line in file]


class EventHookTest(ClusterTestCase):
    def hook(self, seconds=0.0, exit_code=0):
        folder = tempfile.mkdtemp(prefix="cares-test-hook-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "events.jsonl")
        return [sys.executable, "-c", HOOK_RECORDER, path, str(seconds), str(exit_code)], path

    def test_each_node_event_runs_the_command_with_the_event_in_its_environment(self):
        command, path = self.hook()
        orchestrator = self.start_orchestrator(heartbeat_ms=200, on_event=command)
        client = self.start_worker(orchestrator, "hooked", FixedSampler(12.5, 40.0))
        self.assert_becomes(orchestrator.registry, "hooked", cares.NodeStatus.ACTIVE, 5)
        client.stop()
        self.assertIsNotNone(wait_until(lambda: len(hook_records(path)) == 2, 10), hook_records(path))
        records = {record["CARES_EVENT"]: record for record in hook_records(path)}
        self.assertEqual(sorted(records), ["joined", "left"])
        joined_record = records["joined"]
        self.assertEqual(records["left"]["CARES_MESSAGE"], "Node 'hooked' has left the cluster.")
        self.assertEqual(joined_record["CARES_NODE_ID"], "hooked")
        self.assertEqual(joined_record["CARES_CPU_PERCENT"], "12.5")
        self.assertEqual(joined_record["CARES_MEMORY_PERCENT"], "40.0")
        self.assertEqual(joined_record["CARES_HOSTNAME"], socket.gethostname()[:cares.HOSTNAME_LIMIT])
        self.assertTrue(joined_record["CARES_ADDRESS"].startswith("127.0.0.1:"))
        self.assertEqual(joined_record["CARES_MESSAGE"], "Node 'hooked' has joined the cluster.")

    def test_at_most_four_at_once_a_bounded_queue_and_one_warning_per_burst(self):
        command, path = self.hook(seconds=0.3)
        events = cares.EventLog()
        runner = cares.HookRunner(command, events)
        for number in range(cares.HOOK_QUEUE_EVENTS + 50):  # a burst the queue cannot hold
            events.add(cares.Level.WARN, f"Node 'n{number}' lost: test.", cares.EventKind.LOST, f"n{number}")
        events.add(cares.Level.INFO, "not a node event")
        # Up to HOOK_CONCURRENCY events may leave the queue for a command while the burst goes in.
        self.assertIsNotNone(wait_until(lambda: runner.dropped >= 50 - cares.HOOK_CONCURRENCY and any(
            "Event hook too slow" in text for text in texts(events)), 5))
        self.assertIsNotNone(wait_until(lambda: len(hook_records(path)) >= 8, 20))
        records = hook_records(path)
        moments = sorted([(record["started"], 1) for record in records] + [(record["ended"], -1) for record in records])
        running = peak = 0
        for _, change in moments:
            running += change
            peak = max(peak, running)
        self.assertLessEqual(peak, cares.HOOK_CONCURRENCY)
        self.assertEqual(sum("Event hook too slow" in text for text in texts(events)), 1)

    def test_a_failing_or_hanging_command_is_logged_and_the_cluster_goes_on(self):
        events = cares.EventLog()
        failing, _ = self.hook(exit_code=3)
        cares.HookRunner(failing[:2] + ["import sys; sys.stderr.write('boom\\n'); sys.exit(3)"], events)
        with mock.patch.object(cares, "HOOK_TIMEOUT_S", 0.5):
            cares.HookRunner([sys.executable, "-c", "import time; time.sleep(30)"], events)
            cares.HookRunner(["/nonexistent/hook"], events)
            started = time.monotonic()
            events.add(cares.Level.WARN, "Node 'x' lost: test.", cares.EventKind.LOST, "x")
            self.assertIsNotNone(wait_until(lambda: any("killed after 0.5 s" in text for text in texts(events)), 5))
        lines = texts(events)
        self.assertIn("Event hook for lost of 'x' exited with 3: boom.", lines)
        self.assertIn("Event hook '/nonexistent/hook' could not start: No such file or directory.", lines)
        self.assertLess(time.monotonic() - started, 5)


class AlertTest(ClusterTestCase):
    def test_rules_parse_or_say_why_not(self):
        rule = cares.parse_alert("cpu>90:60s")
        self.assertEqual((rule.metric, rule.above, rule.limit, rule.duration_s), (cares.AlertMetric.CPU, True, 90.0, 60.0))
        self.assertEqual(cares.parse_alert(" disk > 95% : 5m ").duration_s, 300)
        self.assertFalse(cares.parse_alert("load<0.5:1h").above)
        for bad in ("cpu>90", "gpu>90:1m", "cpu=90:1m", "cpu>ninety:1m", "cpu>90:soon", ""):
            with self.assertRaises(ValueError, msg=bad):
                cares.parse_alert(bad)
        self.assertEqual(self.exit_code("orchestrator", "--alert", "cpu>")[0], 2)

    def test_one_event_per_crossing_never_one_per_sample(self):
        registry = cares.NodeRegistry()
        registry.alert_rules = (cares.parse_alert("cpu>50:0.2s"), cares.parse_alert("memory>90:0s"))
        session = joined(registry, "hot", hostname="web1")
        sequence = iter(range(1, 10_000))

        def feed(cpu, memory=10.0, seconds=0.0, step=0.02):
            deadline = time.monotonic() + seconds
            while True:
                registry.update("hot", session, values(cpu, memory), next(sequence))
                if time.monotonic() >= deadline:
                    return
                time.sleep(step)
        for _ in range(5):
            feed(80, seconds=0.1)  # above, but shorter than the rule's 0.2 s: flapping is not an alert
            feed(20)
        kinds = lambda: [event.kind for event in registry.events.tail(100)
                         if event.kind in (cares.EventKind.THRESHOLD, cares.EventKind.RECOVERED)]
        self.assertEqual(kinds(), [])
        feed(80, seconds=0.5)
        self.assertEqual(kinds(), [cares.EventKind.THRESHOLD])
        self.assertEqual(registry.get("hot").alerting, frozenset({registry.alert_rules[0]}))
        feed(20, seconds=0.1)
        self.assertEqual(kinds(), [cares.EventKind.THRESHOLD, cares.EventKind.RECOVERED])
        feed(20, memory=95)
        threshold = [event for event in registry.events.tail(100) if event.kind is cares.EventKind.THRESHOLD]
        self.assertEqual([event.text for event in threshold],
                         ["Node 'hot': cpu > 50% for 0.2s (now 80%).", "Node 'hot': memory > 90% for 0s (now 95%)."])
        self.assertEqual(threshold[0].values["hostname"], "web1")
        row = row_text(cares.node_row(registry.get("hot"), cares.table_layout(120), time.time(),
                                      alerting=bool(registry.get("hot").alerting)))
        self.assertIn("Active!", row)

    def test_alerts_reach_status_and_hooks(self):
        command, path = EventHookTest.hook(self)
        orchestrator = self.start_orchestrator(heartbeat_ms=200, on_event=command,
                                               alerts=(cares.parse_alert("cpu>60:0.3s"),))
        sampler = FixedSampler(75.0, 10.0)
        self.start_worker(orchestrator, "busy", sampler)
        self.assertIsNotNone(wait_until(lambda: "threshold" in [r["CARES_EVENT"] for r in hook_records(path)], 10))
        rows = cares.fetch_status(f"127.0.0.1:{orchestrator.port}")
        self.assertEqual(rows[0]["alerts"], ["cpu > 60%"])
        sampler.cpu = 10.0
        self.assertIsNotNone(wait_until(lambda: "recovered" in [r["CARES_EVENT"] for r in hook_records(path)], 10))
        record = next(r for r in hook_records(path) if r["CARES_EVENT"] == "threshold")
        self.assertEqual((record["CARES_NODE_ID"], record["CARES_CPU_PERCENT"]), ("busy", "75.0"))


class InventoryTest(ClusterTestCase):
    def state_dir(self):
        folder = tempfile.mkdtemp(prefix="cares-test-inventory-")
        self.addCleanup(shutil.rmtree, folder, True)
        return folder

    def test_building_a_save_sets_off_no_garbage_collection(self):
        # 10,000 records alive until their text is made set off collections on the state thread
        # that scanned the gRPC loop's young objects too (up to 54 ms each with the GIL held at
        # 3,000 nodes); the build is a burst, the disk write after it is not. A low threshold makes
        # a build with the collector on set off dozens.
        state = cares.StateFile(self.state_dir(), "127.0.0.1:1", cares.EventLog())
        starts = collections_started(self, lambda: threading.current_thread().name == "cares-state")
        state.save(lambda: [{"node_id": f"n{number:04d}", "labels": {"rack": str(number % 7)}}
                            for number in range(2000)])
        state.flush(10)
        with open(state.path, encoding="utf-8") as file:
            self.assertEqual(len(json.load(file)["nodes"]), 2000)
        self.assertLessEqual(len(starts), 2, f"collections on the state thread, by generation: {starts}")

    def test_known_nodes_survive_a_restart_as_missing(self):
        # A changed inventory is saved at most every STATE_SAVE_S (5 s): the same save, sooner.
        saving = mock.patch.object(cares, "STATE_SAVE_S", 0.2)
        saving.start()
        self.addCleanup(saving.stop)
        folder, port = self.state_dir(), free_port()
        first = cares.Orchestrator(f"127.0.0.1:{port}", heartbeat_ms=200, state_dir=folder)
        first.start()
        workers = {node_id: self.start_worker(first, node_id, secret=f"secret-of-{node_id}", labels={"role": node_id},
                                              port=port) for node_id in ("stays", "gone")}
        for node_id in workers:
            self.assert_becomes(first.registry, node_id, cares.NodeStatus.ACTIVE, 5)
        workers["gone"].stop()  # this one will not come back
        first.stop(0.2)
        path = os.path.join(folder, f"orchestrator-127.0.0.1_{port}.json")
        self.assertEqual(oct(stat.S_IMODE(os.stat(path).st_mode)), "0o600")
        second = self.start_orchestrator(f"127.0.0.1:{port}", heartbeat_ms=200, state_dir=folder)
        registry = second.registry
        gone = registry.get("gone")
        self.assertEqual((gone.status, gone.labels, gone.hostname), (cares.NodeStatus.MISSING, {"role": "gone"},
                                                                     socket.gethostname()[:64]))
        self.assertGreater(gone.last_seen, 0)
        # The worker whose process lived on reconnects by itself; the other never does.
        self.assert_becomes(registry, "stays", cares.NodeStatus.ACTIVE, 10)
        self.assertIn("Node 'stays' has rejoined the cluster.", texts(registry.events))
        self.assertIsNotNone(wait_until(
            lambda: "Node 'gone' is missing: not seen since the orchestrator restarted." in texts(registry.events), 5))
        self.assertEqual(status_of(registry, "gone"), cares.NodeStatus.MISSING)
        # Ownership survived too: a stranger cannot take over the missing node's ID.
        with self.assertRaises(grpc.RpcError) as caught:
            raw_stub(self, port).JoinCluster(pb.NodeInfo(node_id="gone", node_secret="guess"), timeout=5)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        second.forget_gone()  # x: forgotten from the file too
        self.assertIsNotNone(wait_until(lambda: '"gone"' not in file_text(path), 10))

    def test_a_corrupt_state_file_is_kept_aside(self):
        folder, port = self.state_dir(), free_port()
        path = os.path.join(folder, f"orchestrator-127.0.0.1_{port}.json")
        with open(path, "w") as file:
            file.write('{"format": 1, "nodes": [tru')
        orchestrator = self.start_orchestrator(f"127.0.0.1:{port}", state_dir=folder)
        self.assertEqual(len(orchestrator.registry), 0)
        self.assertTrue(os.path.exists(path + ".corrupt"))
        warnings = [text for text in texts(orchestrator.registry.events) if "unreadable" in text]
        self.assertEqual(len(warnings), 1)
        self.assertIn(f"kept as {path}.corrupt, starting with no known nodes", warnings[0])
        # Records that do not hold together are skipped, the rest restored.
        orchestrator.stop(0.2)
        with open(path, "w") as file:
            json.dump({"format": 1, "nodes": [{"node_id": "bad id"}, {"node_id": "fine", "labels": {"k": "v"}},
                                              {"node_id": "x", "cpu_count": "many"}, "junk"]}, file)
        again = self.start_orchestrator(f"127.0.0.1:{port}", state_dir=folder)
        self.assertEqual([node.node_id for node in again.registry.snapshot()], ["fine"])

    def test_a_full_disk_costs_the_file_not_the_cluster(self):
        folder = self.state_dir()
        address = f"127.0.0.1:{free_port()}"
        limit = 64  # bytes: the first save of a node fails with "file too large"
        process = self.spawn("orchestrator", "--listen", address, "--headless", "--state-dir", folder,
                             "--heartbeat-ms", "200",
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
        log = LineCollector(process.stderr)
        client = cares.WorkerClient(address, "diskless", cares.LocalSampler())
        client.start()
        self.addCleanup(client.stop, False, 0.5)
        self.assertIsNotNone(wait_until(lambda: "Cannot save the state file" in log.text(), 15), log.text())
        self.assertIn("file too large; still serving", log.text())
        rows = cares.fetch_status(address)
        self.assertEqual([(row["node_id"], row["status"]) for row in rows], [("diskless", "Active")])
        self.assertEqual(log.text().count("Cannot save the state file"), 1)
        process.terminate()
        self.assertEqual(process.wait(10), 0)


class StatusCheckTest(ClusterTestCase):
    def test_nagios_lines_and_exit_codes(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=60_000)  # rows made here have no streams
        registry = orchestrator.registry
        address = f"127.0.0.1:{orchestrator.port}"

        def check(*extra, process=False):
            # The first check runs as the real process; the rest run cares.main() in this one.
            result = (self.run_cares if process else self.run_main)("status", address, "--check", *extra)
            self.assertEqual(result.stderr, "")
            return result.returncode, result.stdout.strip()
        self.assertEqual(check(process=True), (2, "CARES CRITICAL - 0 active, 0 lost, 0 missing | active=0 lost=0 missing=0 "
                                      "joining=0 left=0 alerting=0"))
        for number in range(3):
            active(registry, f"ok-{number}")
        self.assertEqual(check()[0], 0)
        self.assertTrue(check()[1].startswith("CARES OK - 3 active, 0 lost, 0 missing | active=3 lost=0"))
        registry.disconnect("ok-2", registry.get("ok-2").session_id, "goodbye", left=True)
        self.assertEqual(check()[0], 0)  # leaving on purpose is not a loss
        registry.disconnect("ok-1", registry.get("ok-1").session_id, "killed")
        self.assertEqual(check(), (2, "CARES CRITICAL - 1 active, 1 lost, 0 missing | active=1 lost=1 missing=0 "
                                      "joining=0 left=1 alerting=0"))
        self.assertEqual(check("--max-lost", "1")[0], 1)
        self.assertEqual(check("--max-lost", "1", "--min-active", "2")[0], 2)
        registry.restore([{"node_id": "was-here"}])
        self.assertEqual(check("--max-lost", "5")[1].split(" | ")[0], "CARES WARNING - 1 active, 1 lost, 1 missing")
        unreachable = self.run_cares("status", f"127.0.0.1:{free_port()}", "--check", "--timeout", "2")
        self.assertEqual(unreachable.returncode, 3)
        self.assertRegex(unreachable.stdout, r"^CARES UNKNOWN - cannot get status from 127\.0\.0\.1:\d+: "
                                             r"orchestrator unreachable")

    def test_a_wrong_token_is_unknown(self):
        orchestrator = self.start_orchestrator(token="right")
        result = self.run_cares("status", f"127.0.0.1:{orchestrator.port}", "--check", "--token", "wrong")
        self.assertEqual(result.returncode, 3)
        self.assertIn("CARES UNKNOWN - cannot get status", result.stdout)
        self.assertIn("rejected the join token", result.stdout)


# ---------------------------------------------------------------------------
# 7-8. Running as a service: units checked by systemd's own parser
# (systemd-analyze verify, its debug dump and security --offline), sd_notify on
# real datagram sockets, install and uninstall into a temporary root.
# ---------------------------------------------------------------------------

ANALYZE = shutil.which("systemd-analyze")
TOKEN = "s3cr3t-T0ken_with$dollar\"quote'apos\\back`tick #hash"
# Exposure scores of the generated system units must stay below this (0-10 scale; 1.5/1.6 when written).
MAX_SYSTEM_EXPOSURE = 2.0


def need_analyze():
    if ANALYZE is None:
        if IN_CI:
            raise AssertionError("systemd-analyze is missing (Debian: apt-get install systemd)")
        raise unittest.SkipTest("systemd-analyze is not installed")


def host_python() -> str:
    """An interpreter a system unit may name: not below /home or /root (ProtectHome=yes)."""
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def make_pyz(path: str, text: str = "print('cares')\n") -> str:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("__main__.py", text)
    return path


def snapshot(root: str) -> dict:
    """Every entry below root: type, mode and content (or link target)."""
    entries = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                value = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                value = ("dir", stat.S_IMODE(info.st_mode))
            else:
                with open(path, "rb") as file:
                    value = ("file", stat.S_IMODE(info.st_mode), file.read())
            entries[os.path.relpath(path, root)] = value
    return entries


def dump_words(line: str) -> list[str]:
    """Split a "Command Line:" of systemd's unit dump. systemd writes a word as it is, or in double
    quotes with a backslash before each of " \\ ` $ (shell_maybe_quote()); shlex.split() would keep
    the backslash of "\\$", which a POSIX shell drops."""
    words, i = [], 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        word, quoted = [], False
        while i < len(line) and (quoted or line[i] != " "):
            if line[i] == '"':
                quoted = not quoted
            elif line[i] == "\\" and quoted:
                i += 1
                word.append(line[i])
            else:
                word.append(line[i])
            i += 1
        words.append("".join(word))
    return words


class FakeSystemctl:
    """Records the commands install/uninstall run; fails those whose verb is in fail."""

    def __init__(self, fail=(), missing=False):
        self.calls, self.fail, self.missing = [], set(fail), missing

    def __call__(self, argv):
        if self.missing:
            raise FileNotFoundError(argv[0])
        self.calls.append(list(argv))
        verb = [word for word in argv[1:] if not word.startswith("--")][0]
        return (1, f"Failed to {verb}: Access denied") if verb in self.fail else (0, "")


class TempRoot(unittest.TestCase):
    """A temporary / with the directories a Debian host has, plus unrelated files of others."""

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="cares-root-")
        self.addCleanup(shutil.rmtree, self.root, True)
        for directory in ("etc/systemd/system/multi-user.target.wants", "usr/local/lib", "home/alice/.config",
                          "home/alice/.local/lib"):
            os.makedirs(os.path.join(self.root, directory))
        self.write("etc/systemd/system/unrelated.service", "[Service]\nExecStart=/bin/true\n")
        self.write("home/alice/.config/other.conf", "x=1\n")
        os.symlink("/etc/systemd/system/unrelated.service",
                   os.path.join(self.root, "etc/systemd/system/multi-user.target.wants/unrelated.service"))
        self.pyz = make_pyz(os.path.join(self.root, "cares.pyz"))
        self.system = cares.ServicePaths.system(root=self.root)
        self.user = cares.ServicePaths.for_user(home="/home/alice", environ={}, root=self.root)

    def write(self, relative: str, text: str) -> str:
        path = os.path.join(self.root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as file:
            file.write(text)
        return path

    def disk(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def read(self, path: str) -> str:
        with open(self.disk(path)) as file:
            return file.read()

    def install(self, role="worker", paths=None, args=None, **options) -> cares.ServiceReport:
        paths = paths or self.system
        if args is None:
            args = cares.worker_exec_args("10.0.0.5:50051") if role == "worker" else cares.orchestrator_exec_args()
        options.setdefault("python", host_python())
        return cares.install_service(role, args, paths=paths, pyz_source=self.pyz, **options)


# -- systemd's own checks of the generated units ---------------------------------------------

class ServiceUnitTest(TempRoot):
    """Install into the temporary root, then let systemd-analyze read the unit files there.

    verify reads the file given by path and loads its dependencies (network-online.target...)
    from the host, and checks that ExecStart's program exists on the host (hence host_python()).
    --root= is no use: it wants sysinit.target and the interpreter inside the root too."""

    def setUp(self):
        need_analyze()
        super().setUp()
        self.runtime = tempfile.mkdtemp(prefix="cares-xdg-")  # a user manager needs $XDG_RUNTIME_DIR
        os.chmod(self.runtime, 0o700)
        self.addCleanup(shutil.rmtree, self.runtime, True)

    def analyze(self, user: bool, *words: str, level: str = "info") -> subprocess.CompletedProcess:
        env = dict(os.environ, SYSTEMD_LOG_LEVEL=level, SYSTEMD_PAGER="", SYSTEMD_COLORS="0")
        if user:
            env.update(XDG_RUNTIME_DIR=self.runtime, HOME=self.disk("/home/alice"))
        command = [ANALYZE, *(["--user"] if user else []), *words]
        return subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)

    def verify(self, unit: str, user: bool) -> None:
        done = self.analyze(user, "verify", "--man=no", "--generators=no", "--recursive-errors=no", unit)
        about_ours = [line for line in done.stderr.splitlines() if os.path.basename(unit) in line]
        self.assertEqual(about_ours, [], done.stderr)
        self.assertEqual(done.returncode, 0, done.stderr)

    def dumped(self, unit: str, user: bool) -> str:
        """The unit as systemd parsed it (the debug log of verify dumps every loaded setting)."""
        done = self.analyze(user, "verify", "--man=no", unit, level="debug")
        return done.stdout + done.stderr

    def command_line(self, unit: str, user: bool) -> list[str]:
        """ExecStart= as systemd will execute it: the dump shell-quotes the words; "$$" becomes
        "$" at exec time, when systemd substitutes variables."""
        found = re.findall(r"^\s*Command Line: (.*)$", self.dumped(unit, user), re.M)
        self.assertEqual(len(found), 1)
        return [word.replace("$$", "$") for word in dump_words(found[0])]

    def test_every_generated_unit_verifies_clean(self):
        for user in (False, True):
            for role in cares.ROLES:
                with self.subTest(user=user, role=role):
                    paths = self.user if user else self.system
                    args = (cares.worker_exec_args("10.0.0.5:50051", "web-1", ["env=prod"]) if role == "worker"
                            else cares.orchestrator_exec_args("[::]:50051", "127.0.0.1:9100"))
                    tls = ({"--tls-ca": self.pyz} if role == "worker"
                           else {"--tls-cert": self.pyz, "--tls-key": self.pyz})
                    self.install(role, paths, args, token="t0ken", tls_files=tls)
                    self.verify(self.disk(paths.unit_file(role)), user)

    def test_a_bad_setting_is_caught(self):
        # The check itself must be able to fail: a typo in our unit is reported.
        self.install("worker", token="t")
        unit = self.disk(self.system.unit_file("worker"))
        with open(unit, "a") as file:
            file.write("[Service]\nProtectSytem=strict\n")
        done = self.analyze(False, "verify", "--man=no", "--recursive-errors=no", unit)
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("ProtectSytem", done.stderr)

    def test_systemd_parses_exec_start_into_exactly_our_arguments(self):
        labels = ["a b", 'q"uote', "it's", "back\\slash", "trailing\\", "50%", "%d", "$HOME", "${X}", "$$",
                  "semi;colon", ";", "", "ünïcødé", "--"]
        args = cares.worker_exec_args("10.0.0.5:50051", "web-1", labels)
        for user in (False, True):
            with self.subTest(user=user):
                paths = self.user if user else self.system
                self.install("worker", paths, args, tls_files={"--tls-ca": self.pyz})
                parsed = self.command_line(self.disk(paths.unit_file("worker")), user)
                tls = ["--tls-ca", self.pyz] if user else ["--tls-ca", "/run/credentials/cares-worker.service/tls-ca"]
                self.assertEqual(parsed, [host_python(), paths.pyz, *args, *tls])

    def test_sandbox_settings_are_understood_not_ignored(self):
        self.install("orchestrator", args=cares.orchestrator_exec_args("[::]:443"), privileged_port=True, token="t")
        dump = self.dumped(self.disk(self.system.unit_file("orchestrator")), False)
        for expected in ("DynamicUser: yes", "ProtectProc: invisible", "ProcSubset: all", "LimitNOFILE: 65536",
                         "CapabilityBoundingSet: cap_net_bind_service", "Environment: CARES_CACHE_DIR=/var/cache/cares",
                         "EnvironmentFile: /etc/cares/orchestrator.env"):
            self.assertIn(expected, dump)
        self.assertNotIn("Unknown key", dump)

    def test_exposure_score_of_system_units(self):
        for role in cares.ROLES:
            with self.subTest(role=role):
                self.install(role, token="t")
                done = self.analyze(False, "security", "--offline=yes", self.disk(self.system.unit_file(role)))
                score = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout).group(1))
                self.assertLessEqual(score, MAX_SYSTEM_EXPOSURE, done.stdout)


# -- sd_notify against real sockets -----------------------------------------------------------

class NotifyReceiver:
    """A datagram socket bound the way systemd binds its notify socket, credentials on."""

    def __init__(self, address):
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(address)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.socket.settimeout(2)

    def receive(self) -> tuple[str, int]:
        """One message and the PID the kernel vouches for (what NotifyAccess=main checks)."""
        data, ancillary, _, _ = self.socket.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = next(struct.unpack("3i", value[:12])[0] for level, kind, value in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return data.decode("utf-8"), pid

    def close(self):
        self.socket.close()


class SdNotifyTest(unittest.TestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="cares-notify-")
        self.addCleanup(shutil.rmtree, self.directory, True)

    def notifier(self, environ) -> cares.SdNotifier:
        notifier = cares.SdNotifier(environ)
        self.addCleanup(notifier.close)
        return notifier

    def receiver(self, abstract: bool) -> tuple[NotifyReceiver, str]:
        if abstract:
            name = f"cares-test-{os.getpid()}-{time.monotonic_ns()}"
            receiver, value = NotifyReceiver("\0" + name), "@" + name
        else:
            value = os.path.join(self.directory, "notify")
            receiver = NotifyReceiver(value)
        self.addCleanup(receiver.close)
        return receiver, value

    def test_the_four_messages_arrive_on_path_and_abstract_sockets(self):
        for abstract in (False, True):
            with self.subTest(abstract=abstract):
                receiver, value = self.receiver(abstract)
                notifier = self.notifier({"NOTIFY_SOCKET": value})
                self.assertTrue(notifier.enabled)
                self.assertTrue(notifier.ready("listening on [::]:50051"))
                self.assertEqual(receiver.receive(), ("READY=1\nSTATUS=listening on [::]:50051", os.getpid()))
                notifier.status("retrying in 3 s: orchestrator unreachable (connection refused)")
                self.assertEqual(receiver.receive()[0],
                                 "STATUS=retrying in 3 s: orchestrator unreachable (connection refused)")
                notifier.watchdog()
                self.assertEqual(receiver.receive()[0], "WATCHDOG=1")
                notifier.stopping()
                self.assertEqual(receiver.receive()[0], "STOPPING=1")
                self.assertEqual((notifier.sent, notifier.failures), (4, 0))

    def test_status_is_one_clean_line_and_repeats_are_skipped(self):
        receiver, value = self.receiver(False)
        notifier = self.notifier({"NOTIFY_SOCKET": value})
        notifier.status("connected to 10.0.0.5:50051\nREADY=1\x1b[31m\u202e")
        self.assertEqual(receiver.receive()[0], "STATUS=connected to 10.0.0.5:50051 READY=1?[31m?")
        notifier.status("connected to 10.0.0.5:50051\nREADY=1\x1b[31m\u202e")
        self.assertEqual(notifier.sent, 1)
        notifier.status("x" * 500)
        self.assertEqual(len(receiver.receive()[0]), len("STATUS=") + cares.STATUS_LIMIT)

    def test_a_missing_or_dead_socket_never_raises(self):
        dead = os.path.join(self.directory, "dead")
        NotifyReceiver(dead).close()  # the file stays; nobody listens: ECONNREFUSED
        for value in (os.path.join(self.directory, "nonexistent"), dead, "@cares-nobody-listens-here"):
            with self.subTest(value=value):
                notifier = self.notifier({"NOTIFY_SOCKET": value})
                for call in (notifier.ready, notifier.watchdog, notifier.stopping):
                    self.assertFalse(call())
                self.assertFalse(notifier.status("x"))
                self.assertEqual(notifier.failures, 4)
                self.assertTrue(notifier.last_error)

    def test_without_a_usable_socket_it_does_nothing(self):
        for environ in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"}, {"NOTIFY_SOCKET": "@"},
                        {"NOTIFY_SOCKET": "vsock:2:1234"}):
            notifier = self.notifier(environ)
            self.assertFalse(notifier.enabled)
            self.assertFalse(notifier.ready())
            self.assertEqual(notifier.failures, 0)

    def test_a_full_queue_never_blocks_an_event_loop(self):
        receiver, value = self.receiver(False)  # never read: the queue fills up
        notifier = self.notifier({"NOTIFY_SOCKET": value})

        async def ping_a_lot():
            started = time.monotonic()
            for _ in range(3000):
                notifier.watchdog()
            return time.monotonic() - started

        elapsed = asyncio.run(ping_a_lot())
        self.assertLess(elapsed, 2.0)
        self.assertGreater(notifier.failures, 0)  # EAGAIN once the queue was full, counted
        self.assertEqual(notifier.sent + notifier.failures, 3000)

    def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_us(self):
        pid = os.getpid()
        cases = [({"WATCHDOG_USEC": "30000000"}, 15.0), ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid)}, 15.0),
                 ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(pid + 1)}, None), ({"WATCHDOG_USEC": "0"}, None),
                 ({"WATCHDOG_USEC": "soon"}, None), ({}, None)]
        for environ, expected in cases:
            with self.subTest(environ=environ):
                self.assertEqual(self.notifier(environ).watchdog_interval(), expected)

    def test_watchdog_if_due_pings_once_per_interval(self):
        receiver, value = self.receiver(False)
        notifier = self.notifier({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "2000000"})
        sent = [notifier.watchdog_if_due(now) for now in (100.0, 100.5, 100.99, 101.0, 101.5, 102.0)]
        self.assertEqual(sent, [True, False, False, True, False, True])
        self.assertFalse(self.notifier({"NOTIFY_SOCKET": value}).watchdog_if_due(100.0))  # no WatchdogSec=


class ServiceInstallTest(TempRoot):
    def test_files_modes_and_lines_of_a_system_install(self):
        report = self.install(token=TOKEN)
        self.assertEqual(report.outcome, "installed")
        for path, mode in (("/etc/systemd/system/cares-worker.service", 0o644), ("/etc/cares/worker.env", 0o600),
                           ("/usr/local/lib/cares/cares.pyz", 0o644), ("/etc/cares", 0o755),
                           ("/usr/local/lib/cares", 0o755)):
            self.assertEqual(stat.S_IMODE(os.stat(self.disk(path)).st_mode), mode, path)
        unit = self.read(self.system.unit_file("worker"))
        self.assertIn("ExecStart=%s /usr/local/lib/cares/cares.pyz worker 10.0.0.5:50051 --headless" % host_python(), unit)
        for setting in ("Type=notify", "NotifyAccess=main", "Restart=always", "RestartSec=3s", "WatchdogSec=30s",
                        "CacheDirectory=cares", "StateDirectory=cares", "NoNewPrivileges=yes", "ProtectSystem=strict",
                        "ProtectHome=yes", "PrivateTmp=yes", "EnvironmentFile=/etc/cares/worker.env",
                        "After=network-online.target", "Wants=network-online.target", "WantedBy=multi-user.target"):
            self.assertIn(setting + "\n", unit)
        self.assertIn("  systemctl daemon-reload && systemctl enable --now cares-worker.service", report.lines)

    def test_the_token_is_never_in_the_unit_nor_on_a_command_line(self):
        runner = FakeSystemctl()
        self.install(token=TOKEN, now=True, runner=runner)
        self.assertNotIn(TOKEN, self.read(self.system.unit_file("worker")))
        self.assertTrue(runner.calls)
        self.assertFalse([argv for argv in runner.calls if any(TOKEN in word for word in argv)])
        with self.assertRaises(cares.ServiceError):
            self.install(args=["worker", "10.0.0.5:50051", "--token", TOKEN])
        with self.assertRaises(cares.ServiceError):
            cares.render_unit("worker", ["worker", "h:1", f"--token={TOKEN}"], "/usr/bin/python3", "/x.pyz", None, False)

    def test_the_environment_file_gives_back_the_exact_token(self):
        # systemd reads a double-quoted value like a POSIX shell does (systemd.exec(5)): so does sh.
        for token in (TOKEN, "plain", "a'b", "$(reboot)", "\\", "x\\"):
            with self.subTest(token=token):
                self.install(token=token)
                env_file = self.disk("/etc/cares/worker.env")
                done = subprocess.run(["sh", "-c", '. "$1"; printf %s "$CARES_TOKEN"', "sh", env_file],
                                      capture_output=True, text=True, timeout=10)
                self.assertEqual(done.stdout, token)

    def test_the_environment_file_is_never_readable_by_others_even_briefly(self):
        seen = []
        real_replace = os.replace

        def checking_replace(source, target):
            seen.append((os.path.basename(target), stat.S_IMODE(os.stat(source).st_mode)))
            return real_replace(source, target)

        with mock.patch.object(cares.os, "replace", checking_replace):
            self.install(token=TOKEN)
        self.assertIn(("worker.env", 0o600), seen)
        # The temporary file is created 0600, exclusively, before a byte is written.
        created, real_open = [], os.open

        def recording_open(path, flags, mode=0o777, **kwargs):
            if os.path.basename(path).startswith(".cares-"):
                created.append((flags & os.O_EXCL, mode))
            return real_open(path, flags, mode, **kwargs)

        with mock.patch.object(cares.os, "open", recording_open):
            self.install(token="another")
        self.assertTrue(created)
        self.assertEqual(set(created), {(os.O_EXCL, 0o600)})

    def test_directories_get_their_mode_whatever_the_umask(self):
        old = os.umask(0o077)
        try:
            self.install(token="t")
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.disk("/usr/local/lib/cares")).st_mode), 0o755)
        self.assertEqual(stat.S_IMODE(os.stat(self.disk("/usr/local/lib/cares/cares.pyz")).st_mode), 0o644)

    def test_a_second_install_updates_in_place(self):
        self.install(token="t")
        unit, pyz = self.disk(self.system.unit_file("worker")), self.disk(self.system.pyz)
        before = (os.stat(unit).st_ino, os.stat(pyz).st_ino)
        report = self.install(token="t")
        self.assertEqual(report.outcome, "unchanged")
        self.assertEqual((os.stat(unit).st_ino, os.stat(pyz).st_ino), before)  # nothing rewritten
        report = self.install(args=cares.worker_exec_args("10.0.0.5:50051", labels=["rack=7"]), token="t")
        self.assertEqual(report.outcome, "updated")
        self.assertIn("--label rack=7", self.read(self.system.unit_file("worker")))
        self.assertIn("  systemctl daemon-reload && systemctl enable cares-worker.service && "
                      "systemctl restart cares-worker.service", report.lines)
        self.assertEqual(self.install(args=cares.worker_exec_args("10.0.0.5:50051", labels=["rack=7"]),
                                      token="new").outcome, "updated")
        self.assertIn('"new"', self.read("/etc/cares/worker.env"))
        make_pyz(self.pyz, "print('cares 0.4')\n")
        self.assertEqual(self.install(args=cares.worker_exec_args("10.0.0.5:50051", labels=["rack=7"])).outcome,
                         "updated")

    def test_a_second_install_without_a_token_keeps_the_first_ones(self):
        self.install(token="first")
        report = self.install()
        self.assertIn("EnvironmentFile=/etc/cares/worker.env", self.read(self.system.unit_file("worker")))
        self.assertIn('"first"', self.read("/etc/cares/worker.env"))
        self.assertTrue(any("kept" in line for line in report.lines))

    def test_uninstall_removes_exactly_what_install_wrote(self):
        os.makedirs(self.disk("/etc/cares"))
        self.write("etc/cares/notes.txt", "the admin's own file\n")  # /etc/cares existed: it stays
        before = snapshot(self.root)
        self.install(token="t", tls_files={"--tls-ca": self.pyz})
        os.symlink("/etc/systemd/system/cares-worker.service",  # as `systemctl enable` would
                   self.disk("/etc/systemd/system/multi-user.target.wants/cares-worker.service"))
        report = cares.uninstall_service("worker", paths=self.system)
        self.assertEqual(report.outcome, "removed")
        self.assertTrue(report.ok)
        self.assertEqual(snapshot(self.root), before)
        report = cares.uninstall_service("worker", paths=self.system)
        self.assertEqual(report.outcome, "not installed")

    def test_two_roles_share_cares_pyz_until_the_last_one_goes(self):
        before = snapshot(self.root)
        self.install("worker", token="w")
        self.install("orchestrator", token="o")
        cares.uninstall_service("worker", paths=self.system)
        self.assertTrue(os.path.exists(self.disk(self.system.pyz)))
        self.assertTrue(os.path.exists(self.disk("/etc/cares/orchestrator.env")))
        self.assertFalse(os.path.exists(self.disk("/etc/cares/worker.env")))
        cares.uninstall_service("orchestrator", paths=self.system)
        self.assertEqual(snapshot(self.root), before)  # /etc/cares and /usr/local/lib/cares gone too

    def test_roles_removed_in_either_order_leave_nothing(self):
        before = snapshot(self.root)
        self.install("orchestrator", token="o")
        self.install("worker", token="w")
        cares.uninstall_service("orchestrator", paths=self.system)
        cares.uninstall_service("worker", paths=self.system)
        self.assertEqual(snapshot(self.root), before)

    def test_an_edited_manifest_cannot_make_uninstall_delete_other_files(self):
        self.install(token="t")
        victim = self.write("etc/passwd", "root:x:0:0::/root:/bin/sh\n")
        unit = self.disk(self.system.unit_file("worker"))
        with open(unit) as file:
            text = file.read()
        with open(unit, "w") as file:
            first, rest = text.split("\n", 1)  # keep the header line that marks it as ours
            file.write(first + "\n# cares-installed: /etc/passwd\n# cares-created-dir: /etc\n" + rest)
        cares.uninstall_service("worker", paths=self.system)
        self.assertTrue(os.path.exists(victim))

    def test_a_unit_written_by_hand_is_neither_overwritten_nor_removed(self):
        mine = self.write("etc/systemd/system/cares-worker.service", "[Service]\nExecStart=/opt/cares/run\n")
        with self.assertRaises(cares.ServiceError):
            self.install(token="t")
        with self.assertRaises(cares.ServiceError):
            cares.uninstall_service("worker", paths=self.system)
        with open(mine) as file:
            self.assertEqual(file.read(), "[Service]\nExecStart=/opt/cares/run\n")
        self.assertFalse(os.path.exists(self.disk(self.system.pyz)))

    def test_uninstall_stops_and_disables_first_when_systemd_runs(self):
        self.install(token="t")
        runner = FakeSystemctl()
        report = cares.uninstall_service("worker", paths=self.system, runner=runner, booted=True)
        self.assertEqual(runner.calls, [["systemctl", "disable", "--now", "cares-worker.service"],
                                        ["systemctl", "daemon-reload"]])
        self.assertTrue(report.ok)
        self.install(token="t")
        runner = FakeSystemctl(fail={"disable"})
        report = cares.uninstall_service("worker", paths=self.system, runner=runner, booted=True)
        self.assertFalse(report.ok)
        self.assertTrue(os.path.exists(self.disk(self.system.unit_file("worker"))))  # nothing removed
        report = cares.uninstall_service("worker", paths=self.system, runner=runner, booted=True, stop=False)
        self.assertTrue(report.ok)
        self.assertFalse(os.path.exists(self.disk(self.system.unit_file("worker"))))

    def test_now_runs_systemctl_and_says_when_it_is_missing(self):
        runner = FakeSystemctl()
        self.assertTrue(self.install(now=True, runner=runner).ok)
        self.assertEqual(runner.calls, [["systemctl", "daemon-reload"],
                                        ["systemctl", "enable", "--now", "cares-worker.service"]])
        runner = FakeSystemctl()
        self.install(args=cares.worker_exec_args("10.0.0.6:50051"), now=True, runner=runner)
        self.assertEqual(runner.calls[-1], ["systemctl", "restart", "cares-worker.service"])
        report = self.install(args=cares.worker_exec_args("10.0.0.7:50051"), now=True, runner=FakeSystemctl(missing=True))
        self.assertFalse(report.ok)
        self.assertIn("cannot run systemctl: it is not installed (is this host running systemd?)", report.lines)
        report = self.install(args=cares.worker_exec_args("10.0.0.8:50051"), now=True,
                              runner=FakeSystemctl(fail={"enable"}))
        self.assertFalse(report.ok)
        self.assertIn("ran: systemctl enable cares-worker.service (exit code 1)", report.lines)  # an update

    def test_a_user_install(self):
        before = snapshot(self.root)
        runner = FakeSystemctl()
        report = self.install(paths=self.user, token="t", tls_files={"--tls-ca": self.pyz}, now=True, runner=runner)
        unit = self.read("/home/alice/.config/systemd/user/cares-worker.service")
        self.assertEqual(stat.S_IMODE(os.stat(self.disk("/home/alice/.config/cares/worker.env")).st_mode), 0o600)
        self.assertTrue(os.path.exists(self.disk("/home/alice/.local/lib/cares/cares.pyz")))
        self.assertIn("WantedBy=default.target\n", unit)
        self.assertIn(f"--tls-ca {self.pyz}", unit)
        for absent in ("After=network-online.target", "DynamicUser", "ProtectSystem", "LoadCredential"):
            self.assertNotIn(absent, unit)
        self.assertIn(["systemctl", "--user", "enable", "--now", "cares-worker.service"], runner.calls)
        self.assertTrue(any("loginctl enable-linger" in line for line in report.lines))
        cares.uninstall_service("worker", paths=self.user)
        self.assertEqual(snapshot(self.root), before)

    def test_user_paths_follow_xdg_config_home(self):
        paths = cares.ServicePaths.for_user(home="/home/bob", environ={"XDG_CONFIG_HOME": "/srv/cfg"})
        self.assertEqual((paths.unit_dir, paths.config_dir, paths.pyz),
                         ("/srv/cfg/systemd/user", "/srv/cfg/cares", "/home/bob/.local/lib/cares/cares.pyz"))
        paths = cares.ServicePaths.for_user(home="/home/bob", environ={"XDG_CONFIG_HOME": "relative"})
        self.assertEqual(paths.unit_dir, "/home/bob/.config/systemd/user")

    def test_inputs_that_would_give_a_unit_that_cannot_start_are_refused(self):
        not_a_zip = self.write("notes.txt", "hello")
        cases = [dict(python="/root/.pyenv/versions/3.12.1/bin/python3"), dict(python="python3"),
                 dict(pyz_source=not_a_zip), dict(pyz_source=None), dict(tls_files={"--tls-ca": "/no/such/ca.pem"}),
                 dict(args=cares.worker_exec_args("10.0.0.5:50051", labels=["bad=new\nline"]))]
        for case in cases:
            with self.subTest(case=case):
                options = dict(python=host_python(), pyz_source=self.pyz)
                options.update(case)
                args = options.pop("args", cares.worker_exec_args("10.0.0.5:50051"))
                with self.assertRaises(cares.ServiceError) as caught:
                    cares.install_service("worker", args, paths=self.system, **options)
                self.assertNotIn("\n", str(caught.exception))
        self.assertFalse(os.path.exists(self.disk(self.system.unit_file("worker"))))

    def test_a_low_port_gets_exactly_the_bind_capability(self):
        self.install("orchestrator", args=cares.orchestrator_exec_args("0.0.0.0:443"), privileged_port=True)
        unit = self.read(self.system.unit_file("orchestrator"))
        self.assertIn("CapabilityBoundingSet=CAP_NET_BIND_SERVICE\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n", unit)
        self.install("orchestrator")
        self.assertIn("CapabilityBoundingSet=\nAmbientCapabilities=\n", self.read(self.system.unit_file("orchestrator")))


class ServiceCommandLineTest(TempRoot):
    def run_cli(self, argv, environ=None, paths=None):
        args = cares.build_parser().parse_args(argv)
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            code = cares.run_service_command(args, environ=environ or {}, runner=FakeSystemctl(),
                                           paths=paths or self.system)
        return code, output.getvalue()

    def test_install_and_uninstall_from_the_command_line(self):
        token_file = self.write("token", TOKEN + "\n")
        code, output = self.run_cli(["install-service", "worker", "10.0.0.5:50051", "--node-id", "web-1",
                                     "--label", "env=prod", "--token-file", token_file, "--pyz", self.pyz,
                                     "--python", host_python()])
        self.assertEqual(code, 0)
        self.assertIn("installed cares-worker.service (system unit):", output)
        self.assertIn("--node-id web-1 --label env=prod", self.read(self.system.unit_file("worker")))
        code, output = self.run_cli(["uninstall-service", "worker"])
        self.assertEqual(code, 0)
        self.assertIn("removed /etc/systemd/system/cares-worker.service", output)

    def test_the_token_can_come_from_the_environment(self):
        self.run_cli(["install-service", "orchestrator", "--listen", "[::]:50051", "--metrics-listen",
                      "127.0.0.1:9100", "--pyz", self.pyz, "--python", host_python()], environ={"CARES_TOKEN": "env-t"})
        self.assertIn('CARES_TOKEN="env-t"', self.read("/etc/cares/orchestrator.env"))
        self.assertIn("--metrics-listen 127.0.0.1:9100", self.read(self.system.unit_file("orchestrator")))

    def test_a_user_unit_cannot_listen_below_1024(self):
        with self.assertRaises(cares.ServiceError) as caught:
            self.run_cli(["install-service", "orchestrator", "--listen", "[::]:443", "--user", "--pyz", self.pyz],
                         paths=self.user)
        self.assertTrue(caught.exception.usage)

    def test_tls_cert_and_key_go_together(self):
        with self.assertRaises(cares.ServiceError):
            self.run_cli(["install-service", "orchestrator", "--tls-cert", self.pyz, "--pyz", self.pyz])


# -- small pure helpers ---------------------------------------------------------------------------

class ServiceHelperTest(unittest.TestCase):
    def test_exec_word(self):
        cases = {"plain": "plain", "10.0.0.5:50051": "10.0.0.5:50051", "[::]:50051": "[::]:50051",
                 "a b": '"a b"', "50%": "50%%", "$HOME": "$$HOME", 'q"t': '"q\\"t"', "it's": '"it\'s"',
                 "b\\s": '"b\\\\s"', ";": "\\;", "": '""', "ü": "ü"}
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(cares.exec_word(text), expected)
        for bad in ("new\nline", "tab\there", "nul\0", "line\u2028sep"):
            with self.assertRaises(cares.ServiceError):
                cares.exec_word(bad)

    def test_read_token_file(self):
        with tempfile.TemporaryDirectory() as directory:
            def token_in(data: bytes) -> str:
                path = os.path.join(directory, "token")
                with open(path, "wb") as file:
                    file.write(data)
                return cares.read_token_file(path)

            self.assertEqual(token_in(b"abc\n"), "abc")
            self.assertEqual(token_in(b"abc\r\n"), "abc")
            self.assertEqual(token_in(b"a b$c"), "a b$c")
            for bad in (b"", b"\n", b"abc \n", b" abc", b"two\nlines\n", b"\xff\xfe", b"x" * 300, b"tab\tx"):
                with self.subTest(bad=bad), self.assertRaises(cares.ServiceError):
                    token_in(bad)
            with self.assertRaises(cares.ServiceError) as caught:
                cares.read_token_file(os.path.join(directory, "missing"))
            self.assertFalse(caught.exception.usage)
        self.assertEqual(cares.read_token_file("-", stdin=io.StringIO("from-stdin\n")), "from-stdin")

    def test_address_port_and_port_limit(self):
        self.assertEqual(cares.address_port("[::]:443"), 443)
        self.assertEqual(cares.address_port("0.0.0.0:50051"), 50051)
        self.assertIsNone(cares.address_port("nonsense"))
        self.assertEqual(cares.unprivileged_port_start(lambda path: io.StringIO("80\n")), 80)
        self.assertEqual(cares.unprivileged_port_start(lambda path: io.StringIO("junk")), 1024)

    def test_running_pyz_is_none_outside_a_zipapp(self):
        self.assertIsNone(cares.running_pyz())


class JournaldTest(unittest.TestCase):
    def test_under_journald_only_when_stderr_is_that_stream(self):
        with tempfile.TemporaryFile() as stream:
            info = os.fstat(stream.fileno())
            here = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
            self.assertTrue(cares.under_journald(here, stream.fileno()))
            with tempfile.TemporaryFile() as other:  # inherited variable, redirected stderr
                self.assertFalse(cares.under_journald(here, other.fileno()))
            for environ in ({}, {"JOURNAL_STREAM": "junk"}, {"JOURNAL_STREAM": "1:"}):
                self.assertFalse(cares.under_journald(environ, stream.fileno()))



class ServiceProcessTest(ClusterTestCase):
    """cares itself as systemd runs it: notify socket and watchdog in the environment, stderr
    being the journal stream."""

    def notify_socket(self):
        folder = tempfile.mkdtemp(prefix="cares-test-notify-")
        self.addCleanup(shutil.rmtree, folder, True)
        receiver = NotifyReceiver(os.path.join(folder, "notify"))
        self.addCleanup(receiver.close)
        return receiver, os.path.join(folder, "notify")

    def messages_until(self, receiver, wanted, timeout=15):
        """Every message received until one contains wanted: (list of (text, pid))."""
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                got.append(receiver.receive())
            except socket.timeout:
                continue
            if wanted in got[-1][0]:
                return got
        self.fail(f"{wanted!r} never arrived; got {got}")

    def test_ready_status_watchdog_and_stopping_from_a_worker_and_an_orchestrator(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        started = []
        for args, status in ((["worker", f"127.0.0.1:{orchestrator.port}", "--node-id", "unit", "--headless"],
                              f"STATUS=connected to 127.0.0.1:{orchestrator.port}"),
                             (["orchestrator", "--listen", "127.0.0.1:0", "--headless", "--no-state"],
                              "nodes active")):  # both start at once, each with its own socket
            receiver, path = self.notify_socket()
            process = self.spawn(*args, env={**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
            started.append((args, status, receiver, process))
        for args, status, receiver, process in started:
            with self.subTest(args[0]):
                got = self.messages_until(receiver, "READY=1")
                self.assertTrue(all(pid == process.pid for _, pid in got), (got, process.pid))
                self.messages_until(receiver, status)
                self.messages_until(receiver, "WATCHDOG=1")  # every WATCHDOG_USEC / 2, from the gRPC loop
                process.terminate()
                self.messages_until(receiver, "STOPPING=1")
                self.assertEqual(process.wait(10), 0)

    def test_log_lines_into_the_journal_carry_priorities_and_no_time(self):
        folder = tempfile.mkdtemp(prefix="cares-test-journal-")
        self.addCleanup(shutil.rmtree, folder, True)
        path = os.path.join(folder, "journal")
        with open(path, "w") as journal:
            info = os.fstat(journal.fileno())
            process = self.spawn("orchestrator", "--listen", "127.0.0.1:0", "--headless", "--no-state", stderr=journal,
                                 env={**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"})
            self.assertIsNotNone(wait_until(lambda: "Open cluster" in file_text(path), 15))
            process.terminate()
            self.assertEqual(process.wait(10), 0)
        lines = file_text(path).splitlines()
        self.assertRegex(lines[0], r"^<6>Orchestrator listening on 127\.0\.0\.1:\d+\.$")
        self.assertIn("<4>Open cluster: anyone who can reach this port can join (set --token or CARES_TOKEN).", lines)
        self.assertFalse([line for line in lines if not re.match(r"^<[346]>\S", line)], lines)


# ---------------------------------------------------------------------------
# 4b. Prometheus: the exposition checked by promtool, /metrics and /sd over
# HTTP(S) against hostile clients, and a real Prometheus server end to end.
# ---------------------------------------------------------------------------

TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def need_tool(name: str) -> str:
    """The tool's path; without it the test skips, or fails in CI (where it must be installed)."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            raise AssertionError(f"{name} is not installed (CI installs it: apt-get install prometheus openssl)")
        raise unittest.SkipTest(f"{name} is not installed")
    return path


# -- registry snapshots built by hand ------------------------------------------------

def full_sample(seed: int = 0) -> cares.Metrics:
    """A sample with every field, as a current worker sends it."""
    return cares.Metrics(cpu_percent=12.5 + seed % 80, memory_percent=41.25, memory_used_bytes=3.5e9 + seed,
                         memory_total_bytes=8589934592.0, swap_percent=0.0, load_average_1m=0.52,
                         load_average_5m=0.4, load_average_15m=0.31, boot_time_unix_s=1764300000.0,
                         root_fs_used_percent=57.3, root_fs_size_bytes=105089261568.0, disk_read_bytes_per_s=0.0,
                         disk_write_bytes_per_s=123456.5, net_receive_bytes_per_s=2048.0,
                         net_transmit_bytes_per_s=1024.25)


_FULL = object()


def FakeNode(node_id, hostname="host", labels=None, status=cares.NodeStatus.ACTIVE, address="10.0.0.5:41234",
             platform="Linux-6.1-x86_64", version="0.3.0", cpu_count=8, memory_total_bytes=8589934592,
             joined_at=1764300100.25, last_seen=1764300200.5, sample=_FULL):
    """A registry Node as a snapshot holds it."""
    return cares.Node(node_id, address=address, hostname=hostname, labels=labels or {}, platform=platform,
                      version=version, cpu_count=cpu_count, memory_total_bytes=memory_total_bytes, status=status,
                      joined_at=joined_at, last_seen=last_seen, metrics=full_sample() if sample is _FULL else sample)


def FakeCounters(heartbeats_received=0, samples_dropped=0, joins=0, joins_refused=None):
    """The counters as Orchestrator.metrics_snapshot gives them."""
    return {"heartbeats_received": heartbeats_received, "samples_dropped": samples_dropped, "joins": joins,
            "joins_refused": joins_refused or {}}


def make_nodes(count: int, labels: bool = True) -> list:
    """count realistic Active nodes with three labels each, as a bench cluster has."""
    return [FakeNode(f"worker-{i:05d}.example", hostname=f"host-{i:05d}.dc1.example.com",
                     labels={"rack": f"r{i % 40}", "zone": "eu-west-1a", "role": "batch"} if labels else {},
                     address=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:{40000 + i % 20000}", sample=full_sample(i))
            for i in range(count)]


def realistic_cluster() -> tuple:
    nodes = [
        FakeNode("web-1", hostname="web-1.example.com", labels={"role": "web", "topology.zone": "a"}),
        FakeNode("db-1", hostname="db-1", address="[2001:db8::5]:50000", labels={"role": "db"}),
        # An old worker: the first release's four fields only.
        FakeNode("old-1", hostname="old", address="[::ffff:192.0.2.7]:4000",
                 sample=cares.Metrics(cpu_percent=5.0, memory_percent=10.0, memory_used_bytes=1e9,
                                      memory_total_bytes=1e10)),
        FakeNode("new-1", hostname="new", status=cares.NodeStatus.JOINING, sample=None, last_seen=0.0,
                 memory_total_bytes=0, cpu_count=0),
        FakeNode("gone-1", hostname="gone", status=cares.NodeStatus.DISCONNECTED),
        FakeNode("ghost-1", hostname="ghost", status=cares.NodeStatus.MISSING, sample=None, last_seen=0.0),
    ]
    counters = FakeCounters(heartbeats_received=123456, samples_dropped=7, joins=9,
                            joins_refused={"wrong_token": 3, "cluster_full": 1, "invalid_node_id": 2})
    return nodes, counters


HOSTILE_HOSTNAMES = (
    'evil"host\\name\nsecond line} 1\n# HELP fake injected',
    "cr\rtab\there",
    "ünïcødé 主机 🚀 \u202eevil",
    "\\",
    '"',
    "",
    "trailing backslash\\",
)


def hostile_cluster() -> tuple:
    nodes = [FakeNode(f"n.{index}-x_y", hostname=hostname, address=f"192.0.2.{index + 1}:1",
                      platform='Linux "quoted" \\ back\nslash', version="0.3.0\n}",
                      labels={"a.b": 'x"y', "a-b": "back\\slash\n", "a_b": "plain", "a_b_2": "taken",
                              "node_id": "fake", "hostname": "fake2", "__name__": "boom", "le": "+Inf",
                              "9lives": "ünï 🚀"})
             for index, hostname in enumerate(HOSTILE_HOSTNAMES)]
    counters = {"heartbeats_received": 1, "samples_dropped": 0, "joins": 7,
                "joins_refused": {'we"ird\\reason\n': 1, "wrong_token": 2}}
    return nodes, counters


# -- a strict reader of the text format, to check what promtool cannot (round trips, duplicates) --

_SAMPLE_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}


def parse_exposition(text: str) -> tuple:
    """(families {name: (help, type)}, samples [(name, {label: value}, value text)]); AssertionError
    on anything the format does not allow."""
    assert text.endswith("\n"), "the page must end with a line feed"
    families, samples = {}, []
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            families.setdefault(name, [None, None])[0] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            families.setdefault(name, [None, None])[1] = kind
        else:
            samples.append(_parse_sample_line(line))
    return {name: tuple(value) for name, value in families.items()}, samples


def _parse_sample_line(line: str) -> tuple:
    name = _SAMPLE_NAME.match(line).group(0)
    rest, labels = line[len(name):], {}
    if rest.startswith("{"):
        position = 1
        while rest[position] != "}":
            label = _LABEL_NAME.match(rest, position)
            assert label, f"bad label name in {line!r}"
            position = label.end()
            assert rest[position:position + 2] == '="', f"expected =\" in {line!r}"
            position += 2
            value = []
            while rest[position] != '"':
                char = rest[position]
                assert char != "\n"
                if char == "\\":
                    position += 1
                    assert rest[position] in _UNESCAPE, f"bad escape in {line!r}"
                    char = _UNESCAPE[rest[position]]
                value.append(char)
                position += 1
            assert label.group(0) not in labels, f"repeated label name in {line!r}"
            labels[label.group(0)] = "".join(value)
            position += 1
            if rest[position] == ",":
                position += 1
        rest = rest[position + 1:]
    assert rest.startswith(" "), f"no value in {line!r}"
    value = rest[1:]
    float(value.replace("Inf", "inf"))
    return name, labels, value


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("promtool"), "check", "metrics"], input=text.encode("utf-8", "replace"),
                          capture_output=True, timeout=30)


# -- rendering ---------------------------------------------------------------------

class MetricsTextFormatTest(unittest.TestCase):

    def test_label_values_escape_backslash_quote_and_line_feed_only(self):
        self.assertEqual(cares.escape_label_value('a\\b"c\nd'), 'a\\\\b\\"c\\nd')
        self.assertEqual(cares.escape_label_value("cr\rtab\t🚀"), "cr\rtab\t🚀")
        self.assertEqual(cares.escape_label_value("\\n"), "\\\\n")  # a literal backslash-n stays two characters

    def test_sample_values_read_back_as_the_same_float(self):
        for value in (0.0, 12.5, 8589934592.0, 1764300200.5, 1e-7, 1.5e300, 0.1 + 0.2):
            self.assertEqual(float(cares.format_sample_value(value)), value)
        self.assertEqual(cares.format_sample_value(3), "3")
        self.assertEqual(cares.format_sample_value(float("nan")), "NaN")
        self.assertEqual(cares.format_sample_value(float("inf")), "+Inf")
        self.assertEqual(cares.format_sample_value(float("-inf")), "-Inf")

    def test_node_label_names_are_valid_prefixed_and_unique(self):
        names = cares.node_label_names(tuple(sorted(["a.b", "a-b", "a_b", "a_b_2", "node_id", "9lives", "__name__"])))
        self.assertEqual(names["a_b"], "label_a_b")  # keys that are valid as they are keep their name
        self.assertEqual(names["a_b_2"], "label_a_b_2")
        self.assertEqual(names["node_id"], "label_node_id")
        self.assertEqual({names["a-b"], names["a.b"]}, {"label_a_b_3", "label_a_b_4"})
        self.assertEqual(len(set(names.values())), len(names))
        for name in names.values():
            self.assertRegex(name, r"^label_[a-zA-Z0-9_]*$")

    def test_every_family_has_help_and_type_in_a_fixed_order(self):
        nodes, counters = realistic_cluster()
        families, _ = parse_exposition(cares.render_metrics(nodes, counters, "0.3.0"))
        empty, _ = parse_exposition(cares.render_metrics([], FakeCounters(), "0.3.0"))
        self.assertEqual(list(families), list(empty), "the page's shape must not depend on the cluster")
        expected = (["cares_node_up", "cares_node_info", "cares_node_joined_timestamp_seconds",
                     "cares_node_last_seen_timestamp_seconds", "cares_node_cpus", "cares_node_memory_total_bytes"]
                    + [name for _, name, _ in cares.SAMPLE_GAUGES]
                    + ["cares_nodes", "cares_heartbeats_received_total", "cares_samples_dropped_total",
                       "cares_joins_total", "cares_joins_refused_total", "cares_build_info"])
        self.assertEqual(list(families), expected)
        for name, (help_text, kind) in families.items():
            self.assertTrue(help_text, name)
            self.assertEqual(kind, "counter" if name.endswith("_total") else "gauge", name)

    def test_values_per_node(self):
        nodes, counters = realistic_cluster()
        _, samples = parse_exposition(cares.render_metrics(nodes, counters, "0.3.0"))
        by_node = {}
        for name, labels, value in samples:
            if "node_id" in labels:
                by_node.setdefault(labels["node_id"], {})[name] = value
        self.assertEqual({node: values["cares_node_up"] for node, values in by_node.items()},
                         {"web-1": "1", "db-1": "1", "old-1": "1", "new-1": "0", "gone-1": "0", "ghost-1": "0"})
        self.assertEqual(by_node["web-1"]["cares_node_cpu_percent"], "12.5")
        self.assertEqual(by_node["web-1"]["cares_node_load15"], "0.31")
        self.assertEqual(by_node["web-1"]["cares_node_memory_total_bytes"], "8589934592.0")
        self.assertEqual(by_node["web-1"]["cares_node_last_seen_timestamp_seconds"], "1764300200.5")
        # An old worker: what it did not send is absent, not 0.
        self.assertEqual(by_node["old-1"]["cares_node_memory_total_bytes"], "10000000000.0")
        self.assertNotIn("cares_node_load1", by_node["old-1"])
        self.assertNotIn("cares_node_swap_percent", by_node["old-1"])
        # No sample yet: no measurement, no last-seen time, no unknown memory or CPU count.
        self.assertEqual(set(by_node["new-1"]), {"cares_node_up", "cares_node_info",
                                                 "cares_node_joined_timestamp_seconds"})
        # Gone: its last sample is not exported as if current; when it was last seen is.
        self.assertNotIn("cares_node_cpu_percent", by_node["gone-1"])
        self.assertIn("cares_node_last_seen_timestamp_seconds", by_node["gone-1"])

    def test_node_labels_and_info(self):
        nodes, counters = realistic_cluster()
        _, samples = parse_exposition(cares.render_metrics(nodes, counters, "0.3.0"))
        up = next(labels for name, labels, _ in samples if name == "cares_node_up" and labels["node_id"] == "web-1")
        self.assertEqual(list(up), ["node_id", "hostname", "label_role", "label_topology_zone"])
        self.assertEqual(up["label_topology_zone"], "a")
        info = next(labels for name, labels, _ in samples if name == "cares_node_info" and labels["node_id"] == "db-1")
        self.assertEqual(info, {"node_id": "db-1", "hostname": "db-1", "label_role": "db",
                                "platform": "Linux-6.1-x86_64", "version": "0.3.0"})

    def test_cluster_families(self):
        nodes, counters = realistic_cluster()
        _, samples = parse_exposition(cares.render_metrics(nodes, counters, "1.2.3"))
        values = {(name, tuple(labels.items())): value for name, labels, value in samples if "node_id" not in labels}
        self.assertEqual(values[("cares_nodes", (("status", "Active"),))], "3")
        self.assertEqual(values[("cares_nodes", (("status", "Joining"),))], "1")
        self.assertEqual(values[("cares_nodes", (("status", "Disconnected"),))], "1")
        self.assertEqual(values[("cares_nodes", (("status", "Missing"),))], "1")
        self.assertEqual(values[("cares_heartbeats_received_total", ())], "123456")
        self.assertEqual(values[("cares_samples_dropped_total", ())], "7")
        self.assertEqual(values[("cares_joins_total", ())], "9")
        refused = [labels["reason"] for name, labels, _ in samples if name == "cares_joins_refused_total"]
        self.assertEqual(refused, ["cluster_full", "invalid_node_id", "wrong_token"])
        self.assertEqual(values[("cares_build_info", (("version", "1.2.3"),))], "1")

    def test_output_is_stable_whatever_the_snapshot_order(self):
        nodes, counters = realistic_cluster()
        self.assertEqual(cares.render_metrics(nodes, counters, "0.3.0"),
                         cares.render_metrics(list(reversed(nodes)), counters, "0.3.0"))

    def test_hostile_text_round_trips_and_series_are_unique(self):
        nodes, counters = hostile_cluster()
        _, samples = parse_exposition(cares.render_metrics(nodes, counters, "0.3.0"))
        hostnames = {labels["hostname"] for name, labels, _ in samples if name == "cares_node_up"}
        self.assertEqual(hostnames, set(HOSTILE_HOSTNAMES))
        info = next(labels for name, labels, _ in samples if name == "cares_node_info")
        self.assertEqual(info["platform"], 'Linux "quoted" \\ back\nslash')
        self.assertEqual(info["label_a_b"], "plain")
        self.assertEqual(info["label_a_b_2"], "taken")
        self.assertEqual({info["label_a_b_3"], info["label_a_b_4"]}, {'x"y', "back\\slash\n"})
        self.assertEqual(info["label_node_id"], "fake")
        series = [(name, tuple(sorted(labels.items()))) for name, labels, _ in samples]
        self.assertEqual(len(series), len(set(series)), "a series appears twice")

    def test_unencodable_text_does_not_break_the_page(self):
        node = FakeNode("lone", hostname="surrogate \ud800 here")
        page = cares.render_metrics([node], FakeCounters(), "0.3.0").encode("utf-8", "replace")
        parse_exposition(page.decode("utf-8"))


class PromtoolTest(unittest.TestCase):

    def assert_promtool_accepts(self, text: str):
        result = promtool_check_metrics(text)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, b""))

    def test_realistic_page(self):
        self.assert_promtool_accepts(cares.render_metrics(*realistic_cluster(), "0.3.0"))

    def test_empty_cluster(self):
        self.assert_promtool_accepts(cares.render_metrics([], {}, "0.3.0"))

    def test_hostile_ids_hostnames_and_labels(self):
        self.assert_promtool_accepts(cares.render_metrics(*hostile_cluster(), "0.3.0\"\\\n"))

    def test_promtool_does_reject_what_we_escape(self):
        """The check above means something: promtool refuses an unescaped line feed."""
        result = promtool_check_metrics('# HELP a x\n# TYPE a gauge\na{b="x\ny"} 1\n')
        self.assertNotEqual(result.returncode, 0)


class ServiceDiscoveryTest(unittest.TestCase):

    def test_active_workers_only_hosts_with_the_port(self):
        nodes, _ = realistic_cluster()
        self.assertEqual(cares.sd_targets(nodes, 9100), [
            {"targets": ["[2001:db8::5]:9100"], "labels": {"cares_node_id": "db-1", "cares_hostname": "db-1"}},
            {"targets": ["192.0.2.7:9100"], "labels": {"cares_node_id": "old-1", "cares_hostname": "old"}},
            {"targets": ["10.0.0.5:9100"], "labels": {"cares_node_id": "web-1", "cares_hostname": "web-1.example.com"}},
        ])

    def test_empty_list_without_active_workers(self):
        self.assertEqual(cares.sd_targets([], 9100), [])
        self.assertEqual(cares.sd_targets([FakeNode("x", status=cares.NodeStatus.DISCONNECTED)], 9100), [])
        self.assertEqual(cares.sd_targets([FakeNode("x", address="")], 9100), [])

    def test_hosts(self):
        self.assertEqual(cares.sd_host("10.1.2.3:5"), "10.1.2.3")
        self.assertEqual(cares.sd_host("[fe80::1%eth0]:5"), "fe80::1%eth0")
        self.assertEqual(cares.sd_host("[::ffff:10.1.2.3]:5"), "10.1.2.3")
        self.assertEqual(cares.sd_host("worker.example:5"), "worker.example")

    def test_json_chunks_make_one_array(self):
        for count in (0, 1, cares.RENDER_BLOCK, cares.RENDER_BLOCK * 2 + 1):
            nodes = make_nodes(count)
            nodes[0:1] = [dataclasses.replace(nodes[0], hostname='q"\\\n🚀')] if count else []
            page = b"".join(cares.render_sd_chunks(nodes, 9100))
            self.assertEqual(json.loads(page), cares.sd_targets(nodes, 9100), count)

    def test_port_parameter(self):
        self.assertEqual(cares.parse_sd_port("", 9100), 9100)
        self.assertEqual(cares.parse_sd_port("port=9200", 9100), 9200)
        for bad in ("port=0", "port=65536", "port=x", "port=", "port=1&port=2", "port=%D9%A3"):
            with self.assertRaises(ValueError, msg=bad):
                cares.parse_sd_port(bad, 9100)


class MetricsRequestPartsTest(unittest.TestCase):

    def test_parse_request_head(self):
        request = cares.parse_request_head(b"GET /sd?port=1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
                                        b"authorization: second\r\n\r\n")
        self.assertEqual((request.method, request.path, request.query), ("GET", "/sd", "port=1"))
        self.assertEqual(request.headers["authorization"], "Bearer t")
        for bad in (b"GET /\r\n\r\n", b"GET / HTTP/2\r\n\r\n", b"GET  / HTTP/1.1\r\n\r\n",
                    b"GET / HTTP/1.1\r\nno colon\r\n\r\n", b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n"):
            with self.assertRaises(ValueError, msg=bad):
                cares.parse_request_head(bad)

    def test_bearer_token(self):
        self.assertEqual(cares.bearer_token("Bearer abc"), "abc")
        self.assertEqual(cares.bearer_token("bearer  abc "), "abc")
        self.assertEqual(cares.bearer_token("Bearer \xff"), "\xff")
        for none in (None, "", "abc", "Basic abc", "Bearer"):
            self.assertEqual(cares.bearer_token(none), "", none)

    def test_accepts_gzip(self):
        self.assertTrue(cares.accepts_gzip("gzip"))
        self.assertTrue(cares.accepts_gzip("identity, GZIP;q=0.5"))
        self.assertFalse(cares.accepts_gzip("gzip;q=0"))
        self.assertFalse(cares.accepts_gzip("deflate"))
        self.assertFalse(cares.accepts_gzip(None))


# -- the live server ----------------------------------------------------------------

def request(server, method: str = "GET", path: str = "/metrics", headers: dict | None = None,
            context: ssl.SSLContext | None = None, timeout: float = 10, source: str = "127.0.0.1") -> tuple:
    """(status, headers, body) of one request to server, sent from the source address."""
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout,
                                                source_address=(source, 0))
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=timeout, context=context)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def start_server(test: unittest.TestCase, nodes_and_counters=None, **options) -> cares.MetricsServer:
    nodes, counters = nodes_and_counters or realistic_cluster()
    logged = []
    options.setdefault("log", lambda level, text: logged.append((level, text)))
    server = cares.MetricsServer("127.0.0.1", 0, lambda: (nodes, counters), "0.3.0", **options)
    server.start()
    server.logged = logged
    test.addCleanup(server.stop)
    return server


def make_certificate(folder: str) -> tuple:
    """A self-signed certificate for 127.0.0.1 (Go and Python both want the IP in subjectAltName)."""
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run([need_tool("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return cert, key


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple:
    """Bytes read until the peer closes (or resets), and how long that took; None if it never did."""
    started, data = time.monotonic(), b""
    sock.settimeout(0.2)
    while time.monotonic() - started < limit_s:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return data, time.monotonic() - started
        if not chunk:
            return data, time.monotonic() - started
        data += chunk
    return data, None


class MetricsHttpTest(unittest.TestCase):

    def setUp(self):
        self.server = start_server(self, token=TOKEN)

    def test_metrics_with_the_token(self):
        status, headers, body = request(self.server, headers=BEARER)
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/plain; version=0.0.4; charset=utf-8")
        self.assertEqual(body.decode(), cares.render_metrics(*realistic_cluster(), "0.3.0"))

    def test_large_pages_arrive_whole(self):
        nodes = make_nodes(4000)  # a 13 MB page
        server = start_server(self, (nodes, FakeCounters()), open_access=True)
        expected = cares.render_metrics(nodes, FakeCounters(), "0.3.0").encode()
        for _ in range(3):
            self.assertEqual(request(server)[2], expected)
        status, headers, body = request(server, headers={"Accept-Encoding": "gzip"})
        self.assertEqual(gzip.decompress(body), expected)

    def test_gzip_when_asked(self):
        status, headers, body = request(self.server, headers={**BEARER, "Accept-Encoding": "gzip"})
        self.assertEqual((status, headers["Content-Encoding"]), (200, "gzip"))
        self.assertEqual(gzip.decompress(body).decode(), cares.render_metrics(*realistic_cluster(), "0.3.0"))

    def test_without_or_with_a_wrong_token_401(self):
        for path, headers in (("/metrics", {}), ("/metrics", {"Authorization": "Bearer wrong"}),
                              ("/metrics", {"Authorization": f"Basic {TOKEN}"}), ("/sd", {"Authorization": TOKEN}),
                              ("/sd", {"Authorization": f"Bearer {TOKEN}x"})):
            status, response_headers, body = request(self.server, path=path, headers=headers)
            self.assertEqual(status, 401, (path, headers))
            self.assertTrue(response_headers["WWW-Authenticate"].startswith("Bearer"))
            self.assertNotIn(b"cares_", body)
        self.assertTrue(any("authorization.type: Bearer" in text for _, text in self.server.logged),
                        "a bare token is explained in the log")

    def test_guessing_the_token_locks_that_address_out(self):
        # Guesses sent together all count: the lockout cannot be outrun by asking in parallel.
        guesses = [threading.Thread(target=request, args=(self.server,),
                                    kwargs={"headers": {"Authorization": f"Bearer guess-{number}"}})
                   for number in range(cares.TOKEN_LOCKOUT_FAILURES)]
        for guess in guesses:
            guess.start()
        for guess in guesses:
            guess.join(30)
        status, headers, body = request(self.server, headers=BEARER)  # even the right token, for a while
        self.assertEqual((status, headers["Retry-After"]), (429, "60"))
        self.assertIn(b"too many wrong tokens from 127.0.0.1", body)
        self.assertEqual(request(self.server, headers=BEARER, source="127.0.0.2")[0], 200)  # other hosts scrape

    def test_other_paths_404_other_methods_405(self):
        for path in ("/", "/metrics/", "/metricsx", "/Metrics", "//metrics", "/sd/x", "/../metrics"):
            self.assertEqual(request(self.server, path=path, headers=BEARER)[0], 404, path)
        for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"):
            status, headers, _ = request(self.server, method, headers=BEARER)
            self.assertEqual((status, headers["Allow"]), (405, "GET, HEAD"), method)

    def test_head(self):
        status, headers, body = request(self.server, "HEAD", headers=BEARER)
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(int(headers["Content-Length"]),
                         len(cares.render_metrics(*realistic_cluster(), "0.3.0").encode()))

    def test_sd(self):
        status, headers, body = request(self.server, path="/sd", headers=BEARER)
        self.assertEqual((status, headers["Content-Type"]), (200, "application/json"))
        self.assertEqual(json.loads(body), cares.sd_targets(realistic_cluster()[0], 9100))
        status, _, body = request(self.server, path="/sd?port=9200", headers=BEARER)
        self.assertEqual({target for group in json.loads(body) for target in group["targets"]},
                         {"[2001:db8::5]:9200", "192.0.2.7:9200", "10.0.0.5:9200"})
        self.assertEqual(request(self.server, path="/sd?port=70000", headers=BEARER)[0], 400)

    def test_sd_empty_cluster(self):
        server = start_server(self, ([], {}), open_access=True)
        status, _, body = request(server, path="/sd")
        self.assertEqual((status, body), (200, b"[]"))

    def test_open_access(self):
        server = start_server(self, token=TOKEN, open_access=True)
        self.assertEqual(request(server)[0], 200)
        self.assertEqual(request(server, path="/sd")[0], 200)

    def test_malformed_requests_400(self):
        for raw in (b"GARBAGE\r\n\r\n", b"GET /metrics HTTP/9.9\r\n\r\n", b"\x16\x03\x01\x00\xff\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as sock:
                sock.sendall(raw)
                data, _ = read_until_closed(sock, 5)
                self.assertTrue(data.startswith(b"HTTP/1.1 400 "), (raw, data))

    def test_render_failure_is_500_and_logged(self):
        def broken():
            raise RuntimeError("registry on fire")
        logged = []
        server = cares.MetricsServer("127.0.0.1", 0, broken, "0.3.0", log=lambda *entry: logged.append(entry))
        server.start()
        self.addCleanup(server.stop)
        self.assertEqual(request(server)[0], 500)
        self.assertEqual(logged, [(cares.Level.ERROR, "/metrics could not be rendered: RuntimeError: registry on fire")])

    def test_too_many_requests_under_way_503(self):
        release = threading.Event()
        nodes, counters = realistic_cluster()

        def slow_snapshot():
            release.wait(10)
            return nodes, counters
        server = cares.MetricsServer("127.0.0.1", 0, slow_snapshot, "0.3.0")
        server.start()
        self.addCleanup(server.stop)
        with mock.patch.object(cares, "HTTP_MAX_BUSY", 1):
            first = threading.Thread(target=request, args=(server,))
            first.start()
            time.sleep(0.3)
            status, headers, _ = request(server)
            release.set()
            first.join(10)
        self.assertEqual((status, headers["Retry-After"]), (503, "1"))

    def test_port_in_use_is_a_one_line_start_error(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            server = cares.MetricsServer("127.0.0.1", taken.getsockname()[1], lambda: ([], {}), "0.3.0")
            with self.assertRaises(cares.StartError) as caught:
                server.start()
        self.assertIn("already in use", str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_stop_frees_the_port_and_the_thread(self):
        server = cares.MetricsServer("127.0.0.1", 0, lambda: ([], {}), "0.3.0")
        threads = threading.active_count()
        server.start()
        self.assertEqual(request(server)[0], 200)
        server.stop()
        server.stop()  # twice is fine
        self.assertLessEqual(threading.active_count(), threads + 1)  # the render thread may take a moment
        with socket.socket() as probe:
            self.assertNotEqual(probe.connect_ex(("127.0.0.1", server.port)), 0)

    def test_dual_stack_listen(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        server = cares.MetricsServer("::", 0, lambda: ([], {}), "0.3.0")
        try:
            server.start()
        except cares.StartError as error:
            self.skipTest(f"no IPv6 here: {error}")
        self.addCleanup(server.stop)
        self.assertEqual(request(server)[0], 200)  # 127.0.0.1 reaches a [::] listener


class MetricsHostileClientTest(unittest.TestCase):
    """Slow, oversized and idle clients are cut off, and never keep a scrape from being answered."""

    def setUp(self):
        self.server = start_server(self, token=TOKEN)

    def test_oversized_head_431(self):
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * cares.HTTP_HEAD_LIMIT + b"\r\n\r\n")
            data, elapsed = read_until_closed(sock, 5)
        self.assertTrue(data.startswith(b"HTTP/1.1 431 "), data)

    def test_slowloris_cut_off_at_the_deadline(self):
        with mock.patch.object(cares, "HTTP_HEAD_TIMEOUT_S", 1.0):
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as sock:
                started, closed = time.monotonic(), False
                for char in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100:  # one byte every 0.1 s
                    try:
                        sock.sendall(bytes([char]))
                    except (BrokenPipeError, ConnectionResetError):
                        closed = True
                        break
                    time.sleep(0.1)
                    if time.monotonic() - started > 4:
                        break
                data, _ = read_until_closed(sock, 3)
                elapsed = time.monotonic() - started
        self.assertTrue(closed or data.startswith(b"HTTP/1.1 408 "), data)
        self.assertLess(elapsed, 3.5, "a trickling client must not extend its deadline")

    def test_a_client_that_does_not_read_is_dropped(self):
        server = start_server(self, (make_nodes(4000), FakeCounters()), open_access=True)  # a ~13 MB page
        with mock.patch.object(cares, "HTTP_WRITE_TIMEOUT_S", 1.0):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            with sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(0.5)
                status, _, body = request(server, headers=BEARER, path="/sd")  # others are served meanwhile
                self.assertEqual(status, 200)
                # Past the write deadline the server gives up on it, and says so.
                self.assertIsNotNone(wait_until(lambda: any("too slow to read" in text for _, text in server.logged),
                                                10), server.logged)
                data, elapsed = read_until_closed(sock, 5)
        self.assertIsNotNone(elapsed, "the server should have closed the connection")
        length = int(re.search(rb"Content-Length: (\d+)", data).group(1))
        self.assertLess(len(data.partition(b"\r\n\r\n")[2]), length)

    def test_many_idle_sockets_do_not_stop_a_scrape_nor_add_threads(self):
        count = 1000
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < count + 500:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 1000), hard))
        self.assertEqual(request(self.server, headers=BEARER)[0], 200)  # the render thread exists now
        threads = threading.active_count()
        idle = []
        try:
            opening = time.monotonic()
            for index in range(count):
                sock = socket.create_connection(("127.0.0.1", self.server.port), timeout=5)
                idle.append(sock)
                if index % 2:
                    with contextlib.suppress(OSError):
                        sock.send(b"GET /metrics HTTP/1.1\r\n")  # a head that never ends
            # A burst this size fits the listen backlog: no connection waits for a SYN to be resent (1 s).
            self.assertLess(time.monotonic() - opening, 3.0)
            time.sleep(0.5)
            started = time.monotonic()
            status, _, body = request(self.server, headers=BEARER, timeout=5)
            elapsed = time.monotonic() - started
            # No thread per connection (the count may drop: earlier tests' render threads wind down).
            self.assertLessEqual(threading.active_count(), threads)
        finally:
            for sock in idle:
                sock.close()
        self.assertEqual(status, 200)
        self.assertLess(elapsed, 2.0)
        self.assertTrue(any("too many open connections" in text for _, text in self.server.logged))


class MetricsTlsTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.folder = tempfile.mkdtemp(prefix="cares-prom-tls-")
        cls.addClassCleanup(shutil.rmtree, cls.folder, True)  # also when making the certificate fails
        cls.cert, cls.key = make_certificate(cls.folder)
        cls.context = ssl.create_default_context(cafile=cls.cert)

    def test_https_with_the_same_certificate(self):
        server = start_server(self, token=TOKEN, tls_cert=self.cert, tls_key=self.key)
        self.assertEqual(server.scheme, "https")
        status, headers, body = request(server, headers=BEARER, context=self.context)
        self.assertEqual((status, headers["Content-Type"]), (200, cares.METRICS_CONTENT_TYPE))
        self.assertEqual(request(server, path="/sd", headers=BEARER, context=self.context)[0], 200)
        self.assertEqual(request(server, context=self.context)[0], 401)
        with self.assertRaises((http.client.HTTPException, ConnectionError)):
            request(server, headers=BEARER)  # plain HTTP to the TLS port gets no page

    def test_idle_tcp_without_a_handshake_does_not_stop_a_scrape(self):
        server = start_server(self, token=TOKEN, tls_cert=self.cert, tls_key=self.key)
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
        try:
            started = time.monotonic()
            self.assertEqual(request(server, headers=BEARER, context=self.context)[0], 200)
            self.assertLess(time.monotonic() - started, 2.0)
        finally:
            for sock in idle:
                sock.close()

    def test_unusable_certificate_is_a_one_line_start_error(self):
        for cert, key in ((os.path.join(self.folder, "missing.pem"), self.key), (self.key, self.key)):
            server = cares.MetricsServer("127.0.0.1", 0, lambda: ([], {}), "0.3.0", tls_cert=cert, tls_key=key)
            with self.assertRaises(cares.StartError) as caught:
                server.start()
            self.assertNotIn("\n", str(caught.exception))


_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import cares
calls = []
def snapshot():
    calls.append(1)
    if len(calls) % 2 == 0:
        raise RuntimeError("every other render fails")
    return [], {}
tls = sys.argv[2:4] if len(sys.argv) > 3 else (None, None)
server = cares.MetricsServer("127.0.0.1", 0, snapshot, "0.3.0", token="t", tls_cert=tls[0], tls_key=tls[1])
server.start()
print(server.port, flush=True)
sys.stdin.read()
server.stop()
print("stopped", flush=True)
"""


class MetricsNoTracebackTest(unittest.TestCase):
    """Whatever clients do, the server writes nothing to stderr (the orchestrator's screen)."""

    def run_child(self, *tls) -> tuple:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, BYTECODE, *tls], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: child.poll() is None and child.kill())
        port = int(child.stdout.readline())
        return child, port

    def abuse(self, port: int) -> None:
        for raw in (b"\x00\xff" * 100 + b"\r\n\r\n", b"GET /metrics HTTP/1.1\r\n\r\n",
                    b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer t\r\n\r\n" * 3,
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(300), b"G"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                with contextlib.suppress(OSError):
                    sock.sendall(raw)
                    time.sleep(0.05)  # then reset the connection mid-answer

    def finish(self, child) -> None:
        out, err = child.communicate(b"", timeout=15)
        self.assertEqual(err, b"")
        self.assertTrue(out.endswith(b"stopped\n"), out)

    def test_plain(self):
        child, port = self.run_child()
        self.abuse(port)
        for _ in range(2):
            with contextlib.suppress(Exception):
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                                              headers={"Authorization": "Bearer t"}), timeout=5)
        self.finish(child)

    def test_stop_during_a_render(self):
        started, release = threading.Event(), threading.Event()

        def slow_snapshot():
            started.set()
            release.wait(5)
            return realistic_cluster()
        server = cares.MetricsServer("127.0.0.1", 0, slow_snapshot, "0.3.0")
        server.start()
        captured = io.StringIO()
        with contextlib.redirect_stderr(captured):
            def scrape():
                with contextlib.suppress(Exception):  # the connection is dropped: that is expected
                    request(server)
            client = threading.Thread(target=scrape)
            client.start()
            started.wait(5)
            server.stop()
            release.set()
            client.join(10)
            time.sleep(0.3)  # the render thread finishes after the loop is gone
        self.assertEqual(captured.getvalue(), "")

    def test_tls(self):
        folder = tempfile.mkdtemp(prefix="cares-prom-tls-")
        self.addCleanup(shutil.rmtree, folder, True)
        cert, key = make_certificate(folder)
        child, port = self.run_child(cert, key)
        self.abuse(port)
        context = ssl.create_default_context(cafile=cert)
        with contextlib.suppress(Exception):
            urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=5, context=context)
        with contextlib.suppress(Exception):  # a client that distrusts the certificate
            urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=5)
        self.finish(child)


# -- the real thing: Prometheus scraping and discovering -------------------------------

PROMETHEUS_YML = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: cares
    scheme: https
    tls_config: {{ca_file: cert.pem}}
    authorization: {{credentials_file: token}}
    static_configs: [{{targets: ["{metrics}"]}}]
  - job_name: cares-nodes
    http_sd_configs:
      - url: https://{metrics}/sd?port={node_port}
        refresh_interval: 1s
        tls_config: {{ca_file: cert.pem}}
        authorization: {{type: Bearer, credentials_file: token}}
"""


class PrometheusEndToEndTest(unittest.TestCase):
    """A real Prometheus scrapes /metrics over HTTPS every second and discovers workers through /sd."""

    def setUp(self):
        self.prometheus = need_tool("prometheus")
        self.folder = tempfile.mkdtemp(prefix="cares-prom-e2e-")
        self.addCleanup(shutil.rmtree, self.folder, True)
        cert, key = make_certificate(self.folder)
        with open(os.path.join(self.folder, "token"), "w") as file:
            file.write(TOKEN)
        with open(cert, "rb") as cert_file, open(key, "rb") as key_file:
            cert_pem, key_pem = cert_file.read(), key_file.read()
        self.orchestrator = cares.Orchestrator("127.0.0.1:0", token=TOKEN, tls_cert=cert_pem, tls_key=key_pem,
                                               heartbeat_ms=200, metrics_listen="127.0.0.1:0",
                                               tls_files=(cert, key))
        self.orchestrator.start()
        self.addCleanup(self.orchestrator.stop, 0.2)
        self.server = self.orchestrator.metrics
        self.node_port = free_port()  # nothing listens there: the discovered targets are down, but listed
        self.workers = {}
        for index in range(3):  # real worker processes, each with a label whose key needs renaming
            self.workers[f"worker-{index}"] = subprocess.Popen(
                [sys.executable, CARES_PY, "worker", f"127.0.0.1:{self.orchestrator.port}", "--node-id",
                 f"worker-{index}", "--label", f"rack.row=r{index}", "--tls-ca", cert, "--headless"],
                env={**os.environ, "CARES_TOKEN": TOKEN}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        for process in self.workers.values():
            self.addCleanup(process.wait, 10)
            self.addCleanup(process.kill)

    def start_prometheus(self) -> None:
        config = os.path.join(self.folder, "prometheus.yml")
        with open(config, "w") as file:
            file.write(PROMETHEUS_YML.format(metrics=f"127.0.0.1:{self.server.port}", node_port=self.node_port))
        self.api = f"http://127.0.0.1:{free_port()}"
        self.log_path = os.path.join(self.folder, "prometheus.log")
        log = open(self.log_path, "wb")
        self.addCleanup(log.close)
        process = subprocess.Popen([self.prometheus, f"--config.file={config}",
                                    f"--storage.tsdb.path={os.path.join(self.folder, 'data')}",
                                    f"--web.listen-address={self.api.removeprefix('http://')}",
                                    f"--web.console.templates={self.folder}", f"--web.console.libraries={self.folder}",
                                    "--storage.tsdb.retention.time=1h"],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.folder)

        def stop():
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.addCleanup(stop)

    def api_get(self, path: str, **query):
        url = f"{self.api}{path}" + ("?" + urllib.parse.urlencode(query) if query else "")
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.load(response)["data"]

    def wait_for(self, what: str, check, limit_s: float):
        """Poll check() every 0.1 s until it returns something true; fail after limit_s."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            try:
                result = check()
            except OSError:
                result = None
            if result:
                return result
            time.sleep(0.1)
        with open(self.log_path, errors="replace") as log:
            self.fail(f"{what}: not within {limit_s} s. Prometheus' log:\n{log.read()[-3000:]}")

    def up_values(self) -> dict:
        return {series["metric"]["node_id"]: series["value"][1]
                for series in self.api_get("/api/v1/query", query="cares_node_up")["result"]}

    def discovered(self) -> set:
        return {target["labels"].get("cares_node_id") for target in self.api_get("/api/v1/targets")["activeTargets"]
                if target["labels"]["job"] == "cares-nodes"}

    def test_scrape_discover_and_see_a_worker_go(self):
        self.start_prometheus()
        self.wait_for("Prometheus ready", lambda: urllib.request.urlopen(f"{self.api}/-/ready", timeout=1), 10)
        # Prometheus hands new targets to its scrapers at most every 5 s: the first scrape comes ~6 s in.
        self.wait_for("cares_node_up == 1 for the three workers",
                      lambda: self.up_values() == {"worker-0": "1", "worker-1": "1", "worker-2": "1"}, 20)
        self.assertEqual(self.wait_for("the three /sd targets", lambda: self.discovered() or None, 10),
                         {"worker-0", "worker-1", "worker-2"})
        targets = self.api_get("/api/v1/targets")["activeTargets"]
        scraped = next(target for target in targets if target["labels"]["job"] == "cares")
        self.assertEqual((scraped["health"], scraped["lastError"]), ("up", ""))
        addresses = {target["labels"]["instance"] for target in targets if target["labels"]["job"] == "cares-nodes"}
        self.assertEqual(addresses, {f"127.0.0.1:{self.node_port}"})
        series = self.api_get("/api/v1/query", query='cares_node_info{node_id="worker-0"}')["result"]
        self.assertEqual((series[0]["metric"]["label_rack_row"], series[0]["metric"]["version"]), ("r0", cares.VERSION))
        cpu = self.api_get("/api/v1/query", query='cares_node_cpu_percent{node_id="worker-2"}')["result"]
        self.assertTrue(0 <= float(cpu[0]["value"][1]) <= 100)

        self.workers["worker-1"].kill()  # a worker dies
        self.wait_for("worker-1's cares_node_up at 0", lambda: self.up_values().get("worker-1") == "0", 5)
        self.wait_for("worker-1 gone from the /sd targets", lambda: self.discovered() == {"worker-0", "worker-2"}, 10)
        with open(self.log_path, errors="replace") as log:
            complaints = [line for line in log if "level=error" in line or "level=warn" in line]
        self.assertEqual(complaints, [], "Prometheus complained")


class PrometheusConfigSnippetTest(unittest.TestCase):
    """The prometheus.yml and alert rule the README gives are valid for promtool."""

    def snippet(self, first_line: str) -> str:
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as notes:
            blocks = re.findall(r"```yaml\n(.*?)```", notes.read(), re.S)
        return next(block for block in blocks if block.startswith(first_line))

    def test_config_and_rules(self):
        promtool = need_tool("promtool")
        with tempfile.TemporaryDirectory() as folder:
            files = {"prometheus.yml": self.snippet("# prometheus.yml"),
                     "cares-alerts.yml": self.snippet("# cares-alerts.yml"),
                     "alert-test.yml": ALERT_TEST, "cares-ca.pem": "", "cares-token": ""}
            for name, text in files.items():
                with open(os.path.join(folder, name), "w") as file:
                    file.write(text)
            for command in (["check", "config", "prometheus.yml"], ["check", "rules", "cares-alerts.yml"],
                            ["test", "rules", "alert-test.yml"]):
                result = subprocess.run([promtool, *command], cwd=folder, capture_output=True, timeout=30)
                self.assertEqual(result.returncode, 0, (command, result.stdout + result.stderr))


# A node down for 30 s is pending; down for over a minute, the alert fires.
ALERT_TEST = """\
rule_files: [cares-alerts.yml]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - series: 'cares_node_up{job="cares",instance="orch:50052",node_id="w1",hostname="h1"}'
        values: '1 1 0x10'
      - series: 'cares_node_up{job="cares",instance="orch:50052",node_id="w2",hostname="h2"}'
        values: '1x12'
    alert_rule_test:
      - eval_time: 60s
        alertname: CaresNodeDown
        exp_alerts: []
      - eval_time: 2m
        alertname: CaresNodeDown
        exp_alerts:
          - exp_labels: {severity: warning, job: cares, instance: "orch:50052", node_id: w1, hostname: h1}
            exp_annotations:
              summary: "cares node w1 (h1) is not Active"
              description: "No accepted heartbeat from w1 for over a minute: it left, was lost or is still joining."
"""


# ---------------------------------------------------------------------------
# cares.pyz, the one file ops people copy (built by build_zipapp.sh)
# ---------------------------------------------------------------------------

class BuildToolsTest(unittest.TestCase):
    """pyz/build.py and pyz/bootstrap.py, function by function, without building a real pyz;
    and pyflakes over every Python file."""

    def tmpdir(self):
        path = tempfile.mkdtemp(prefix="cares-build-test-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    # -- lint --------------------------------------------------------------

    def test_every_python_file_passes_pyflakes(self):
        if importlib.util.find_spec("pyflakes") is None:
            msg = "pyflakes is not installed (it is pinned in requirements.txt)"
            if IN_CI:
                self.fail(msg)
            self.skipTest(msg)
        try:
            tracked = subprocess.run(["git", "ls-files", "-z", "--", "*.py"], cwd=HERE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, timeout=30, check=True).stdout.decode().split("\0")
        except (OSError, subprocess.SubprocessError):  # not a git checkout: the top-level .py files
            tracked = [os.path.basename(p) for p in glob.glob(os.path.join(HERE, "*.py"))]
        files = {f for f in tracked if f} | {os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "pyz", "*.py"))}
        # The gRPC stubs are generated by grpcio-tools (CI checks they match cluster.proto) and never
        # edited by hand, so a warning there is not ours to fix.
        files -= {"cluster_pb2.py", "cluster_pb2_grpc.py"}
        self.assertTrue({"cares.py", "test_cares.py", "pyz/build.py", "pyz/bootstrap.py"} <= files, files)
        r = subprocess.run([sys.executable, "-m", "pyflakes", *sorted(files)], cwd=HERE, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True, timeout=120)
        self.assertEqual((r.returncode, r.stdout), (0, ""), "pyflakes warnings:\n" + r.stdout)

    # -- pins --------------------------------------------------------------

    PINS = """# Run time
grpcio==1.85.1 ; python_version >= "3.10"
protobuf === 7.36.2; python_version>='3.10'  # a comment
psutil==7.2.2
asciimatics[extra] == 1.15.0
Typing.Extensions==4.16.0
wcwidth==0.9.4
pillow>=1
--only-binary :all:
grpcio-tools==1.85.1 ; python_version >= "3.10"
grpcio==1.80.1 ; python_version < "3.10"
protobuf==6.33.6 ; python_version < "3.10"
grpcio_tools==1.80.1 ; python_version >= "3.9" and python_version < "3.10"
"""

    def test_requirements_lines_and_markers(self):
        parsed = pyz_build.parse_requirements(self.PINS)
        self.assertEqual(parsed[:4], [("grpcio", "1.85.1", 'python_version >= "3.10"'),
                                      ("protobuf", "7.36.2", "python_version>='3.10'"),
                                      ("psutil", "7.2.2", None), ("asciimatics", "1.15.0", None)])
        self.assertIn(("typing_extensions", "4.16.0", None), parsed)
        self.assertNotIn("pillow", [name for name, _, _ in parsed])  # not an exact pin
        self.assertEqual(len(parsed), 10)
        py39, py310, py314 = (pyz_build.pins_for(parsed, v) for v in ("3.9", "3.10", "3.14"))
        self.assertEqual((py39["grpcio"], py39["protobuf"], py39["grpcio_tools"]), ("1.80.1", "6.33.6", "1.80.1"))
        self.assertEqual((py310["grpcio"], py310["protobuf"], py310["grpcio_tools"]), ("1.85.1", "7.36.2", "1.85.1"))
        self.assertEqual(py310, py314)
        self.assertEqual(py39["psutil"], py310["psutil"])
        self.assertNotIn("grpcio_tools", pyz_build.pins_for(parsed, "3.8"))  # neither line applies
        for marker, v, holds in (('python_version < "3.10"', "3.9", True), ('python_version < "3.10"', "3.10", False),
                                 ("python_version <= '3.9'", "3.9", True), ('python_version == "3.11"', "3.11", True),
                                 ('python_version != "3.11"', "3.11", False), ('python_version > "3.9"', "3.10", True),
                                 ('python_version >= "3.9" and python_version < "3.10"', "3.10", False)):
            self.assertEqual(pyz_build.marker_applies(marker, v), holds, (marker, v))
        for bad in ('sys_platform == "linux"', 'python_version < "3.10" or python_version > "3.12"',
                    'python_full_version < "3.10.1"'):
            with self.assertRaises(pyz_build.BuildError):
                pyz_build.marker_applies(bad, "3.10")
        with self.assertRaisesRegex(pyz_build.BuildError, "two pins of grpcio apply to Python 3.9"):
            pyz_build.pins_for(pyz_build.parse_requirements("grpcio==1.80.1\ngrpcio==1.85.1\n"), "3.9")

    def test_read_pins_needs_every_package_for_every_python(self):
        path = os.path.join(self.tmpdir(), "requirements.txt")
        with open(path, "w") as f:
            f.write(self.PINS)
        pins = pyz_build.read_pins(path, ["3.9", "3.12"])
        self.assertEqual(set(pins["3.9"]), set(pyz_build.RUNTIME_PACKAGES) | {"grpcio_tools"})
        self.assertEqual(pyz_build.stub_tools(dict(pins, **{pyz_build.PYTHONS[-1]: pins["3.12"]})),
                         {"3.9": "1.80.1", "3.12": None, pyz_build.PYTHONS[-1]: None})
        with self.assertRaisesRegex(pyz_build.BuildError, "for Python 3.8; missing: grpcio_tools$"):
            pyz_build.read_pins(path, ["3.8"])
        with self.assertRaisesRegex(pyz_build.BuildError, "cannot read"):
            pyz_build.read_pins(path + ".missing")

    def test_the_real_pins(self):
        pins = pyz_build.read_pins(os.path.join(HERE, "requirements.txt"))
        self.assertEqual(list(pins), pyz_build.PYTHONS)
        self.assertEqual(pyz_build.PYTHONS[0], "%d.%d" % pyz_bootstrap.MIN_PYTHON)
        # The builder reads the file as pip does: for this interpreter, the pins are what pip installed.
        mine = pins.get("%d.%d" % sys.version_info[:2])
        if mine is not None:
            for name, version in mine.items():
                self.assertEqual(importlib.metadata.version(name), version, name)
        # A Python whose grpcio or protobuf differs from the newest's must get stubs made for it:
        # the checked-in stubs refuse other major versions.
        tools = pyz_build.stub_tools(pins)
        newest = pins[pyz_build.PYTHONS[-1]]
        for py, p in pins.items():
            if (p["grpcio"], p["protobuf"]) != (newest["grpcio"], newest["protobuf"]):
                self.assertEqual(tools[py], p["grpcio_tools"], py)
            else:
                self.assertIsNone(tools[py], py)

    # -- wheels ------------------------------------------------------------

    def test_glibc_floor_tags(self):
        tags = pyz_build.manylinux_tags("x86_64")
        self.assertEqual(tags[0], "manylinux_2_17_x86_64")
        self.assertEqual(tags[-2:], ["manylinux_2_5_x86_64", "manylinux2014_x86_64"])
        self.assertEqual(len(tags), 14)
        self.assertNotIn("manylinux_2_18_x86_64", tags)
        self.assertEqual(pyz_build.manylinux_tags("aarch64", floor=28)[0], "manylinux_2_28_aarch64")
        self.assertEqual(pyz_build.TARGETS["linux-aarch64"], pyz_build.manylinux_tags("aarch64"))
        min_glibc = pyz_build.min_glibc
        self.assertEqual(min_glibc("psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64."
                                   "manylinux_2_28_x86_64.whl"), (2, 12))
        self.assertEqual(min_glibc("grpcio-1.80.1-cp39-cp39-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"), (2, 17))
        self.assertEqual(min_glibc("x-1.0-cp312-cp312-manylinux_2_28_aarch64.whl"), (2, 28))
        self.assertEqual(min_glibc("x-1.0-1build-cp312-cp312-manylinux1_x86_64.whl"), (2, 5))
        self.assertIsNone(min_glibc("wcwidth-0.9.4-py3-none-any.whl"))
        self.assertIsNone(min_glibc("grpcio-1.85.1-cp312-cp312-macosx_11_0_universal2.whl"))

    def test_pip_options_select_one_target_and_python(self):
        options = pyz_build.pip_options("linux-x86_64", "3.9")
        self.assertEqual(options[:10], ["--implementation", "cp", "--python-version", "3.9",
                                        "--abi", "cp39", "--abi", "abi3", "--abi", "none"])
        self.assertEqual(options[10::2], ["--platform"] * len(pyz_build.TARGETS["linux-x86_64"]))
        self.assertEqual(options[11::2], pyz_build.TARGETS["linux-x86_64"])

    # -- grouping ----------------------------------------------------------

    def test_each_file_once_in_a_group_named_after_its_users(self):
        x39, x310, x311, a310 = (("linux-x86_64", "cp39"), ("linux-x86_64", "cp310"),
                                 ("linux-x86_64", "cp311"), ("linux-aarch64", "cp310"))
        trees = {
            x39: {"cares.py": b"app", "grpc/cygrpc.so": b"so39", "stub.py": b"old", "psutil.so": b"x86"},
            x310: {"cares.py": b"app", "grpc/cygrpc.so": b"so310", "stub.py": b"new", "abi3.so": b"x86",
                   "psutil.so": b"x86"},
            x311: {"cares.py": b"app", "grpc/cygrpc.so": b"so311", "stub.py": b"new", "abi3.so": b"x86",
                   "psutil.so": b"x86"},
            a310: {"cares.py": b"app", "grpc/cygrpc.so": b"arm310", "stub.py": b"new", "abi3.so": b"arm",
                   "psutil.so": b"arm", "pkg-1.0.dist-info/RECORD": b"r"},
        }
        members, blobs, groups, layout = pyz_build.group_files(trees)
        where = {name: blobs[h] for name, h in members.items()}
        v = pyz_build.VENDOR
        self.assertEqual(where[v + "common/cares.py"], b"app")
        self.assertEqual(where[v + "linux-x86_64-cp39/stub.py"], b"old")
        self.assertEqual(where[v + "linux-x86_64-cp310+cp311/abi3.so"], b"x86")
        self.assertEqual(where[v + "linux-x86_64-cp311/grpc/cygrpc.so"], b"so311")
        self.assertEqual(where[v + "linux-aarch64/abi3.so"], b"arm")  # every Python of that target
        self.assertEqual(where[v + "linux-x86_64/psutil.so"], b"x86")  # 3.9 sorts before 3.10 here
        mixed = [n for n in members if n.endswith("/stub.py") and "/mix-" in n]
        self.assertEqual(len(mixed), 1, members)  # x86 3.10+3.11 and aarch64 3.10: no simple name
        self.assertEqual(len(members), 12)
        self.assertEqual(groups["common"], [1, 3])
        self.assertEqual(layout["linux-x86_64"]["cp39"], ["common", "linux-x86_64", "linux-x86_64-cp39"])
        self.assertEqual(sorted(layout), ["linux-aarch64", "linux-x86_64"])
        # What the bootstrap unpacks for each target/Python is exactly that tree.
        for (target, py), tree in trees.items():
            unpacked = {}
            for name, h in members.items():
                group, _, rel = name[len(v):].partition("/")
                if group in layout[target][py]:
                    self.assertNotIn(rel, unpacked)
                    unpacked[rel] = blobs[h]
            self.assertEqual(unpacked, tree, (target, py))
        for group, (count, size) in groups.items():
            inside = [blobs[h] for n, h in members.items() if n.startswith(v + group + "/")]
            self.assertEqual([count, size], [len(inside), sum(map(len, inside))], group)
        self.assertEqual(pyz_build.top_level_names(trees), ["abi3", "cares", "grpc", "psutil", "stub"])
        # One Python, one target: everything is common.
        members, _, groups, layout = pyz_build.group_files({x310: trees[x310]})
        self.assertEqual(list(groups), ["common"])
        self.assertEqual(layout, {"linux-x86_64": {"cp310": ["common"]}})

    # -- the bootstrap -----------------------------------------------------

    def test_cache_candidates(self):
        candidates = pyz_bootstrap.candidates
        self.assertEqual(candidates({"CARES_CACHE_DIR": "/c", "XDG_CACHE_HOME": "/x", "TMPDIR": "/t"}, "/h", 7), [
            ("/c", "$CARES_CACHE_DIR=", False), ("/x/cares", "", False),
            ("/t/cares-7", "", True), ("/tmp/cares-7", "", True), ("/var/tmp/cares-7", "", True)])
        # A relative XDG_CACHE_HOME is ignored (XDG spec); TMPDIR=/tmp is not tried twice.
        self.assertEqual(candidates({"XDG_CACHE_HOME": "rel", "TMPDIR": "/tmp"}, "/h", 0), [
            ("/h/.cache/cares", "", False), ("/tmp/cares-0", "", True), ("/var/tmp/cares-0", "", True)])
        # No usable home (expanduser gave "~" back), a relative TMPDIR, a relative CARES_CACHE_DIR.
        self.assertEqual(candidates({"TMPDIR": "t", "CARES_CACHE_DIR": "rel"}, "~", 5), [
            (os.path.abspath("rel"), "$CARES_CACHE_DIR=", False),
            ("/tmp/cares-5", "", True), ("/var/tmp/cares-5", "", True)])

    def test_target_names(self):
        host_target = pyz_bootstrap.host_target
        self.assertEqual(host_target("linux", "x86_64", 2 ** 63 - 1), "linux-x86_64")
        self.assertEqual(host_target("linux", "AMD64", 2 ** 63 - 1), "linux-x86_64")
        self.assertEqual(host_target("linux", "arm64", 2 ** 63 - 1), "linux-aarch64")
        self.assertEqual(host_target("darwin", "aarch64", 2 ** 63 - 1), "macos-arm64")
        self.assertEqual(host_target("darwin", "x86_64", 2 ** 63 - 1), "macos-x86_64")
        self.assertEqual(host_target("linux", "x86_64", 2 ** 31 - 1), "linux-x86_64-32bit")
        self.assertEqual(host_target("win32", "AMD64", 2 ** 63 - 1), "win32-x86_64")
        for target in pyz_build.TARGETS:
            osname, machine = target.split("-")
            self.assertEqual(host_target({"macos": "darwin"}.get(osname, osname), machine, sys.maxsize), target)

    def test_too_old_python_message(self):
        major, minor = pyz_bootstrap.MIN_PYTHON
        self.assertEqual(pyz_bootstrap.version_error((major, minor - 1, 18, "final", 0), "3.x.18"),
                         "cares needs Python %d.%d or newer; this is 3.x.18" % (major, minor))
        self.assertEqual(pyz_bootstrap.version_error((2, 7, 18), "2.7.18"),
                         "cares needs Python %d.%d or newer; this is 2.7.18" % (major, minor))
        self.assertIsNone(pyz_bootstrap.version_error((major, minor, 0), "x"))
        self.assertIsNone(pyz_bootstrap.version_error(sys.version_info, "now"))

    def test_move_aside_removes_a_tree_without_leaving_trash(self):
        root = self.tmpdir()
        entry = os.path.join(root, "0123456789abcdef-linux-x86_64-cp311")
        os.makedirs(os.path.join(entry, "grpc", "_cython"))
        with open(os.path.join(entry, "grpc", "_cython", "cygrpc.so"), "wb") as f:
            f.write(b"x" * 100)
        os.chmod(os.path.join(entry, "grpc", "_cython", "cygrpc.so"), 0o444)
        self.assertTrue(pyz_bootstrap.move_aside(entry))
        self.assertEqual(os.listdir(root), [])
        self.assertFalse(pyz_bootstrap.move_aside(entry))  # gone already

    def test_prune_moves_unused_entries_aside_and_spares_locked_ones(self):
        root = self.tmpdir()
        mine, unused, in_use = ("%s-linux-x86_64-cp311" % (c * 16) for c in "abc")
        for name in (mine, unused, in_use, ".cares-trash-left-by-a-killed-run", "not-an-entry"):
            os.makedirs(os.path.join(root, name, "pkg"))
            with open(os.path.join(root, name, pyz_bootstrap.MARKER), "w") as f:
                f.write("x\n")
            old = time.time() - 2 * pyz_bootstrap.GRACE
            os.utime(os.path.join(root, name), (old, old))
        fd = os.open(os.path.join(root, in_use, pyz_bootstrap.MARKER), os.O_RDONLY)
        self.addCleanup(os.close, fd)
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_SH)  # as a running cares holds its entry
        pyz_bootstrap.prune(root, "a" * 16)
        self.assertEqual(sorted(os.listdir(root)), sorted([mine, in_use, "not-an-entry"]))

    def test_runs_started_at_once_take_turns_to_unpack_and_a_stuck_one_stops_nobody(self):
        root = self.tmpdir()
        first = pyz_bootstrap.wait_to_unpack(root)
        self.assertIsNotNone(first)
        second = []
        waiter = threading.Thread(target=lambda: second.append(pyz_bootstrap.wait_to_unpack(root)), daemon=True)
        waiter.start()
        waiter.join(0.3)
        self.assertEqual(second, [], "a second run went on while the first was unpacking")
        os.close(first)  # the first run's unpack is done
        waiter.join(10)
        self.assertEqual(len(second), 1)
        self.assertIsNotNone(second[0])
        # Stuck (say, stopped mid-unpack): the next run waits UNPACK_WAIT, then goes on unlocked.
        with mock.patch.object(pyz_bootstrap, "UNPACK_WAIT", 0):
            self.assertIsNone(pyz_bootstrap.wait_to_unpack(root))
        os.close(second[0])
        self.assertIsNone(pyz_bootstrap.wait_to_unpack(os.path.join(root, "missing")))  # no folder: no lock

    def test_build_data_round_trip(self):
        trees = {("linux-x86_64", "cp39"): {"cares.py": b"app", "grpc/a.so": b"39"},
                 ("linux-x86_64", "cp312"): {"cares.py": b"app", "grpc/a.so": b"312"}}
        members, blobs, groups, layout = pyz_build.group_files(trees)
        with open(pyz_bootstrap.__file__) as f:
            source = f.read()
        ident = pyz_build.build_id(source, layout, {"linux-x86_64": (2, 17)}, members)
        self.assertRegex(ident, "^[0-9a-f]{16}$")
        self.assertNotEqual(ident, pyz_build.build_id(source + "#", layout, {"linux-x86_64": (2, 17)}, members))
        raw = pyz_build.build_data(ident, layout, groups, {"linux-x86_64": (2, 17)}, ["cares", "grpc"],
                                   {"pins": {"cp39": {"grpcio": "1.80.1"}}})
        build = pyz_bootstrap.parse_build_data(raw)
        self.assertEqual(build, {"build_id": ident, "layout": layout, "groups": groups,
                                 "min_glibc": {"linux-x86_64": (2, 17)}, "top_level": ["cares", "grpc"]})
        self.assertEqual(json.loads(raw)["pins"], {"cp39": {"grpcio": "1.80.1"}})  # for humans, kept
        for damaged in (raw[:-20], b"[]", raw.replace(ident.encode(), b"not-hex-16-chars"),
                        raw.replace(b'"common"', b'"nowhere"', 1)):
            with self.assertRaises(ValueError):
                pyz_bootstrap.parse_build_data(damaged)

        # Through a real archive: written by the builder, read by zipimport the way __main__.py reads it,
        # then run, with a stand-in cares unpacked from it.
        tmp = self.tmpdir()
        pytag = "cp%d%d" % sys.version_info[:2]
        target = pyz_bootstrap.host_target(sys.platform, os.uname().machine, sys.maxsize)
        trees = {(target, pytag): {"cares.py": b"import sys\ndef main():\n    print('stand-in', sys.version_info[0])\n"
                                               b"    return 3\n"}}
        members, blobs, groups, layout = pyz_build.group_files(trees)
        ident = pyz_build.build_id(source, layout, {}, members)
        entries = [("__main__.py", source.encode()), (pyz_build.BUILD_DATA,
                   pyz_build.build_data(ident, layout, groups, {}, pyz_build.top_level_names(trees), {}))]
        entries += [(n, blobs[h]) for n, h in sorted(members.items())]
        pyz = os.path.join(tmp, "mini.pyz")
        pyz_build.write_zip(pyz, entries, 6)
        with open(pyz, "rb") as f:
            first = f.read()
        pyz_build.write_zip(pyz, entries, 6)
        with open(pyz, "rb") as f:
            self.assertEqual(f.read(), first, "the same entries gave other bytes")
        self.assertTrue(first.startswith(b"#!/usr/bin/env python3\n"))
        self.assertEqual(pyz_bootstrap.read_build_data(pyz, zipimport.zipimporter(pyz))["build_id"], ident)
        r = subprocess.run([sys.executable, pyz], env=dict(os.environ, CARES_CACHE_DIR=os.path.join(tmp, "cache")),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual((r.returncode, r.stdout, r.stderr), (3, "stand-in 3\n", ""))
        self.assertEqual(os.listdir(os.path.join(tmp, "cache")), ["%s-%s-%s" % (ident, target, pytag)])

    def test_damaged_build_data_is_one_line(self):
        tmp = self.tmpdir()
        pyz = os.path.join(tmp, "bad.pyz")
        with open(pyz_bootstrap.__file__, "rb") as f:
            pyz_build.write_zip(pyz, [("__main__.py", f.read()), (pyz_build.BUILD_DATA, b'{"build_id": ')], 6)
        r = subprocess.run([sys.executable, pyz], env=dict(os.environ, CARES_CACHE_DIR=os.path.join(tmp, "cache")),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual(r.returncode, 1)
        self.assertRegex(r.stderr, r"^cares: .*bad\.pyz is damaged or truncated \(unreadable build data: .*\); "
                                   r"copy it again\n$")
        self.assertFalse(os.path.exists(os.path.join(tmp, "cache")))

    # -- the shim ----------------------------------------------------------

    def test_build_errors_are_one_line_from_the_shim(self):
        tmp = self.tmpdir()
        r = subprocess.run(["sh", os.path.join(HERE, "build_zipapp.sh"), "--offline", "--requirements",
                            os.path.join(tmp, "none.txt"), "-o", os.path.join(tmp, "x.pyz")],
                           env=dict(os.environ, PYTHON=sys.executable), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual((r.returncode, r.stdout), (1, ""))
        self.assertRegex(r.stderr, r"^build_zipapp.sh: cannot read .*none\.txt: No such file or directory\n$")
        r = subprocess.run(["sh", os.path.join(HERE, "build_zipapp.sh"), "--help"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("CPython %s-%s" % (pyz_build.PYTHONS[0], pyz_build.PYTHONS[-1]), r.stdout)


class ZipappTest(unittest.TestCase):
    COLD_TIMEOUT = 180  # first run unpacks ~25 MB and compiles bytecode

    pyz = os.path.abspath(os.environ.get("CARES_PYZ") or os.path.join(HERE, "cares.pyz"))
    source = CARES_PY

    def setUp(self):
        if not os.path.isfile(self.pyz):
            msg = "%s not found; build it with: sh build_zipapp.sh" % self.pyz
            if IN_CI:
                self.fail(msg)
            self.skipTest(msg)
        self.tmp = tempfile.mkdtemp(prefix="cares-pyz-test-")
        self.addCleanup(self._rmtree, self.tmp)
        self._lock = threading.Lock()

    # -- helpers ---------------------------------------------------------

    @staticmethod
    def _rmtree(path):
        # Read-only dirs made by a test must become writable again to go away.
        for folder, dirs, _ in os.walk(path):
            for d in dirs:
                try:
                    os.chmod(os.path.join(folder, d), 0o700)
                except OSError:
                    pass
        shutil.rmtree(path, ignore_errors=True)

    def _dir(self, name):
        path = os.path.join(self.tmp, name)
        os.makedirs(path)
        return path

    def _env(self, **changes):
        env = dict(os.environ)
        for key in ("CARES_CACHE_DIR", "XDG_CACHE_HOME", "CARES_PYZ_DEBUG"):
            env.pop(key, None)
        with self._lock:  # the per-Python checks call this from their threads
            self._n = getattr(self, "_n", 0) + 1
            n = self._n
        env["HOME"] = self._dir("home-%d" % n)  # never the real HOME or /tmp
        env["TMPDIR"] = self._dir("tmpdir-%d" % n)
        for key, value in changes.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def _run(self, argv, env, timeout=None):
        return subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, timeout=timeout or self.COLD_TIMEOUT,
                              universal_newlines=True)

    _found = None

    @classmethod
    def _interpreters(cls):
        """{path: (major, minor, full version)} of the CPythons we can find (looked for once)."""
        if cls._found is None:
            cls._found = cls._find_interpreters()
        return dict(cls._found)

    @staticmethod
    def _find_interpreters():
        paths = [sys.executable]
        root = os.environ.get("PYENV_ROOT")
        if shutil.which("pyenv"):
            try:
                root = subprocess.run(["pyenv", "root"], stdout=subprocess.PIPE, universal_newlines=True,
                                      stderr=subprocess.DEVNULL, timeout=30).stdout.strip() or root
            except (OSError, subprocess.SubprocessError):
                pass
        root = root or os.path.expanduser("~/.pyenv")
        paths += sorted(glob.glob(os.path.join(root, "versions", "*", "bin", "python3")))
        found, seen = {}, set()
        probe = "import sys, platform; print(sys.implementation.name, platform.python_version())"
        for path in paths:
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            try:
                out = subprocess.run([path, "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     universal_newlines=True, timeout=30).stdout.split()
            except (OSError, subprocess.SubprocessError):
                continue
            if len(out) == 2 and out[0] == "cpython":
                major, minor = (int(x) for x in out[1].split(".")[:2])
                found[path] = (major, minor, out[1])
        return found

    def _carried_interpreters(self):
        """The interpreters found whose Python this pyz carries a build for (see _interpreters)."""
        with zipfile.ZipFile(self.pyz) as zf:
            layout = json.loads(zf.read(pyz_build.BUILD_DATA))["layout"]
        target = pyz_bootstrap.host_target(sys.platform, os.uname().machine, sys.maxsize)
        carried = {(int(tag[2]), int(tag[3:])) for tag in layout.get(target, {})}
        pythons = {p: v for p, v in self._interpreters().items() if v[:2] in carried}
        self.assertIn(sys.executable, pythons)
        if IN_CI and (3, 9) in carried:
            # The cp39 subtree runs other grpcio and protobuf releases and stubs made at build time.
            self.assertIn((3, 9), {v[:2] for v in pythons.values()},
                          "CI needs a CPython 3.9 (e.g. pyenv install 3.9) to run the pyz's cp39 subtree")
        return pythons

    @staticmethod
    def _bundled_version(entry, module):
        with open(os.path.join(entry, *module.split("/"))) as f:
            return re.search(r"""^__version__ = ['"]+([^'"]+)""", f.read(), re.M).group(1)

    def _expected_version_line(self):
        # The pyz must carry the current source: compare with cares.py itself.
        if not os.path.isfile(self.source):
            return None
        r = self._run([sys.executable, self.source, "--version"], dict(os.environ), timeout=60)
        return r.stdout if r.returncode == 0 else None  # its deps are not installed here

    def _entries(self, root):
        return sorted(n for n in os.listdir(root) if not n.startswith("."))

    def _can_mount(self):
        """True when we may make private mounts (root, with unshare) to fake ro/noexec filesystems."""
        if os.geteuid() != 0 or not shutil.which("unshare"):
            return False
        r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount -t tmpfs tmpfs "$1"', "sh", self._dir("probe")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        return r.returncode == 0

    def _with_mount(self, options, where, argv):
        # A private mount namespace: the mount exists for this one command only.
        return ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o "$1" tmpfs "$2" && shift 2 && exec "$@"',
                "sh", options, where] + argv

    _warm = None  # {python: a cache folder it has already unpacked into}, for the class's tests

    def _warm_cache(self, python, cache=None):
        """A cache folder the pyz has unpacked into under this Python, shared by the class's tests
        that do not test unpacking (a cold start costs a second of CPU per Python). With cache,
        a folder the caller has just seen a good cold start fill becomes that one."""
        with self._lock:
            if ZipappTest._warm is None:
                ZipappTest._warm = {}
                self.addClassCleanup(setattr, ZipappTest, "_warm", None)
            if cache is not None:
                ZipappTest._warm.setdefault(python, cache)
                return cache
            if python in ZipappTest._warm:
                return ZipappTest._warm[python]
        cache = tempfile.mkdtemp(prefix="cares-pyz-warm-")
        self.addClassCleanup(self._rmtree, cache)
        r = self._run([python, self.pyz, "--version"], self._env(CARES_CACHE_DIR=cache))
        self.assertEqual(r.returncode, 0, r.stderr)
        return self._warm_cache(python, cache)

    def _each_python(self, pythons, check):
        """check(python, (major, minor, full)) for every Python, a few at a time on threads (each
        is a child process that mostly waits); each one's failure is reported as its own subTest."""
        with futures.ThreadPoolExecutor(max_workers=3) as pool:
            running = {python: pool.submit(check, python, version) for python, version in sorted(pythons.items())}
        for python, outcome in running.items():
            with self.subTest(python=python, version=pythons[python][2]):
                outcome.result()  # re-raises what the check raised, in this subTest

    # -- tests -----------------------------------------------------------

    def test_version_under_every_python(self):
        expected = self._expected_version_line()
        pythons = self._carried_interpreters()
        pins = pyz_build.read_pins(os.path.join(HERE, "requirements.txt"))

        def check(python, version):
            major, minor, full = version
            cache = tempfile.mkdtemp(prefix="cares-pyz-cold-")  # outlives the test: see _warm_cache
            self.addClassCleanup(self._rmtree, cache)
            r = self._run([python, self.pyz, "--version"], self._env(CARES_CACHE_DIR=cache))
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertRegex(r.stdout, r"^cares \d+\.\d+\.\d+\S*\n$")
            if expected is not None:
                self.assertEqual(r.stdout, expected, "cares.pyz is stale: rebuild it")
            self.assertEqual(r.stderr, "")
            # Exactly one entry, for this Python, holding only its own cygrpc.
            entries = self._entries(cache)
            self.assertEqual(len(entries), 1, entries)
            self.assertTrue(entries[0].endswith("-cp%d%d" % (major, minor)), entries)
            cygrpc = glob.glob(os.path.join(cache, entries[0], "grpc", "_cython", "cygrpc*.so"))
            self.assertEqual(len(cygrpc), 1, cygrpc)
            self.assertTrue(os.path.basename(cygrpc[0]).startswith("cygrpc.cpython-%d%d-" % (major, minor)),
                            cygrpc)
            # ... and the grpcio and protobuf that requirements.txt pins for this Python.
            entry = os.path.join(cache, entries[0])
            mine = pins["%d.%d" % (major, minor)]
            self.assertEqual(self._bundled_version(entry, "grpc/_grpcio_metadata.py"), mine["grpcio"])
            self.assertEqual(self._bundled_version(entry, "google/protobuf/__init__.py"), mine["protobuf"])
            # Second run: served from the cache, same answer.
            r2 = self._run([python, self.pyz, "--version"], self._env(CARES_CACHE_DIR=cache))
            self.assertEqual((r2.returncode, r2.stdout), (0, r.stdout), r2.stderr)
            self.assertEqual(self._entries(cache), entries)
            self._warm_cache(python, cache)
        self._each_python(pythons, check)

    def test_version_under_every_python_then_a_cluster_from_the_pyz(self):
        # Named to sort after test_version_under_every_python: it runs from the caches that filled.
        def check(python, version):
            # Unpacked already (cold starts are test_version_under_every_python's). Its own state
            # folder: workers of the same ID lock it, and the Pythons run at once.
            env = self._env(CARES_CACHE_DIR=self._warm_cache(python),
                            XDG_STATE_HOME=self._dir(f"state-{version[2]}"))
            address = f"127.0.0.1:{free_port()}"

            def active(rows):
                return [(n["node_id"], n["status"]) for n in rows] == [("from-pyz", "Active")]

            def rows_here():  # cheap polling from this process; the pyz's own status has the last word
                try:
                    return cares.fetch_status(address, timeout=2)
                except grpc.RpcError:
                    return None
            spawned = []
            for argv in (["orchestrator", "--listen", address, "--headless"],
                         ["worker", address, "--node-id", "from-pyz", "--headless"]):
                process = subprocess.Popen([python, self.pyz, *argv], env=env, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                self.addCleanup(process.communicate)  # cleanups run last-in first-out: kill, then reap
                self.addCleanup(process.kill)
                spawned.append(process)
                if len(spawned) == 1:
                    # The worker starts once the orchestrator answers: a worker that found nobody
                    # would back off for seconds while a loaded machine unpacks the orchestrator.
                    self.assertIsNotNone(wait_until(lambda: listening(address) and rows_here() is not None, 30,
                                                    interval=0.1),
                                         f"the orchestrator from the pyz under {python} never answered")
            self.assertIsNotNone(wait_until(lambda: active(rows_here() or []), 30, interval=0.1),
                                 f"no Active node from the pyz under {python}")
            result = self._run([python, self.pyz, "status", address, "--json", "--timeout", "2"], env)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertTrue(active(json.loads(result.stdout)["nodes"]), result.stdout)
            for process in reversed(spawned):
                process.send_signal(signal.SIGTERM)
                self.assertEqual(process.wait(10), 0)
                self.assertNotIn("Traceback", process.stderr.read())
        self._each_python(self._carried_interpreters(), check)

    def test_simultaneous_first_runs(self):
        cache = self._dir("cache")
        env = self._env(CARES_CACHE_DIR=cache)
        procs = [subprocess.Popen([sys.executable, self.pyz, "--version"], env=env, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
                 for _ in range(4)]
        results = []
        for p in procs:
            try:
                out, err = p.communicate(timeout=self.COLD_TIMEOUT)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise
            results.append((p.returncode, out, err))
        for code, out, err in results:
            self.assertEqual(code, 0, err)
            self.assertTrue(out.startswith("cares "), out)
        self.assertEqual(len({out for _, out, _ in results}), 1, results)
        # One finished entry, shared by all (losers of the race use the
        # winner's entry, not another cache dir); their temp dirs are gone.
        self.assertEqual(len(os.listdir(cache)), 1, os.listdir(cache))
        self.assertFalse(os.path.exists(os.path.join(env["HOME"], ".cache")))

    def test_read_only_home_falls_back_to_temp_dir(self):
        env = self._env(CARES_CACHE_DIR=None, XDG_CACHE_HOME=None)
        home, tmpdir = env["HOME"], env["TMPDIR"]
        argv = [sys.executable, self.pyz, "--version"]
        if os.geteuid() == 0:
            # chmod does not stop root: mount a read-only filesystem on HOME instead.
            if not self._can_mount():
                self.skipTest("running as root without private mounts: cannot make HOME read-only")
            argv = self._with_mount("ro", home, argv)
        else:
            os.chmod(home, 0o555)
            self.assertFalse(os.access(home, os.W_OK))
        r = self._run(argv, env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.startswith("cares "), r.stdout)
        fallback = os.path.join(tmpdir, "cares-%d" % os.getuid())
        st = os.lstat(fallback)
        self.assertTrue(stat.S_ISDIR(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o700)
        self.assertEqual(st.st_uid, os.getuid())
        self.assertEqual(len(self._entries(fallback)), 1)
        self.assertEqual(os.listdir(home), [])

    def test_noexec_cache_dir_is_skipped(self):
        if not self._can_mount():
            self.skipTest("needs root and private mounts to make a noexec filesystem")
        noexec = self._dir("noexec")
        env = self._env(CARES_CACHE_DIR=noexec, XDG_CACHE_HOME=None)
        r = self._run(self._with_mount("noexec", noexec, [sys.executable, self.pyz, "--version"]), env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(len(self._entries(os.path.join(env["HOME"], ".cache", "cares"))), 1)

    def test_old_entries_of_other_builds_are_pruned(self):
        cache = self._dir("cache")
        env = self._env(CARES_CACHE_DIR=cache)
        tag = "cp%d%d" % sys.version_info[:2]
        old = os.path.join(cache, "0" * 16 + "-linux-x86_64-" + tag)
        recent = os.path.join(cache, "1" * 16 + "-linux-x86_64-" + tag)
        foreign = os.path.join(cache, "keep-me")
        for d in (old, recent, foreign):
            os.makedirs(os.path.join(d, "pkg"))
            with open(os.path.join(d, ".cares-entry"), "w") as f:
                f.write("x\n")
        two_hours_ago = time.time() - 7200
        for d in (old, foreign):
            os.utime(d, (two_hours_ago, two_hours_ago))
        r = self._run([sys.executable, self.pyz, "--version"], env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertFalse(os.path.exists(old), "unused entry of another build was kept")
        self.assertTrue(os.path.isdir(recent), "recently used entry of another build was removed")
        self.assertTrue(os.path.isdir(foreign), "a folder that is not a cache entry was removed")
        self.assertEqual(len(self._entries(cache)), 3)  # ours + recent + keep-me

    def test_too_old_python_gets_one_line_error(self):
        floor = pyz_bootstrap.MIN_PYTHON
        old = {p: v for p, v in self._interpreters().items() if (3, 6) <= v[:2] < floor}
        if not old:
            self.skipTest("no CPython from 3.6 to below %d.%d found (looked at sys.executable and pyenv)" % floor)
        for python, (_, _, full) in sorted(old.items()):
            with self.subTest(python=python, version=full):
                cache = self._dir("cache-%s" % full)
                r = self._run([python, self.pyz, "--version"], self._env(CARES_CACHE_DIR=cache), timeout=60)
                self.assertNotEqual(r.returncode, 0)
                self.assertEqual(r.stdout, "")
                self.assertNotIn("Traceback", r.stderr)
                self.assertEqual(len(r.stderr.splitlines()), 1, r.stderr)
                self.assertIn("needs Python %d.%d or newer" % floor, r.stderr)
                self.assertIn(full, r.stderr)
                self.assertEqual(os.listdir(cache), [], "an unsupported Python unpacked files")



# ---------------------------------------------------------------------------
# Running the whole module: test classes shared out to child processes
# ---------------------------------------------------------------------------
# `python -m unittest test_cares` loads the module, so unittest calls load_tests below: it returns
# one suite that runs the classes in a few child processes at once (most tests wait on processes,
# sockets and heartbeats, not on the CPU) and replays every outcome, with its traceback text, into
# this process's result, so the summary and the exit code are the children's. A named class or
# test (`python -m unittest test_cares.ClusterTest`) is loaded without load_tests and runs here,
# in-process, as does everything with CARES_TEST_JOBS=1.

# Seconds each unit took in one parallel run (CARES_TEST_JOBS=4, CARES_TEST_TIMING=1): the longest
# start first, and the short ones fill the gaps. A class not named takes well under a second.
CLASS_COST_S = {
    "ZipappTest": 18.2, "PrometheusEndToEndTest": 10.5, "MetricsHttpTest": 5.8, "ClusterTest": 4.1,
    "InventoryTest": 3.7, "AccessTest": 3.4, "MetricsHostileClientTest": 3.3, "DetailStatusCommandTest": 3.3,
    "NodeRegistryTest": 3.2, "HostileInputTest": 3.1, "BuildToolsTest": 2.4, "ServiceProcessTest": 2.3,
    "AlertTest": 1.9, "TuiSceneTest": 1.8, "HistoryStoreTest": 1.8, "MetricsNoTracebackTest": 1.6,
    "EventHookTest": 1.5,
}
# The same for the tests of the classes in SPLIT (a test not named takes about a second).
TEST_COST_S = {
    "DetailOverHeartbeatTest.test_a_detail_nobody_looks_at_any_more_lapses_on_both_sides": 7.5,
    "TmuxEndToEndTest.test_orchestrator_and_four_workers_through_the_menus": 7.3,
    "TmuxEndToEndTest.test_labels_filter_detail_view_and_help": 4.6,
    "HistoryAcrossRestartTest.test_buckets_match_what_the_workers_sent_across_an_orchestrator_restart": 4.6,
    "RoutineOperationsTest.test_status_lists_ten_thousand_nodes": 4.2,
    "FaultTest.test_black_holed_link_is_noticed_on_both_sides_and_recovers": 4.2,
    "RoutineOperationsTest.test_bad_inputs_get_one_clear_line": 3.2,
    "RoutineOperationsTest.test_restarts_leave_no_ghost_rows": 3.1,
    "TmuxEndToEndTest.test_the_graphs_switch_to_history_ranges_with_events_marked": 3.0,
    "RoutineOperationsTest.test_headless_processes_never_load_the_tui": 3.0,
    "LivenessIntegrityTest.test_a_worker_backs_off_from_an_orchestrator_that_drops_every_stream": 3.0,
    "RoutineOperationsTest.test_a_stopped_log_reader_never_stops_serving": 2.9,
    "DetailOverHeartbeatTest.test_a_worker_asked_far_too_often_snapshots_once_a_period_and_stays": 2.6,
    "LivenessIntegrityTest.test_an_orchestrator_stall_blames_no_worker": 2.4,
    "HistoryAcrossRestartTest.test_a_file_size_limit_costs_history_not_serving": 2.2,
    "CommandLineTest.test_headless_orchestrator_and_four_headless_workers": 2.2,
    "RoutineOperationsTest.test_a_full_log_disk_never_stops_serving": 2.1,
    "LivenessIntegrityTest.test_token_guessing_is_throttled_per_address": 2.1,
    "RoutineOperationsTest.test_refusal_floods_become_summaries": 2.0,
    "RoutineOperationsTest.test_a_closed_or_broken_stderr_never_stops_serving": 2.0,
    "FaultTest.test_orchestrator_killed_and_restarted_every_worker_back": 1.8,
    "TmuxEndToEndTest.test_no_color_and_a_light_background": 1.7,
    "TmuxEndToEndTest.test_a_c_locale_gets_an_ascii_screen": 1.6,
    "RoutineOperationsTest.test_sighup_keeps_headless_processes_serving": 1.6,
    "LivenessIntegrityTest.test_rejoining_a_dead_nodes_id_never_makes_it_active": 1.6,
}
# Classes with no state of their own across tests, long enough to be worth sharing out test by
# test rather than as one unit.
SPLIT = {"RoutineOperationsTest", "TmuxEndToEndTest", "LivenessIntegrityTest", "FaultTest", "CommandLineTest",
         "HistoryAcrossRestartTest", "DetailOverHeartbeatTest"}
# Tests that measure a busy process's share of the CPU, or that it tops the CPU order: they run on
# their own, each while no other test runs (other tests' processes would take that CPU).
EXCLUSIVE = {
    "DetailSamplerTest.test_a_busy_process_tops_the_cpu_order_and_leaves_when_it_ends",
    "DetailSamplerTest.test_a_cgroup_with_a_busy_process_shows_with_its_cpu",
    "DetailOverHeartbeatTest.test_the_orchestrator_sees_a_busy_process_within_three_intervals_and_then_sees_it_go",
    "TmuxEndToEndTest.test_a_nodes_processes_disks_and_containers_in_its_detail_view",
}
# Tests that mostly wait (on heartbeats, deadlines, throttles: under a tenth of a core): they may
# run beside an EXCLUSIVE one, whose busy process they leave its core, so those seconds are not
# lost to the rest of the suite.
QUIET = {
    "DetailOverHeartbeatTest.test_a_detail_nobody_looks_at_any_more_lapses_on_both_sides",
    "DetailOverHeartbeatTest.test_a_worker_asked_far_too_often_snapshots_once_a_period_and_stays",
    "LivenessIntegrityTest.test_a_worker_backs_off_from_an_orchestrator_that_drops_every_stream",
    "LivenessIntegrityTest.test_token_guessing_is_throttled_per_address",
}
# A class whose child has not finished it by then is killed with everything it started and its
# unfinished tests fail: no single class is anywhere near this, even on a loaded machine.
CLASS_TIMEOUT_S = 300
# Six at once on a 2-core machine: most tests wait; 32-33 s where four took 35-36 s (alternating runs).
JOBS = int(os.environ.get("CARES_TEST_JOBS") or 6)
_CHILD_ENV = "CARES_TEST_CHILD"
# CARES_TEST_TIMING=1: each class's wall and CPU seconds (its child's and their children's) on stderr.
TIMING = os.environ.get("CARES_TEST_TIMING") == "1"


class ChildTraceback(Exception):
    """What a child process reported for a test: its own traceback text, replayed as is."""

    def __str__(self):
        return "\n" + self.args[0].rstrip("\n")


class _Repr(str):
    """A subtest parameter's repr from a child, shown as it was there."""

    def __repr__(self):
        return str(self)


class _ChildResult(unittest.TestResult):
    """In a child: every outcome, as JSON lines on a pipe to the parent."""

    def __init__(self, out):
        super().__init__()
        self._out = out

    def _send(self, **event):
        self._out.write(json.dumps(event) + "\n")
        self._out.flush()

    def startTest(self, test):
        super().startTest(test)
        self._send(event="start", id=test.id())

    def stopTest(self, test):
        super().stopTest(test)
        self._send(event="stop", id=test.id())

    def addSuccess(self, test):
        super().addSuccess(test)
        self._send(event="success", id=test.id())

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._send(event="failure", id=test.id(), text=self.failures[-1][1])

    def addError(self, test, err):
        super().addError(test, err)
        self._send(event="error", id=test.id(), text=self.errors[-1][1])

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._send(event="skip", id=test.id(), reason=reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._send(event="xfail", id=test.id(), text=self.expectedFailures[-1][1])

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._send(event="xpass", id=test.id())

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "failure" if issubclass(err[0], test.failureException) else "error"
            text = (self.failures if kind == "failure" else self.errors)[-1][1]
            message = subtest._message if isinstance(subtest._message, str) else None
            self._send(event="sub" + kind, id=test.id(), text=text, message=message,
                       params={key: repr(value) for key, value in subtest.params.items()})


def _child_main(results_fd):
    """A child: runs the test IDs of one class per line of stdin, reporting on results_fd."""
    out = os.fdopen(results_fd, "w", encoding="utf-8")
    result = _ChildResult(out)
    for line in sys.stdin:
        started, cpu = time.monotonic(), _cpu_seconds()
        unittest.TestSuite(unittest.defaultTestLoader.loadTestsFromNames(json.loads(line))).run(result)
        result._send(event="done", seconds=time.monotonic() - started, cpu=_cpu_seconds() - cpu)


def _cpu_seconds():
    """CPU time of this process and of the children it has reaped."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


class _ParallelSuite(unittest.TestSuite):
    """The module's classes run in JOBS child processes, longest first; outcomes replayed here."""

    def run(self, result, debug=False):
        import queue
        tests = {}
        for test in self._flatten(self):
            tests[test.id()] = test
        classes, alone, units = collections.OrderedDict(), [], []
        for test_id in tests:
            name = test_id.split(".", 1)[1]
            if name in EXCLUSIVE:
                alone.append((Sharing.ALONE, [test_id]))
            elif name.split(".")[0] in SPLIT:
                units.append((TEST_COST_S.get(name, 1.0), [test_id]))
            else:
                classes.setdefault(test_id.rsplit(".", 1)[0], []).append(test_id)
        units += [(CLASS_COST_S.get(name.rsplit(".", 1)[1], 0.5), ids) for name, ids in classes.items()]
        units.sort(key=lambda unit: -unit[0])
        work = _Work(alone + [(Sharing.QUIET if ids[0].split(".", 1)[1] in QUIET else Sharing.SHARED, ids)
                              for _, ids in units])
        replay = queue.Queue()
        workers = [threading.Thread(target=self._worker, args=(work, replay, result), daemon=True)
                   for _ in range(min(JOBS, len(work.pending)))]
        for worker in workers:
            worker.start()
        running = len(workers)
        try:
            while running:
                item = replay.get()
                if item is None:
                    running -= 1
                else:
                    self._replay(result, tests, item)
        finally:  # interrupted: no child outlives this process
            for child in list(_Child.alive):
                child.kill()
        return result

    @staticmethod
    def _flatten(suite):
        for item in suite:
            if isinstance(item, unittest.TestSuite):
                yield from _ParallelSuite._flatten(item)
            else:
                yield item

    def _worker(self, work, replay, result):
        child = None
        try:
            while not result.shouldStop:
                unit = work.take()
                if unit is None:
                    break
                try:
                    if child is None:
                        child = _Child()
                    if not child.run_class(unit[1], replay):  # it killed the child
                        child = None
                finally:
                    work.done(unit)
        finally:
            if child is not None:
                child.close()
            replay.put(None)

    @staticmethod
    def _replay(result, tests, events):
        """One test's events (start, outcomes, stop) or a lone class- or module-level error."""
        test = tests.get(events[0]["id"]) or unittest.suite._ErrorHolder(events[0]["id"])
        for event in events:
            kind, text = event["event"], event.get("text", "")
            if kind == "start":
                result.startTest(test)
            elif kind == "stop":
                result.stopTest(test)
            elif kind == "success":
                result.addSuccess(test)
            elif kind == "failure":
                result.addFailure(test, (ChildTraceback, ChildTraceback(text), None))
            elif kind == "error":
                result.addError(test, (ChildTraceback, ChildTraceback(text), None))
            elif kind == "skip":
                result.addSkip(test, event["reason"])
            elif kind == "xfail":
                result.addExpectedFailure(test, (ChildTraceback, ChildTraceback(text), None))
            elif kind == "xpass":
                result.addUnexpectedSuccess(test)
            elif kind in ("subfailure", "suberror"):
                message = event["message"] if event["message"] is not None else unittest.case._subtest_msg_sentinel
                params = {key: _Repr(value) for key, value in event["params"].items()}
                subtest = unittest.case._SubTest(test, message, params)
                error = ChildTraceback if kind == "suberror" else type("ChildFailure", (ChildTraceback, AssertionError), {})
                result.addSubTest(test, subtest, (error, error(text), None))


class Sharing(enum.Enum):
    """What else may run while a unit of _Work runs."""
    ALONE = "only QUIET units"          # an EXCLUSIVE test
    QUIET = "anything"                  # a QUIET test
    SHARED = "anything but an ALONE unit"


class _Work:
    """The units left to run, in order: (Sharing, test IDs). An ALONE unit starts once only QUIET
    ones run, and while one runs or waits only QUIET ones start."""

    def __init__(self, units):
        self.pending = list(units)
        self._running = []
        self._changed = threading.Condition()

    def _may_start(self, unit):
        sharing = unit[0]
        if sharing is Sharing.ALONE:
            return all(other is Sharing.QUIET for other, _ in self._running)
        if sharing is Sharing.SHARED:
            return not any(other is Sharing.ALONE for other, _ in self._running + self.pending)
        return True

    def _next(self):
        return next((unit for unit in self.pending if self._may_start(unit)), None)

    def take(self):
        with self._changed:
            self._changed.wait_for(lambda: not self.pending or self._next() is not None)
            if not self.pending:
                return None
            unit = self._next()
            self.pending.remove(unit)
            self._running.append(unit)
            return unit

    def done(self, unit):
        with self._changed:
            self._running.remove(unit)
            self._changed.notify_all()


class _Child:
    """One child process running whole classes for _ParallelSuite."""
    alive = set()

    def __init__(self):
        read_end, write_end = os.pipe()
        self.log = tempfile.TemporaryFile()
        env = {**os.environ, _CHILD_ENV: "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"import test_cares; test_cares._child_main({write_end})"],
            cwd=HERE, env=env, stdin=subprocess.PIPE, stdout=self.log, stderr=self.log, text=True,
            pass_fds=(write_end,), start_new_session=True)  # its own process group: killpg ends all it started
        os.close(write_end)
        _Child.alive.add(self)
        self.results = os.fdopen(read_end, "r", encoding="utf-8")
        self._buffer = ""

    def _line(self, deadline):
        """The next line from the child, or None when it exits or the deadline passes."""
        import select
        fd = self.results.fileno()
        while "\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk.decode("utf-8")
        line, self._buffer = self._buffer.split("\n", 1)
        return json.loads(line)

    def run_class(self, ids, replay):
        """Run one class's tests; False if the child crashed or overran (its unfinished tests fail)."""
        deadline = time.monotonic() + CLASS_TIMEOUT_S
        try:
            self.process.stdin.write(json.dumps(ids) + "\n")
            self.process.stdin.flush()
        except OSError:
            pass
        finished, current = set(), None
        while True:
            event = self._line(deadline)
            if event is None:
                break
            if event["event"] == "done":
                if TIMING:
                    label = ids[0].split(".", 1)[1] if len(ids) == 1 else ids[0].rsplit(".", 2)[1]
                    print(f"{label}: {event['seconds']:.1f} s wall, {event['cpu']:.1f} s CPU", file=sys.stderr)
                unfinished = [test_id for test_id in ids if test_id not in finished]
                for test_id in unfinished:  # not run at all: a child that lost them is a failure
                    replay.put([{"event": "start", "id": test_id},
                                {"event": "error", "id": test_id,
                                 "text": "the child process finished its class without running this test\n"},
                                {"event": "stop", "id": test_id}])
                return True
            if event["event"] == "start":
                current = [event]
            elif current is not None and event["id"] == current[0]["id"]:
                current.append(event)
                if event["event"] == "stop":
                    finished.add(event["id"])
                    replay.put(current)
                    current = None
            else:  # outside any test: setUpClass, tearDownClass, module fixtures
                replay.put([event])
        overran = self.process.poll() is None
        self._end_group()
        self.log.seek(0, os.SEEK_END)
        self.log.seek(max(0, self.log.tell() - 4000))
        tail = self.log.read().decode(errors="replace")
        self.close()
        why = (f"the child process running it was still busy after {CLASS_TIMEOUT_S} s and was killed"
               if overran else f"the child process running it exited with code {self.process.returncode}")
        for test_id in ids:
            if test_id in finished:
                continue
            events = current if current is not None and current[0]["id"] == test_id else [{"event": "start", "id": test_id}]
            replay.put([*events, {"event": "error", "id": test_id, "text": f"{why}; the end of its output:\n{tail}"},
                        {"event": "stop", "id": test_id}])
        return False

    def kill(self):
        """The child and everything left in its process group, now."""
        if self in _Child.alive:
            self._end_group()
            self.close()

    def _end_group(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def close(self):
        """End of work: the child exits once its stdin closes (killed if it does not)."""
        if self not in _Child.alive:
            return
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(CLASS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        _Child.alive.discard(self)
        self.results.close()
        self.log.close()


def load_tests(loader, standard_tests, pattern):
    for name in [*EXCLUSIVE, *QUIET, *CLASS_COST_S, *TEST_COST_S, *SPLIT]:  # the tables name tests and classes that exist
        class_name, _, test_name = name.partition(".")
        assert hasattr(globals()[class_name], test_name or "run"), name
    if JOBS <= 1 or os.environ.get(_CHILD_ENV):
        return standard_tests
    return _ParallelSuite([standard_tests])


if __name__ == "__main__":
    unittest.main()
