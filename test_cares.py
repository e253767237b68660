"""Tests for cares: run with `python -m unittest test_cares`.

Everything network-facing uses real gRPC servers and clients on 127.0.0.1 with
ports the OS picks, real psutil and real threads or processes. Every wait is
bounded and every process is killed on cleanup.
"""

import importlib.metadata
import importlib.util
import json
import os
import glob
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import unittest
import zipfile
import zipimport
from unittest import mock

import cares  # first: it quiets gRPC's C-core logging before grpc is imported
import grpc
import cluster_pb2 as pb
import cluster_pb2_grpc as pb_grpc
from asciimatics.event import KeyboardEvent
from asciimatics.exceptions import NextScene, StopApplication
from asciimatics.scene import Scene
from asciimatics.screen import Canvas, Screen
from pyz import bootstrap as pyz_bootstrap, build as pyz_build

HERE = os.path.dirname(os.path.abspath(__file__))
CARES_PY = os.path.join(HERE, "cares.py")
# Under CI, anything a test needs must be there: a missing tool fails instead of skipping.
IN_CI = os.environ.get("CARES_CI") == "1"


def wait_until(predicate, timeout, interval=0.02):
    """Poll predicate until true; return seconds waited, or None on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    return None


def status_of(registry, node_id):
    node = registry.get(node_id)
    return node.status if node is not None else None


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class FixedSampler(cares.LocalSampler):
    """A worker's sampler that reports chosen values, so a test can follow them end to end."""

    def __init__(self, cpu, memory):
        super().__init__()
        self.cpu, self.memory = cpu, memory

    def sample(self):
        return cares.LocalSample(self.cpu, self.memory, int(self.memory * 1e7), 10**9)


class ClusterTestCase(unittest.TestCase):
    """Helpers to start in-process orchestrators and workers that clean up after themselves."""

    def start_orchestrator(self, listen="127.0.0.1:0", **options):
        orchestrator = cares.Orchestrator(listen, **options)
        orchestrator.start()
        self.addCleanup(orchestrator.stop, 0.2)
        return orchestrator

    def start_worker(self, orchestrator, node_id, sampler=None, port=None):
        client = cares.WorkerClient(f"127.0.0.1:{port or orchestrator.port}", node_id,
                                    sampler or cares.LocalSampler())
        client.start()
        self.addCleanup(client.stop, False, 0.5)
        return client

    def assert_streaming(self, registry, node_id, timeout=10):
        """Wait until the node has joined and its heartbeat stream is open."""
        self.assertIsNotNone(wait_until(lambda: (registry.get(node_id) or cares.Node("", "")).streaming,
                                        timeout), f"{node_id} never opened its heartbeat stream")

    def assert_becomes(self, registry, node_id, status, timeout):
        waited = wait_until(lambda: status_of(registry, node_id) == status, timeout)
        self.assertIsNotNone(waited, f"{node_id} not {status} within {timeout} s "
                                     f"(is {status_of(registry, node_id)})")
        return waited

    def spawn(self, *args, **kwargs):
        process = subprocess.Popen([sys.executable, CARES_PY, *args], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)

        def reap():
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=10)
        self.addCleanup(reap)
        return process


# ---------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------

class PureFunctionTest(unittest.TestCase):
    def test_bar_text_in_unicode_and_ascii(self):
        self.assertEqual(cares.bar_text(0, 10), " " * 10)
        self.assertEqual(cares.bar_text(100, 10), "█" * 10)
        self.assertEqual(cares.bar_text(37.5, 10), "███▊      ")
        self.assertEqual(cares.bar_text(37.5, 8, unicode=False), "|||     ")
        self.assertEqual(cares.bar_text(0, 4, unicode=False), "    ")
        self.assertEqual(cares.bar_text(100, 4, unicode=False), "||||")
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

    def test_clamp_and_validate_percent(self):
        self.assertEqual(cares.clamp_percent(-3), 0.0)
        self.assertEqual(cares.clamp_percent(101), 100.0)
        self.assertEqual(cares.clamp_percent(float("nan")), 0.0)
        self.assertEqual(cares.clamp_percent(float("-inf")), 0.0)
        self.assertEqual(cares.clamp_percent(42.5), 42.5)
        for good in (0, 0.1, 50, 100):
            self.assertTrue(cares.is_valid_percent(good), good)
        for bad in (-0.1, 100.1, float("nan"), float("inf"), float("-inf")):
            self.assertFalse(cares.is_valid_percent(bad), bad)

    def test_parse_address_accepts(self):
        cases = {
            "127.0.0.1:50051": ("127.0.0.1", 50051),
            " example.com:1 ": ("example.com", 1),
            "[::1]:50051": ("::1", 50051),
            "[fd00::5]:65535": ("fd00::5", 65535),
            "my-host.local.:8080": ("my-host.local.", 8080),
            "localhost:50051": ("localhost", 50051),
        }
        for text, expected in cases.items():
            self.assertEqual(cares.parse_address(text), expected, text)
        self.assertEqual(cares.parse_address("[::]:0", allow_port_zero=True), ("::", 0))

    def test_parse_address_rejects_with_a_reason(self):
        bad = ["", "   ", "127.0.0.1", "127.0.0.1:", ":50051", "::1:50051", "[::1]50051", "[::1:5",
               "[nothex]:1", "host:0", "host:65536", "host:-1", "host:5e3", "host:١٢", "bad_host:1",
               "-lead.example:1", "256.1.1.1:1", "1.2.3:1", "exa mple:1", "ünïcode.host:1",
               "a" * 400 + ":1", "host:port", "\x1b[31m:1"]
        for text in bad:
            with self.assertRaises(ValueError, msg=repr(text)) as caught:
                cares.parse_address(text)
            message = str(caught.exception)
            self.assertTrue(message and "\n" not in message and "\x1b" not in message, repr(message))

    def test_parse_address_fuzz_never_raises_anything_but_value_error(self):
        rng = random.Random(1234)
        alphabet = "0123456789abcdef:[].-_ \t\x00\x1b\u202eé٣"
        for _ in range(3000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            try:
                host, port = cares.parse_address(text)
            except ValueError:
                continue
            self.assertTrue(1 <= port <= 65535)
            self.assertEqual(cares.parse_address(cares.format_address(host, port)), (host, port))

    def test_node_id_rules(self):
        for good in ("a", "web-01", "node_1.prod", "x" * 63):
            self.assertTrue(cares.is_valid_node_id(good), good)
        for bad in ("", "x" * 64, "has space", "tab\t", "ünï", "a/b", "\x1b[2J", "a\nb"):
            self.assertFalse(cares.is_valid_node_id(bad), bad)

    def test_default_node_id_is_valid_and_unique(self):
        ids = {cares.default_node_id("web01.example.com") for _ in range(20)}
        self.assertEqual(len(ids), 20)
        for node_id in ids:
            self.assertTrue(node_id.startswith("web01-"), node_id)
            self.assertTrue(cares.is_valid_node_id(node_id))
        for odd in ("", "....", "ünïcode host!", "x" * 300):
            self.assertTrue(cares.is_valid_node_id(cares.default_node_id(odd)), odd)

    def test_sanitize_text_strips_terminal_controls(self):
        hostile = "ok\x1b[2J\x1b]0;pwned\x07\r\n\t\u202eevil\u200b\x00end"
        clean = cares.sanitize_text(hostile)
        for char in clean:
            self.assertNotIn(cares.unicodedata.category(char), {"Cc", "Cf"}, repr(clean))
        self.assertTrue(clean.startswith("ok?[2J?]0;pwned?"), clean)
        self.assertEqual(len(cares.sanitize_text("x" * 10_000, 64)), 64)
        self.assertTrue(cares.sanitize_text("x" * 100, 10).endswith("…"))
        self.assertEqual(cares.sanitize_text("plain-host_1.lan"), "plain-host_1.lan")

    def test_peer_to_address(self):
        self.assertEqual(cares.peer_to_address("ipv4:10.0.0.5:4242"), "10.0.0.5:4242")
        self.assertEqual(cares.peer_to_address("ipv6:[::1]:4242"), "[::1]:4242")
        self.assertEqual(cares.peer_to_address("unix:/tmp/x\x1b"), "unix:/tmp/x?")

    def test_formatting_helpers(self):
        self.assertEqual(cares.format_age(0.2), "now")
        self.assertEqual(cares.format_age(2.7), "2s ago")
        self.assertEqual(cares.format_age(125), "2m ago")
        self.assertEqual(cares.format_age(7300), "2h ago")
        self.assertEqual(cares.format_age(-5), "now")
        self.assertEqual(cares.format_bytes(512), "512 B")
        self.assertEqual(cares.format_bytes(3 * 1024**3), "3.0 GiB")
        self.assertEqual(cares.fit("abcdef", 4), "abc…")
        self.assertEqual(cares.fit("ab", 4), "ab  ")
        self.assertEqual(cares.sparkline([0, 50, 100], 5), "  ▁▄█")
        self.assertEqual(cares.sparkline(range(100), 3, unicode=False), "###")

    def test_history_keeps_one_point_per_period(self):
        history, last_at = cares.collections.deque(maxlen=3), 0.0
        for value, now in ((1, 10.0), (2, 10.5), (3, 11.0), (4, 12.0), (5, 13.0), (6, 13.1)):
            last_at = cares.add_to_history(history, last_at, value, now, 1.0)
        self.assertEqual(list(history), [3, 4, 6])
        self.assertEqual(last_at, 13.0)

    def test_backoff_grows_and_is_capped(self):
        rng = random.Random(7)
        delays = [cares.backoff_delay(failures, rng) for failures in range(12)]
        self.assertTrue(0.25 <= delays[0] <= 0.5, delays)
        self.assertTrue(all(delay <= cares.MAX_BACKOFF_S for delay in delays), delays)
        self.assertGreaterEqual(delays[-1], cares.MAX_BACKOFF_S / 2)

    def test_join_addresses_lists_interfaces_for_wildcards(self):
        entry = cares.collections.namedtuple("snicaddr", "family address")
        interfaces = {"lo": [entry(socket.AF_INET, "127.0.0.1")],
                      "eth0": [entry(socket.AF_INET, "10.0.0.5"), entry(socket.AF_INET6, "fe80::1")]}
        self.assertEqual(cares.join_addresses("::", 50051, interfaces), ["10.0.0.5:50051", "127.0.0.1:50051"])
        self.assertEqual(cares.join_addresses("10.1.1.1", 7, interfaces), ["10.1.1.1:7"])
        self.assertEqual(cares.join_addresses("::", 7, {"eth0": [entry(socket.AF_INET6, "fd00::1")]}), ["[::]:7"])

    def test_status_table(self):
        rows = [{"node_id": "w1", "address": "1.2.3.4:5", "status": "Active", "cpu_percent": 12.5,
                 "memory_percent": 40.0, "last_seen": 1000.0},
                {"node_id": "w2", "address": "1.2.3.4:6", "status": "Active", "cpu_percent": None,
                 "memory_percent": None, "last_seen": None}]
        table = cares.format_status_table(rows, now=1003.0)
        self.assertIn("w1", table)
        self.assertRegex(table, r"w2 .* Active +\? +\?  \?")
        self.assertIn("12.5%", table)
        self.assertIn("3s ago", table)
        self.assertIn("no workers", cares.format_status_table([]))


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


# ---------------------------------------------------------------------------
# NodeRegistry
# ---------------------------------------------------------------------------

class NodeRegistryTest(unittest.TestCase):
    def test_join_update_disconnect_and_events(self):
        registry = cares.NodeRegistry()
        session = registry.join("xyz-123", "10.0.0.9:4000", hostname="web")
        self.assertIsNone(registry.attach_stream("xyz-123", session))
        self.assertTrue(registry.update("xyz-123", session, cpu_percent=12.5, memory_percent=40.0, sequence=1))
        node = registry.get("xyz-123")
        self.assertEqual((node.status, node.cpu_usage, node.memory_usage, node.address),
                         (cares.ACTIVE, 12.5, 40.0, "10.0.0.9:4000"))
        self.assertEqual(list(node.cpu_history), [12.5])
        self.assertAlmostEqual(node.last_seen, time.time(), delta=2)
        self.assertTrue(registry.disconnect("xyz-123", session, "gone"))
        self.assertEqual(status_of(registry, "xyz-123"), cares.DISCONNECTED)
        self.assertFalse(registry.update("xyz-123", session, cpu_percent=1, memory_percent=1, sequence=2))
        second = registry.join("xyz-123", "10.0.0.9:4001")
        self.assertNotEqual(second, session)
        self.assertFalse(registry.disconnect("xyz-123", session, "stale stream ending"))
        texts = [event.text for event in registry.events.tail(10)]
        self.assertEqual(texts, ["Node 'xyz-123' has joined the cluster.",
                                 "Node 'xyz-123' lost: gone.",
                                 "Node 'xyz-123' has rejoined the cluster."])

    def test_live_stream_blocks_duplicate_join_and_second_stream(self):
        registry = cares.NodeRegistry()
        session = registry.join("a", "x")
        self.assertIsNone(registry.attach_stream("a", session))
        self.assertEqual(registry.attach_stream("a", session), grpc.StatusCode.FAILED_PRECONDITION)
        self.assertEqual(registry.attach_stream("a", "forged"), grpc.StatusCode.PERMISSION_DENIED)
        with self.assertRaises(cares.JoinRefused) as caught:
            registry.join("a", "y")
        self.assertEqual(caught.exception.code, grpc.StatusCode.ALREADY_EXISTS)
        self.assertIn("already connected", caught.exception.message)
        self.assertIn("rejected", registry.events.tail(1)[0].text)

    def test_bad_samples_are_dropped_and_logged_sparingly(self):
        registry = cares.NodeRegistry()
        session = registry.join("a", "x")
        registry.update("a", session, cpu_percent=10, memory_percent=20, sequence=5)
        bad = [dict(cpu_percent=float("nan"), memory_percent=1, sequence=6),
               dict(cpu_percent=1, memory_percent=float("inf"), sequence=7),
               dict(cpu_percent=-1, memory_percent=1, sequence=8),
               dict(cpu_percent=101, memory_percent=1, sequence=9),
               dict(cpu_percent=1, memory_percent=1, sequence=5)]
        for _ in range(4):
            for sample in bad:
                self.assertTrue(registry.update("a", session, **sample))
        node = registry.get("a")
        self.assertEqual((node.cpu_usage, node.memory_usage, node.dropped_samples), (10, 20, 20))
        warnings = [e.text for e in registry.events.tail(100) if e.level == "WARN"]
        self.assertEqual(len(warnings), 2, warnings)  # the 1st and the 10th drop
        self.assertIn("10 dropped", warnings[1])

    def test_flood_keeps_latest_without_growing_history(self):
        registry = cares.NodeRegistry(heartbeat_interval=1.0)
        session = registry.join("a", "x")
        for sequence in range(1, 5001):
            registry.update("a", session, cpu_percent=sequence % 100, memory_percent=1, sequence=sequence)
        node = registry.get("a")
        self.assertEqual(node.cpu_usage, 5000 % 100)
        self.assertEqual(list(node.cpu_history), [5000 % 100])

    def test_history_is_bounded(self):
        registry = cares.NodeRegistry(heartbeat_interval=0.0)
        session = registry.join("a", "x")
        for sequence in range(1, 200):
            registry.update("a", session, cpu_percent=1, memory_percent=1, sequence=sequence)
        self.assertEqual(len(registry.get("a").cpu_history), cares.HISTORY_SAMPLES)

    def test_expire_marks_silent_nodes(self):
        registry = cares.NodeRegistry(heartbeat_interval=0.1)
        quiet = registry.join("quiet", "x")
        chatty = registry.join("chatty", "y")
        time.sleep(0.4)
        registry.update("chatty", chatty, cpu_percent=1, memory_percent=1, sequence=1)
        self.assertEqual(registry.expire(), [("quiet", quiet)])
        self.assertEqual(status_of(registry, "chatty"), cares.ACTIVE)
        self.assertIn("no heartbeat for 0.3 s", registry.events.tail(1)[0].text)

    def test_full_registry_evicts_disconnected_then_refuses(self):
        registry = cares.NodeRegistry(max_nodes=2)
        first = registry.join("a", "x")
        registry.join("b", "x")
        registry.disconnect("a", first, "gone")
        registry.join("c", "x")
        self.assertIsNone(registry.get("a"))
        with self.assertRaises(cares.JoinRefused) as caught:
            registry.join("d", "x")
        self.assertEqual(caught.exception.code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertEqual(len(registry), 2)

    def test_event_log_is_bounded(self):
        log = cares.EventLog(size=5)
        for number in range(50):
            log.add("INFO", str(number))
        self.assertEqual([event.text for event in log.tail(100)], ["45", "46", "47", "48", "49"])
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
                    if action < 0.2:
                        try:
                            session = registry.join(node_id, "x")
                            registry.attach_stream(node_id, session)
                        except cares.JoinRefused:
                            pass
                    elif action < 0.6:
                        node = registry.get(node_id)
                        if node is not None:
                            registry.update(node_id, node.session_id, cpu_percent=rng.random() * 100,
                                            memory_percent=50, sequence=step + 1)
                    elif action < 0.75:
                        node = registry.get(node_id)
                        if node is not None:
                            registry.disconnect(node_id, node.session_id, "test")
                    elif action < 0.85:
                        registry.expire()
                    else:
                        for node in registry.snapshot():
                            self.assertTrue(0 <= node.cpu_usage <= 100)
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
            self.assertIn(node.status, (cares.ACTIVE, cares.DISCONNECTED))
            self.assertLessEqual(len(node.cpu_history), cares.HISTORY_SAMPLES)
        self.assertLessEqual(len(registry.events.tail(10_000)), cares.EVENT_LOG_SIZE)


# ---------------------------------------------------------------------------
# Orchestrator and worker over real gRPC on loopback
# ---------------------------------------------------------------------------

class ClusterTest(ClusterTestCase):
    def test_join_and_heartbeat_update_the_registry(self):
        orchestrator = self.start_orchestrator()
        registry = orchestrator.registry
        client = self.start_worker(orchestrator, "w1", FixedSampler(12.5, 40.0))
        self.assert_becomes(registry, "w1", cares.ACTIVE, 5)
        self.assertIsNotNone(wait_until(lambda: registry.get("w1").cpu_usage == 12.5, 5))
        node = registry.get("w1")
        self.assertEqual(node.memory_usage, 40.0)
        self.assertTrue(node.address.startswith("127.0.0.1:"), node.address)
        self.assertEqual(node.hostname, socket.gethostname()[:64])
        self.assertEqual(client.state.phase, "connected")
        seen = node.last_seen
        self.assertIsNotNone(wait_until(lambda: registry.get("w1").last_seen > seen, 3))
        self.assertIn("Node 'w1' has joined the cluster.", [e.text for e in registry.events.tail(5)])

    def test_four_workers_update_independently(self):
        orchestrator = self.start_orchestrator()
        registry = orchestrator.registry
        samplers = {f"w{n}": FixedSampler(10.0 * n, 5.0 * n) for n in range(1, 5)}
        for node_id, sampler in samplers.items():
            self.start_worker(orchestrator, node_id, sampler)
        for node_id in samplers:
            self.assert_becomes(registry, node_id, cares.ACTIVE, 5)
        samplers["w3"].cpu = 99.0

        def values():
            return {node.node_id: (node.cpu_usage, node.memory_usage) for node in registry.snapshot()}
        expected = {"w1": (10.0, 5.0), "w2": (20.0, 10.0), "w3": (99.0, 15.0), "w4": (40.0, 20.0)}
        self.assertIsNotNone(wait_until(lambda: values() == expected, 5), values())

    def test_real_worker_reports_this_machines_metrics(self):
        orchestrator = self.start_orchestrator()
        self.start_worker(orchestrator, "real")
        self.assertIsNotNone(wait_until(lambda: (orchestrator.registry.get("real") or
                                                 cares.Node("", "")).memory_usage > 0, 5))
        node = orchestrator.registry.get("real")
        self.assertAlmostEqual(node.memory_usage, cares.psutil.virtual_memory().percent, delta=5)
        self.assertTrue(0.0 <= node.cpu_usage <= 100.0)

    def test_killed_worker_is_disconnected_within_a_second(self):
        orchestrator = self.start_orchestrator()
        worker = self.spawn("worker", f"127.0.0.1:{orchestrator.port}", "--node-id", "victim", "--headless")
        self.assert_streaming(orchestrator.registry, "victim")
        worker.kill()
        waited = self.assert_becomes(orchestrator.registry, "victim", cares.DISCONNECTED, 1.0)
        print(f"\n  killed worker -> Disconnected in {waited:.3f} s", file=sys.stderr)
        self.assertIn("lost", orchestrator.registry.events.tail(1)[0].text)

    def test_worker_killed_before_its_first_sample_is_disconnected_at_once(self):
        orchestrator = self.start_orchestrator()
        script = (
            "import sys, time, grpc, cares, cluster_pb2 as pb, cluster_pb2_grpc as pb_grpc\n"
            "stub = pb_grpc.ClusterServiceStub(grpc.insecure_channel(sys.argv[1]))\n"
            "ack = stub.JoinCluster(pb.NodeInfo(node_id='early'), timeout=5)\n"
            "metadata = ((cares.NODE_METADATA_KEY, 'early'), (cares.SESSION_METADATA_KEY, ack.session_id))\n"
            "replies = stub.Heartbeat(iter(lambda: time.sleep(60), 0), metadata=metadata)\n"
            "next(replies)\n")
        process = subprocess.Popen([sys.executable, "-c", script, f"127.0.0.1:{orchestrator.port}"], cwd=HERE,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.kill)
        self.assert_streaming(orchestrator.registry, "early")
        self.assertEqual(orchestrator.registry.get("early").last_sequence, 0)
        process.kill()
        self.assert_becomes(orchestrator.registry, "early", cares.DISCONNECTED, 1.0)

    def test_silent_worker_is_disconnected_after_three_intervals(self):
        orchestrator = self.start_orchestrator()
        registry = orchestrator.registry
        channel = grpc.insecure_channel(f"127.0.0.1:{orchestrator.port}")
        self.addCleanup(channel.close)
        stub = pb_grpc.ClusterServiceStub(channel)
        ack = stub.JoinCluster(pb.NodeInfo(node_id="mute"), timeout=5)
        release = threading.Event()
        self.addCleanup(release.set)

        def one_sample_then_silence():
            yield pb.NodeMetrics(node_id="mute", session_id=ack.session_id, cpu_percent=1,
                                 memory_percent=1, sequence=1)
            release.wait(15)

        replies = stub.Heartbeat(one_sample_then_silence(), timeout=15, metadata=(
            (cares.NODE_METADATA_KEY, "mute"), (cares.SESSION_METADATA_KEY, ack.session_id)))
        self.assert_becomes(registry, "mute", cares.ACTIVE, 2)
        self.assertIsNotNone(wait_until(lambda: registry.get("mute").last_sequence == 1, 2))
        started = time.monotonic()
        bound = cares.MISSED_HEARTBEATS * registry.heartbeat_interval + 1.0
        self.assert_becomes(registry, "mute", cares.DISCONNECTED, bound)
        print(f"\n  silent worker -> Disconnected after {time.monotonic() - started:.2f} s "
              f"(bound {bound:.1f} s)", file=sys.stderr)
        with self.assertRaises(grpc.RpcError) as caught:
            list(replies)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)

    def test_worker_rejoins_after_orchestrator_restart_on_same_port(self):
        first = cares.Orchestrator("127.0.0.1:0")
        first.start()
        port = first.port
        client = self.start_worker(first, "phoenix", port=port)
        self.assert_streaming(first.registry, "phoenix")
        first.stop(0.2)
        self.assertIsNotNone(wait_until(lambda: client.state.phase == "retrying", 3))
        self.assertIn("Disconnected: the orchestrator is shutting down; retrying.",
                      [event.text for event in client.events.tail(5)])
        second = self.start_orchestrator(f"127.0.0.1:{port}")
        waited = self.assert_becomes(second.registry, "phoenix", cares.ACTIVE, 6)
        print(f"\n  orchestrator restart -> worker Active again in {waited:.2f} s", file=sys.stderr)

    def test_duplicate_live_node_id_is_refused(self):
        orchestrator = self.start_orchestrator()
        self.start_worker(orchestrator, "twin")
        self.assert_streaming(orchestrator.registry, "twin")
        with grpc.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
            with self.assertRaises(grpc.RpcError) as caught:
                pb_grpc.ClusterServiceStub(channel).JoinCluster(pb.NodeInfo(node_id="twin"), timeout=5)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.ALREADY_EXISTS)
        self.assertIn("already connected", caught.exception.details())

    def test_second_worker_with_same_id_keeps_retrying_and_takes_over_when_free(self):
        orchestrator = self.start_orchestrator()
        first = self.start_worker(orchestrator, "same")
        self.assert_streaming(orchestrator.registry, "same")
        second = self.start_worker(orchestrator, "same")
        self.assertIsNotNone(wait_until(lambda: second.state.phase == "retrying", 5))
        self.assertIn("ALREADY_EXISTS", second.state.detail)
        first.stop()
        self.assertIsNotNone(wait_until(lambda: second.state.phase == "connected", 8))

    def test_goodbye_is_logged_as_left(self):
        orchestrator = self.start_orchestrator()
        client = self.start_worker(orchestrator, "polite")
        self.assert_streaming(orchestrator.registry, "polite")
        client.stop()
        self.assert_becomes(orchestrator.registry, "polite", cares.DISCONNECTED, 2)
        texts = [event.text for event in orchestrator.registry.events.tail(5)]
        self.assertIn("Node 'polite' has left the cluster.", texts)
        self.assertFalse(any("lost" in text for text in texts), texts)
        self.assertEqual(client.state.phase, "stopped")

    def test_worker_obeys_a_new_heartbeat_interval(self):
        orchestrator = self.start_orchestrator()
        client = self.start_worker(orchestrator, "tempo")
        self.assert_streaming(orchestrator.registry, "tempo")
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
        self.assertIsNotNone(wait_until(lambda: client.state.phase == "retrying", 5))
        state = client.state
        self.assertIn("unreachable", state.detail)
        self.assertTrue(state.describe().startswith("retrying in "), state.describe())
        self.assertLessEqual(state.retry_at - time.monotonic(), cares.MAX_BACKOFF_S)

    def test_heartbeat_without_join_is_refused(self):
        orchestrator = self.start_orchestrator()
        with grpc.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
            stub = pb_grpc.ClusterServiceStub(channel)
            replies = stub.Heartbeat(iter([pb.NodeMetrics(node_id="ghost", session_id="made-up")]), timeout=5)
            with self.assertRaises(grpc.RpcError) as caught:
                list(replies)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        self.assertIsNone(orchestrator.registry.get("ghost"))

    def test_port_in_use_is_a_clear_start_error(self):
        orchestrator = self.start_orchestrator()
        with self.assertRaises(cares.StartError) as caught:
            cares.Orchestrator(f"127.0.0.1:{orchestrator.port}").start()
        self.assertIn(f"port {orchestrator.port} is already in use", str(caught.exception))


# ---------------------------------------------------------------------------
# The command line, as separate processes
# ---------------------------------------------------------------------------

class CommandLineTest(ClusterTestCase):
    def run_cares(self, *args, timeout=20):
        return subprocess.run([sys.executable, CARES_PY, *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def assert_one_line_error(self, result, code):
        self.assertEqual(result.returncode, code, result)
        self.assertNotIn("Traceback", result.stderr)
        self.assertNotIn("Traceback", result.stdout)

    def test_version_and_help(self):
        result = self.run_cares("--version")
        self.assertEqual((result.returncode, result.stdout.strip()), (0, f"cares {cares.VERSION}"))
        result = self.run_cares("--help")
        self.assertEqual(result.returncode, 0)
        for command in ("orchestrator", "worker", "status"):
            self.assertIn(command, result.stdout)

    def test_no_arguments_without_a_terminal_is_a_usage_error(self):
        result = self.run_cares()
        self.assert_one_line_error(result, 2)
        self.assertIn("usage:", result.stderr)

    def test_usage_errors_exit_2_without_traceback(self):
        for args in (["worker", "nohost"], ["worker", "[::1]:99999"], ["worker", "h:1", "--node-id", "bad id"],
                     ["orchestrator", "--listen", "1.2.3.4"], ["status"], ["bogus"],
                     ["orchestrator", "--max-nodes", "0"]):
            result = self.run_cares(*args)
            self.assert_one_line_error(result, 2)
            self.assertIn("error:", result.stderr, args)

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
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.assertIn("unreachable", result.stderr)

    def test_status_json_shows_what_each_worker_sent(self):
        orchestrator = self.start_orchestrator()
        sent = {f"exact-{n}": (11.0 * n, 7.5 * n) for n in range(1, 5)}
        for node_id, (cpu, memory) in sent.items():
            self.start_worker(orchestrator, node_id, FixedSampler(cpu, memory))
        self.assertIsNotNone(wait_until(
            lambda: all((orchestrator.registry.get(n) or cares.Node("", "")).cpu_usage == v[0]
                        for n, v in sent.items()), 5))
        result = self.run_cares("status", f"127.0.0.1:{orchestrator.port}", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        nodes = {node["node_id"]: node for node in json.loads(result.stdout)["nodes"]}
        self.assertEqual(set(nodes), set(sent))
        for node_id, (cpu, memory) in sent.items():
            node = nodes[node_id]
            self.assertEqual((node["status"], node["cpu_percent"], node["memory_percent"]),
                             ("Active", cpu, memory))
            self.assertAlmostEqual(node["last_seen"], time.time(), delta=5)
            self.assertEqual(set(node), {"node_id", "address", "status", "cpu_percent", "memory_percent",
                                         "last_seen", "hostname", "joined_at"})
            self.assertEqual(node["hostname"], socket.gethostname()[:cares.HOSTNAME_LIMIT])
            self.assertLessEqual(node["joined_at"], node["last_seen"])

    def test_headless_orchestrator_and_four_headless_workers(self):
        port = free_port()
        address = f"127.0.0.1:{port}"
        orchestrator = self.spawn("orchestrator", "--listen", address, "--headless")
        workers = [self.spawn("worker", address, "--node-id", f"proc-{n}", "--headless") for n in range(4)]

        def nodes():
            result = self.run_cares("status", address, "--json", "--timeout", "2")
            return json.loads(result.stdout)["nodes"] if result.returncode == 0 else []
        self.assertIsNotNone(wait_until(
            lambda: len([n for n in nodes() if n["status"] == "Active" and n["memory_percent"] > 0]) == 4,
            20, interval=0.3))
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


# ---------------------------------------------------------------------------
# The TUI: pure layout helpers, then scenes on a mock Screen with a real Canvas
# (asciimatics' own widget-test pattern), then the real thing in tmux.
# ---------------------------------------------------------------------------

def make_node(node_id, cpu=10.0, memory=20.0, status=cares.ACTIVE, last_seen=None):
    node = cares.Node(node_id=node_id, address="10.0.0.1:4000", status=status, cpu_usage=cpu,
                      memory_usage=memory, last_seen=time.time() if last_seen is None else last_seen)
    node.cpu_history.extend([cpu] * 5)
    return node


def table_width(layout):
    """Cells the table takes: its shown columns and one space between each."""
    columns = [layout.node_id, layout.address, layout.status, layout.bar + layout.PERCENT,
               layout.bar + layout.PERCENT, layout.spark, layout.seen]
    shown = [column for column in columns if column]
    return sum(shown) + len(shown) - 1


class TableLayoutTest(unittest.TestCase):
    def test_layout_fits_every_width(self):
        for width in range(cares.MIN_WIDTH, 320):
            layout = cares.table_layout(width)
            self.assertLessEqual(table_width(layout), width, (width, layout))
            self.assertGreaterEqual(layout.bar, 4)
            self.assertEqual(len(cares.table_header(layout, "n", False)), table_width(layout))
        self.assertEqual(cares.table_layout(80).address, 0)
        self.assertEqual(cares.table_layout(120).spark, 0)
        self.assertGreater(cares.table_layout(200).spark, 0)

    def test_row_has_the_layout_width_and_truncates_long_ids(self):
        layout = cares.table_layout(160)
        node = make_node("n" * 63, cpu=37.5, memory=90.0)
        segments = cares.node_row(node, layout, time.time())
        text = "".join(part for part, _ in segments)
        self.assertEqual(len(text), table_width(layout))
        self.assertTrue(text.startswith("n" * (layout.node_id - 1) + "…"), text)
        self.assertIn("37.5%", text)
        styles = [style for _, style in segments]
        self.assertEqual(styles[2:5], ["active", "low", "text"])
        self.assertIn("high", styles)  # memory at 90 %

    def test_disconnected_rows_are_dimmed_but_keep_last_values(self):
        layout = cares.table_layout(120)
        segments = cares.node_row(make_node("gone", cpu=70.0, status=cares.DISCONNECTED,
                                            last_seen=time.time() - 42), layout, time.time())
        text = "".join(part for part, _ in segments)
        self.assertIn("Disconnected", text)
        self.assertIn("70.0%", text)
        self.assertIn("42s ago", text)
        self.assertEqual({style for _, style in segments}, {"dim", "disconnected"})

    def test_fit_counts_wide_characters(self):
        self.assertEqual(cares.fit("節點節點", 5), "節點…")
        self.assertEqual(cares.display_width(cares.fit("節點節點", 5)), 5)
        self.assertEqual(cares.fit("節", 3), "節 ")

    def test_sorting_and_summary(self):
        nodes = [make_node("b", cpu=50, memory=10), make_node("a", cpu=90, memory=5),
                 make_node("c", cpu=10, memory=80, status=cares.DISCONNECTED)]
        ids = lambda key, reverse=False: [n.node_id for n in cares.sort_nodes(nodes, key, reverse)]
        self.assertEqual(ids("n"), ["a", "b", "c"])
        self.assertEqual(ids("c"), ["a", "b", "c"])
        self.assertEqual(ids("m"), ["c", "b", "a"])
        self.assertEqual(ids("s"), ["a", "b", "c"])
        self.assertEqual(ids("n", True), ["c", "b", "a"])
        summary = cares.summarize(nodes)
        self.assertEqual((summary.active, summary.disconnected), (2, 1))
        self.assertEqual((summary.cpu_percent, summary.memory_percent), (70.0, 7.5))
        self.assertEqual(cares.summarize([]).cpu_percent, 0.0)

    def test_heartbeat_steps(self):
        self.assertEqual(cares.next_heartbeat_ms(1000, longer=True), 2000)
        self.assertEqual(cares.next_heartbeat_ms(1000, longer=False), 500)
        self.assertEqual(cares.next_heartbeat_ms(700, longer=False), 500)
        self.assertIsNone(cares.next_heartbeat_ms(5000, longer=True))
        self.assertIsNone(cares.next_heartbeat_ms(250, longer=False))


def make_canvas(width=120, height=40, unicode=True):
    screen = mock.MagicMock(spec=Screen, colours=8, unicode_aware=unicode)
    return Canvas(screen, height, width, 0, 0)


def render(frame):
    if frame.scene is None:
        Scene([frame], -1).reset()
    frame.update(0)
    canvas = frame.canvas
    return ["".join(chr(canvas.get_from(x, y)[0]) for x in range(canvas.width)) for y in range(canvas.height)]


def press(frame, *keys):
    for key in keys:
        frame.process_event(KeyboardEvent(ord(key) if isinstance(key, str) else key))


def type_text(frame, text):
    press(frame, *text)


def clear_field(frame):
    press(frame, Screen.KEY_END, *([Screen.KEY_BACK] * 40))


def line_with(lines, needle):
    return next((line for line in lines if needle in line), None)


class TuiSceneTest(ClusterTestCase):
    def assert_quits(self, frame, key):
        """The frame passes the key on, and Screen.play's handler for such keys quits."""
        event = frame.process_event(KeyboardEvent(ord(key) if isinstance(key, str) else key))
        self.assertIsNotNone(event, "the frame swallowed a quit key")
        with self.assertRaises(StopApplication):
            cares.quit_on_key(event)

    def make_app(self, **options):
        app = cares.TuiApp(**options)
        self.addCleanup(app.shutdown)
        return app

    def test_menu_navigation(self):
        app = self.make_app()
        frame = cares.MenuFrame(make_canvas(), app)
        lines = render(frame)
        self.assertIn("> [1] Create a new cluster (Orchestrator)", line_with(lines, "[1]"))
        self.assertNotIn(">", line_with(lines, "[2] Join an existing cluster (Worker)"))
        press(frame, Screen.KEY_DOWN)
        lines = render(frame)
        self.assertIn("> [2] Join an existing cluster (Worker)", line_with(lines, "[2]"))
        with self.assertRaises(NextScene) as caught:
            press(frame, 13)
        self.assertEqual((caught.exception.name, app.view), ("join", "join"))
        with self.assertRaises(NextScene) as caught:
            press(frame, "1")
        self.assertEqual((caught.exception.name, app.view), ("create", "create"))
        press(frame, Screen.KEY_UP, "z")
        self.assertEqual(app.menu_choice, 1)
        self.assert_quits(frame, "q")

    def test_join_form_validates_inline_and_stays_editable(self):
        app = self.make_app()
        frame = cares.AddressFrame(make_canvas(), app, "join")
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
            self.assertEqual(app.view, "selection")
            self.assertIsNone(app.worker)
        type_text(frame, "q")  # a letter for the field, not a quit
        self.assertIn("::1:5q", line_with(render(frame), "Orchestrator address"))
        self.assert_quits(frame, 3)
        with self.assertRaises(NextScene) as caught:
            press(frame, Screen.KEY_ESCAPE)
        self.assertEqual((caught.exception.name, app.forms["join"].address), ("selection", "::1:5q"))

    def test_join_form_fuzz_never_raises(self):
        app = self.make_app()
        frame = cares.AddressFrame(make_canvas(), app, "join")
        render(frame)
        rng = random.Random(99)
        keys = [ord(c) for c in "0123456789.:[]abc-_ "] + [0x202E, 0x1B, 0x200B, 0x7F, 0x10FFFF + 5,
                                                           Screen.KEY_LEFT, Screen.KEY_BACK, 9]
        for _ in range(300):
            clear_field(frame)
            press(frame, *(rng.choice(keys) for _ in range(rng.randint(0, 25))))
            try:
                press(frame, 13)
            except NextScene:
                app.shutdown()
                app.worker = None
                app.view = "join"
            for line in render(frame):
                for char in line:
                    self.assertNotIn(unicodedata.category(char), ("Cc", "Cf"), repr(line))

    def test_join_form_starts_a_worker_that_joins(self):
        orchestrator = self.start_orchestrator()
        app = self.make_app(node_id="from-form")
        frame = cares.AddressFrame(make_canvas(), app, "join")
        render(frame)
        clear_field(frame)
        type_text(frame, f"127.0.0.1:{orchestrator.port}")
        with self.assertRaises(NextScene) as caught:
            press(frame, 13)
        self.assertEqual((caught.exception.name, app.view), ("worker", "worker"))
        self.assert_becomes(orchestrator.registry, "from-form", cares.ACTIVE, 5)

    def test_create_form_starts_the_orchestrator_or_says_why_not(self):
        busy = self.start_orchestrator()
        app = self.make_app()
        frame = cares.AddressFrame(make_canvas(), app, "create")
        self.assertTrue(line_with(render(frame), "Listen address:").strip().endswith(" [::]:50051"))
        clear_field(frame)
        type_text(frame, f"127.0.0.1:{busy.port}")
        press(frame, 13)
        self.assertIn(f"port {busy.port} is already in use", "\n".join(render(frame)))
        self.assertIsNone(app.orchestrator)
        clear_field(frame)
        type_text(frame, "127.0.0.1:0")
        with self.assertRaises(NextScene) as caught:
            press(frame, 13)
        self.assertEqual(caught.exception.name, "orchestrator")
        self.assertGreater(app.orchestrator.port, 0)

    def dashboard(self, width=120, height=40):
        app = self.make_app()
        app.start_orchestrator("127.0.0.1:0")
        return app, cares.DashboardFrame(make_canvas(width, height), app)

    def test_dashboard_starts_empty_with_a_hint(self):
        app, frame = self.dashboard()
        lines = render(frame)
        self.assertIn(f"listening on 127.0.0.1:{app.orchestrator.port}", lines[0])
        self.assertIn("open cluster", lines[0])
        self.assertIn("Nodes: 0 active, 0 disconnected", lines[2])
        self.assertIsNotNone(line_with(lines, "Waiting for workers - join with: cares worker 127.0.0.1:"))
        self.assertIsNotNone(line_with(lines, "Orchestrator listening on 127.0.0.1:"))

    def test_dashboard_shows_the_registry_rows(self):
        app, frame = self.dashboard()
        registry = app.orchestrator.registry
        for number, cpu in ((1, 12.5), (2, 64.0), (3, 97.0)):
            session = registry.join(f"node-{number}", f"10.0.0.{number}:5000")
            registry.update(f"node-{number}", session, cpu_percent=cpu, memory_percent=50, sequence=1)
        registry.disconnect("node-2", registry.get("node-2").session_id, "test")
        lines = render(frame)
        row = line_with(lines, "node-1 ")
        self.assertIn("10.0.0.1:5000", row)
        self.assertIn("Active", row)
        self.assertIn("12.5%", row)
        self.assertIn("█", row)
        self.assertIn("Disconnected", line_with(lines, "node-2 "))
        self.assertIn("Nodes: 2 active, 1 disconnected", lines[2])
        self.assertIsNotNone(line_with(lines, "[INFO] Node 'node-3' has joined the cluster."))
        self.assertIsNotNone(line_with(lines, "[WARN] Node 'node-2' lost: test."))
        canvas = frame.canvas
        y = lines.index(line_with(lines, "node-3 "))
        x = lines[y].index("█")
        self.assertEqual(canvas.get_from(x, y)[1], Screen.COLOUR_RED)  # 97 % is red
        y = lines.index(line_with(lines, "node-1 "))
        self.assertEqual(canvas.get_from(lines[y].index("█"), y)[1], Screen.COLOUR_GREEN)

    def test_dashboard_sorts_and_scrolls_a_thousand_nodes(self):
        app, frame = self.dashboard()
        registry = app.orchestrator.registry
        for number in range(1000):
            session = registry.join(f"n{number:04d}", "x")
            registry.update(f"n{number:04d}", session, cpu_percent=number / 10, memory_percent=1, sequence=1)
        lines = render(frame)
        header = line_with(lines, "NODE ID")
        rows = int(header.split(" of ")[0].split("-")[-1])
        self.assertTrue(header.rstrip().endswith(f"1-{rows} of 1000"), header)
        self.assertIsNotNone(line_with(lines, "n0000 "))
        press(frame, Screen.KEY_PAGE_DOWN)
        lines = render(frame)
        self.assertIsNone(line_with(lines, "n0000 "))
        self.assertIn(f"{rows}-", line_with(lines, "NODE ID"))
        press(frame, Screen.KEY_END)
        lines = render(frame)
        self.assertIsNotNone(line_with(lines, "n0999 "))
        press(frame, "c", Screen.KEY_HOME)
        lines = render(frame)
        first_row = lines[lines.index(line_with(lines, "NODE ID")) + 1]
        self.assertTrue(first_row.startswith("n0999 "), first_row)
        press(frame, "r")
        lines = render(frame)
        first_row = lines[lines.index(line_with(lines, "NODE ID")) + 1]
        self.assertTrue(first_row.startswith("n0000 "), first_row)

    def test_dashboard_keys_change_heartbeat_and_forget_disconnected(self):
        app, frame = self.dashboard()
        registry = app.orchestrator.registry
        registry.disconnect("gone", registry.join("gone", "x"), "test")
        press(frame, "x")
        self.assertIsNone(registry.get("gone"))
        press(frame, "+")
        self.assertIsNotNone(wait_until(lambda: registry.heartbeat_interval == 2.0, 3))
        press(frame, "-", "-")
        self.assertIsNotNone(wait_until(lambda: registry.heartbeat_interval == 0.5, 3))
        self.assert_quits(frame, 3)

    def test_hostile_join_never_reaches_the_screen_raw(self):
        app, frame = self.dashboard()
        with grpc.insecure_channel(f"127.0.0.1:{app.orchestrator.port}") as channel:
            stub = pb_grpc.ClusterServiceStub(channel)
            with self.assertRaises(grpc.RpcError) as caught:
                stub.JoinCluster(pb.NodeInfo(node_id="\x1b[2J\x1b]0;owned\x07"), timeout=5)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            stub.JoinCluster(pb.NodeInfo(node_id="ok", hostname="\x1b[31m\u202eevil" * 50), timeout=5)
        lines = render(frame)
        self.assertIsNotNone(line_with(lines, "rejected: invalid node ID '?[2J?]0;owned?'"))
        for line in lines:
            for char in line:
                self.assertNotIn(unicodedata.category(char), ("Cc", "Cf"), repr(line))
        self.assertNotIn("\x1b", app.orchestrator.registry.get("ok").hostname)

    def test_worker_view_shows_local_stats_while_unreachable(self):
        app = self.make_app(node_id="solo")
        app.start_worker(f"127.0.0.1:{free_port()}")
        frame = cares.WorkerFrame(make_canvas(), app)
        self.assertIsNotNone(wait_until(lambda: app.worker.state.phase == "retrying", 5))
        lines = render(frame)
        self.assertIn("node solo", lines[0])
        self.assertIn("retrying in", lines[1])
        self.assertIn("unreachable", lines[1])
        memory = line_with(lines, "Memory")
        self.assertIn(cares.format_bytes(cares.psutil.virtual_memory().total), memory)
        self.assertIsNotNone(line_with(lines, "CPU 60s"))
        self.assertIsNotNone(line_with(lines, "[WARN] Cannot join: orchestrator unreachable (connection refused)"))
        self.assert_quits(frame, "Q")

    def test_tiny_terminal_gets_a_notice_instead_of_a_crash(self):
        app = self.make_app()
        for width, height in ((40, 30), (120, 10), (1, 1)):
            screen = mock.MagicMock(spec=Screen, width=width, height=height, colours=8, unicode_aware=False)
            app.play(screen)
            scenes = screen.play.call_args[0][0]
            self.assertEqual([scene.name for scene in scenes], ["too-small"])
            notice = scenes[0].effects[0]
            notice.update(0)
            text = screen.print_at.call_args[0][0]
            self.assertEqual(len(text), width)
            if width >= 40:
                self.assertTrue(text.startswith(f"terminal too small (need {cares.MIN_WIDTH}x{cares.MIN_HEIGHT})"))
        screen = mock.MagicMock(spec=Screen, width=120, height=40, colours=8, unicode_aware=False)
        app.view = "join"
        app.play(screen)
        self.assertEqual(screen.play.call_args[1]["start_scene"].name, "join")


class TmuxEndToEndTest(unittest.TestCase):
    """The spec's verification list, driven like a user would: keys into real terminals."""

    def setUp(self):
        if shutil.which("tmux") is None:
            if IN_CI:
                self.fail("tmux is not installed; .ci/run should have installed it")
            self.skipTest("tmux is not installed")
        self.socket = f"cares-test-{os.getpid()}"
        self.workdir = tempfile.mkdtemp(prefix="cares-tmux-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.addCleanup(subprocess.run, ["tmux", "-L", self.socket, "kill-server"], capture_output=True)

    def tmux(self, *args):
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True,
                              timeout=10).stdout

    def open_pane(self, name, first=False):
        err, rc = (os.path.join(self.workdir, f"{name}.{ext}") for ext in ("err", "rc"))
        command = f"LC_ALL=C.UTF-8 {sys.executable} {CARES_PY} 2>{err}; echo $? >{rc}; sleep 60"
        if first:
            self.tmux("new-session", "-d", "-s", "cares", "-x", "120", "-y", "40", "-n", name, command)
        else:
            self.tmux("new-window", "-t", "cares", "-n", name, command)

    def screen(self, name):
        return self.tmux("capture-pane", "-p", "-t", f"cares:{name}")

    def wait_for(self, name, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen(name)
            if predicate(text):
                return text
            time.sleep(0.2)
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
                re.finditer(r"^(\S+)\s+127\.0\.0\.1:\d+\s+(Active|Disconnected)\b.*$", text, re.MULTILINE)}

    def test_orchestrator_and_four_workers_through_the_menus(self):
        address = f"127.0.0.1:{free_port()}"
        self.open_pane("orch", first=True)
        self.wait_for("orch", lambda text: "pick a role" in text, 15, "the mode menu")
        self.keys("orch", "Enter")
        self.fill_address("orch", "Listen address", address)
        self.wait_for("orch", lambda text: f"listening on {address}" in text and "Waiting for workers" in text,
                      10, "an empty dashboard")
        node_ids = []
        for number in range(4):
            name = f"w{number}"
            self.open_pane(name)
            self.wait_for(name, lambda text: "pick a role" in text, 15, "the mode menu")
            self.keys(name, "Down", "Enter")
            self.fill_address(name, "Orchestrator address", address)
            text = self.wait_for(name, lambda text: "connected, heartbeat every" in text and "Memory" in text,
                                 15, "a connected worker view")
            node_ids.append(re.search(r"node (\S+)", text).group(1))
        dashboard = self.wait_for(
            "orch", lambda text: sum(row.split()[2] == "Active" for row in self.node_rows(text).values()) == 4,
            10, "four Active rows")
        rows = self.node_rows(dashboard)
        self.assertEqual(sorted(rows), sorted(node_ids))
        for row in rows.values():
            self.assertRegex(row, "[▏▎▍▌▋▊▉█]")  # memory is never 0 %, so every row has a bar
            self.assertEqual(len(re.findall(r"\d+\.\d%", row)), 2, row)
        print("\n" + dashboard, file=sys.stderr)

        def percentages(text):
            return {node: re.findall(r"\d+\.\d%", row) for node, row in self.node_rows(text).items()}
        before = percentages(dashboard)
        self.wait_for("orch", lambda text: percentages(text) != before, 10, "values changing")

        victim = node_ids[1]
        shell = int(self.tmux("display-message", "-p", "-t", "cares:w1", "#{pane_pid}").strip())
        for child in cares.psutil.Process(shell).children():
            child.kill()
        text = self.wait_for("orch", lambda text: "Disconnected" in self.node_rows(text).get(victim, ""), 3,
                             f"{victim} Disconnected")
        self.assertIn(f"Node '{victim}' lost", text)
        self.assertEqual(sum("Active" in row for row in self.node_rows(text).values()), 3)

        self.tmux("resize-window", "-t", "cares:orch", "-x", "60", "-y", "15")
        self.wait_for("orch", lambda text: "terminal too small (need 70x18)" in text, 5, "the too-small notice")
        self.tmux("resize-window", "-t", "cares:orch", "-x", "120", "-y", "40")
        self.wait_for("orch", lambda text: len(self.node_rows(text)) == 4, 5, "the dashboard back after a resize")

        self.keys("orch", "q")
        code, err = self.exit_code("orch")
        self.assertEqual(code, 0, err)
        self.assertNotIn("Traceback", err)
        self.wait_for("w0", lambda text: "the orchestrator is shutting down" in text, 5, "the shutdown notice")
        for name in ("w0", "w2", "w3"):
            self.keys(name, "q")
            code, err = self.exit_code(name)
            self.assertEqual((code, err), (0, ""))


# ---------------------------------------------------------------------------
# Access: join tokens, TLS, streams bound to their session
# ---------------------------------------------------------------------------

def raw_stub(test, port):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
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
        """The status code the orchestrator ended the stream with."""
        try:
            list(self.replies)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK


class AccessTest(ClusterTestCase):
    def make_tls_files(self):
        if shutil.which("openssl") is None:
            if IN_CI:
                self.fail("the openssl command is missing")
            self.skipTest("the openssl command is missing")
        folder = tempfile.mkdtemp(prefix="cares-tls-")
        self.addCleanup(shutil.rmtree, folder, True)
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
            self.assertIsNotNone(wait_until(lambda: client.state.phase == "retrying", 5))
            state = client.state
            self.assertEqual(state.detail, "the orchestrator rejected the join token")
            self.assertGreaterEqual(state.retry_at - time.monotonic(), cares.REJECTED_TOKEN_BACKOFF_S - 2)
            self.assertIsNone(orchestrator.registry.get(f"intruder-{token}"))
        texts = [event.text for event in orchestrator.registry.events.tail(10)]
        self.assertEqual(sum("rejected: missing or wrong token" in text for text in texts), 2, texts)
        self.start_worker_with_token(orchestrator, "s3cret")

    def start_worker_with_token(self, orchestrator, token):
        client = cares.WorkerClient(f"127.0.0.1:{orchestrator.port}", "member", cares.LocalSampler(), token=token)
        client.start()
        self.addCleanup(client.stop, False, 0.5)
        self.assert_becomes(orchestrator.registry, "member", cares.ACTIVE, 5)

    def test_token_from_the_environment_and_the_status_command(self):
        orchestrator = self.start_orchestrator(token="from-env")
        worker = self.spawn("worker", f"127.0.0.1:{orchestrator.port}", "--node-id", "env-worker", "--headless",
                            env={**os.environ, "CARES_TOKEN": "from-env"})
        self.assert_becomes(orchestrator.registry, "env-worker", cares.ACTIVE, 10)
        run = lambda *extra: subprocess.run(
            [sys.executable, CARES_PY, "status", f"127.0.0.1:{orchestrator.port}", "--json", *extra],
            capture_output=True, text=True, timeout=20, env={k: v for k, v in os.environ.items()
                                                             if k != "CARES_TOKEN"})
        refused = run()
        self.assertEqual(refused.returncode, 1)
        self.assertIn("rejected", refused.stderr)
        allowed = run("--token", "from-env")
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
        self.assert_becomes(orchestrator.registry, "secure", cares.ACTIVE, 5)
        plain = cares.WorkerClient(f"127.0.0.1:{orchestrator.port}", "plain", cares.LocalSampler())
        plain.start()
        self.addCleanup(plain.stop, False, 0.5)
        self.assertIsNotNone(wait_until(lambda: plain.state.phase == "retrying", 3), "a plaintext worker hung")
        self.assertIn("if it uses TLS, pass --tls-ca", plain.state.detail)
        result = subprocess.run([sys.executable, CARES_PY, "status", f"127.0.0.1:{orchestrator.port}",
                                 "--tls-ca", cert, "--json"], capture_output=True, text=True, timeout=20)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("secure", result.stdout)

    def test_tls_file_mistakes_are_one_line_errors(self):
        cert, key = self.make_tls_files()
        run = lambda *args: subprocess.run([sys.executable, CARES_PY, *args], capture_output=True, text=True,
                                           timeout=20, stdin=subprocess.DEVNULL)
        listen = ["orchestrator", "--listen", "127.0.0.1:0", "--headless"]
        for args, code, needle in (
                ([*listen, "--tls-cert", "/nonexistent.pem", "--tls-key", key], 1, "No such file"),
                ([*listen, "--tls-cert", key, "--tls-key", cert], 1, "unusable TLS files"),
                ([*listen, "--tls-cert", cert], 2, "--tls-cert and --tls-key go together"),
                (["status", "127.0.0.1:1", "--tls-ca", key], 1, "unusable TLS files")):
            result = run(*args)
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
        self.assertIsNotNone(wait_until(lambda: orchestrator.registry.get("alice").cpu_usage == 11, 5))
        second = OpenStream(self, stub, "alice", alice)
        second.send(metrics("alice", alice, 2))
        self.assertEqual(second.outcome(), grpc.StatusCode.FAILED_PRECONDITION)
        stream.send(metrics("alice", bob, 2, cpu=99))
        self.assertEqual(stream.outcome(), grpc.StatusCode.PERMISSION_DENIED)
        # The client can see the status before the handler's clean-up has run.
        self.assert_becomes(orchestrator.registry, "alice", cares.DISCONNECTED, 2)
        rejoined = stub.JoinCluster(pb.NodeInfo(node_id="alice"), timeout=5).session_id
        stream = OpenStream(self, stub, "alice", rejoined)
        stream.send(metrics("bob", bob, 2, cpu=99))
        self.assertEqual(stream.outcome(), grpc.StatusCode.PERMISSION_DENIED)
        self.assert_becomes(orchestrator.registry, "alice", cares.DISCONNECTED, 2)
        self.assertEqual(orchestrator.registry.get("bob").cpu_usage, 0.0)


# ---------------------------------------------------------------------------
# Hostile input: each gets a clear status or a dropped sample, a log line, and
# leaves the registry and dashboard intact.
# ---------------------------------------------------------------------------

class HostileInputTest(ClusterTestCase):
    def joined(self, orchestrator, node_id="target"):
        stub = raw_stub(self, orchestrator.port)
        session = stub.JoinCluster(pb.NodeInfo(node_id=node_id), timeout=5).session_id
        stream = OpenStream(self, stub, node_id, session)
        stream.send(metrics(node_id, session, 1, cpu=42.0, memory=24.0))
        self.assertIsNotNone(wait_until(lambda: orchestrator.registry.get(node_id).cpu_usage == 42.0, 5))
        return stub, session, stream

    def test_hostile_strings_in_node_info_are_neutralised(self):
        orchestrator = self.start_orchestrator()
        stub = raw_stub(self, orchestrator.port)
        hostile = "\x1b[2J\x1b]0;owned\x07\u202eevil\r\n\x00" * 600  # ~10 kB
        stub.JoinCluster(pb.NodeInfo(node_id="odd", hostname=hostile, platform=hostile), timeout=5)
        hostname = orchestrator.registry.get("odd").hostname
        self.assertLessEqual(len(hostname), cares.HOSTNAME_LIMIT)
        self.assertFalse([c for c in hostname if unicodedata.category(c) in ("Cc", "Cf")], repr(hostname))
        for node_id in ("\x1b[31mred", "x" * 10_000, "", "a b", "\u202eabc"):
            with self.assertRaises(grpc.RpcError) as caught:
                stub.JoinCluster(pb.NodeInfo(node_id=node_id), timeout=5)
            self.assertEqual(caught.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        texts = [event.text for event in orchestrator.registry.events.tail(20)]
        self.assertEqual(sum("invalid node ID" in text for text in texts), 5)
        for text in texts:
            self.assertFalse([c for c in text if unicodedata.category(c) in ("Cc", "Cf")], repr(text))
            self.assertLess(len(text), 200)

    def test_impossible_metrics_are_dropped_and_logged(self):
        orchestrator = self.start_orchestrator()
        _, session, stream = self.joined(orchestrator)
        bad = [metrics("target", session, 2, cpu=float("nan")), metrics("target", session, 3, cpu=float("inf")),
               metrics("target", session, 4, cpu=-5), metrics("target", session, 5, memory=250),
               metrics("target", session, 1, cpu=77)]  # sequence went back
        stream.send(*bad)
        stream.send(metrics("target", session, 6, cpu=33.0, sent_at_ms=2**62))  # far-future clock: fine
        self.assertIsNotNone(wait_until(lambda: orchestrator.registry.get("target").cpu_usage == 33.0, 5))
        node = orchestrator.registry.get("target")
        self.assertEqual((node.status, node.memory_usage, node.dropped_samples), (cares.ACTIVE, 20.0, 5))
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
        self.assert_becomes(orchestrator.registry, "target", cares.DISCONNECTED, 2)
        self.assertIn("Node 'target' lost", orchestrator.registry.events.tail(1)[0].text)

    def test_a_flood_of_heartbeats_keeps_the_latest_in_bounded_memory(self):
        orchestrator = self.start_orchestrator()
        _, session, stream = self.joined(orchestrator)
        for sequence in range(2, 3002):
            stream.send(metrics("target", session, sequence, cpu=sequence % 100))
            if sequence % 100 == 0:
                time.sleep(0.1)  # 1,000 messages a second
        self.assertIsNotNone(wait_until(lambda: orchestrator.registry.get("target").last_sequence == 3001, 10))
        node = orchestrator.registry.get("target")
        self.assertEqual((node.status, node.cpu_usage), (cares.ACTIVE, 3001 % 100))
        self.assertLessEqual(len(node.cpu_history), 6)  # one point per heartbeat interval, not per message
        self.assertLess(len(orchestrator.registry.events.tail(10_000)), 10)

    def test_more_nodes_than_max_nodes_are_refused(self):
        orchestrator = self.start_orchestrator(max_nodes=3)
        stub = raw_stub(self, orchestrator.port)
        for number in range(3):
            stub.JoinCluster(pb.NodeInfo(node_id=f"n{number}"), timeout=5)
        with self.assertRaises(grpc.RpcError) as caught:
            stub.JoinCluster(pb.NodeInfo(node_id="one-too-many"), timeout=5)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("the cluster is full (3 nodes)", caught.exception.details())
        self.assertIn("rejected: the cluster is full", orchestrator.registry.events.tail(1)[0].text)
        self.assertEqual(len(orchestrator.registry), 3)

    def test_a_stream_that_never_speaks_is_closed(self):
        orchestrator = self.start_orchestrator(heartbeat_ms=200)
        stub = raw_stub(self, orchestrator.port)
        session = stub.JoinCluster(pb.NodeInfo(node_id="mute"), timeout=5).session_id
        stream = OpenStream(self, stub, "mute", session)
        started = time.monotonic()
        self.assertEqual(stream.outcome(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertLess(time.monotonic() - started, 3)
        self.assertIn("Node 'mute' lost: no heartbeat for 0.6 s.", orchestrator.registry.events.tail(1)[0].text)

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
        for extra in ([], ["--json"]):
            result = subprocess.run([sys.executable, CARES_PY, "status", f"127.0.0.1:{port}", *extra],
                                    capture_output=True, text=True, timeout=20)
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
                cares.parse_address(args.orchestrator_address)
        self.assertGreater(accepted, 0)


# ---------------------------------------------------------------------------
# Faults, with real processes
# ---------------------------------------------------------------------------

class LineCollector:
    """Reads a process's stderr on a thread, keeping (monotonic time, line)."""

    def __init__(self, stream):
        self.lines = []
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self.lines.append((time.monotonic(), line))

    def first_after(self, start, needle):
        return next((at for at, line in list(self.lines) if at >= start and needle in line), None)


class FaultTest(ClusterTestCase):
    def test_stopped_worker_is_lost_then_back_after_sigcont(self):
        orchestrator = self.start_orchestrator()
        worker = self.spawn("worker", f"127.0.0.1:{orchestrator.port}", "--node-id", "sleepy", "--headless")
        self.addCleanup(lambda: worker.poll() is None and worker.send_signal(signal.SIGCONT))
        self.assert_streaming(orchestrator.registry, "sleepy")
        worker.send_signal(signal.SIGSTOP)
        bound = cares.MISSED_HEARTBEATS * orchestrator.registry.heartbeat_interval + 1.0
        lost = self.assert_becomes(orchestrator.registry, "sleepy", cares.DISCONNECTED, bound)
        worker.send_signal(signal.SIGCONT)
        back = self.assert_becomes(orchestrator.registry, "sleepy", cares.ACTIVE, 10)
        print(f"\n  SIGSTOP -> Disconnected in {lost:.2f} s (bound {bound:.1f} s); "
              f"SIGCONT -> Active in {back:.2f} s", file=sys.stderr)

    def test_orchestrator_killed_and_restarted_every_worker_back(self):
        address = f"127.0.0.1:{free_port()}"
        orchestrator = self.spawn("orchestrator", "--listen", address, "--headless")
        names = [f"survivor-{n}" for n in range(3)]
        for name in names:
            self.spawn("worker", address, "--node-id", name, "--headless")

        def statuses():
            try:
                return {row["node_id"]: row["status"] for row in cares.fetch_status(address, timeout=1)}
            except grpc.RpcError:
                return {}
        self.assertIsNotNone(wait_until(lambda: statuses() == dict.fromkeys(names, "Active"), 20, 0.2))
        orchestrator.kill()
        orchestrator.wait(5)
        time.sleep(1.0)
        self.spawn("orchestrator", "--listen", address, "--headless")
        restarted = time.monotonic()
        waited = wait_until(lambda: statuses() == dict.fromkeys(names, "Active"), 6, 0.1)
        self.assertIsNotNone(waited, f"not all Active within 6 s of the restart: {statuses()}")
        print(f"\n  orchestrator SIGKILL + restart -> all workers Active in "
              f"{time.monotonic() - restarted:.2f} s", file=sys.stderr)

    def test_two_hundred_workers_join_at_once(self):
        orchestrator = self.start_orchestrator()
        clients = [cares.WorkerClient(f"127.0.0.1:{orchestrator.port}", f"crowd-{n:03d}", cares.LocalSampler())
                   for n in range(200)]
        started = time.monotonic()
        for client in clients:
            client.start()
            self.addCleanup(client.stop, False, 0.5)
        registry = orchestrator.registry
        waited = wait_until(lambda: sum(node.streaming for node in registry.snapshot()) == 200, 30, 0.1)
        self.assertIsNotNone(waited, f"{sum(node.streaming for node in registry.snapshot())} of 200 streaming")
        self.assertTrue(all(node.status == cares.ACTIVE for node in registry.snapshot()))
        self.assertFalse([e.text for e in registry.events.tail(1000) if e.level != "INFO"])
        print(f"\n  200 workers joining at once -> all Active in {time.monotonic() - started:.2f} s",
              file=sys.stderr)

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

        orchestrator = self.start_orchestrator(f"{subnet}.1:0")
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
        orchestrator_noticed = self.assert_becomes(orchestrator.registry, "far", cares.DISCONNECTED, 5)
        self.assertIsNotNone(wait_until(lambda: log.first_after(cut, "Disconnected:"), 5 - (time.monotonic() - cut)),
                             "the worker did not notice the dead link within 5 s")
        worker_noticed = log.first_after(cut, "Disconnected:") - cut
        ip("link", "set", outer, "up")
        restored = time.monotonic()
        back = self.assert_becomes(orchestrator.registry, "far", cares.ACTIVE, 15)
        print(f"\n  black hole -> orchestrator noticed in {orchestrator_noticed:.2f} s, worker in "
              f"{worker_noticed:.2f} s; link back -> Active in {time.monotonic() - restored:.2f} s",
              file=sys.stderr)
        self.assertLessEqual(back, 15)


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
        self._n = getattr(self, "_n", 0) + 1
        env["HOME"] = self._dir("home-%d" % self._n)  # never the real HOME or /tmp
        env["TMPDIR"] = self._dir("tmpdir-%d" % self._n)
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

    @staticmethod
    def _interpreters():
        """{path: (major, minor, full version)} of the CPythons we can find."""
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

    # -- tests -----------------------------------------------------------

    def test_version_under_every_python(self):
        expected = self._expected_version_line()
        pythons = self._carried_interpreters()
        pins = pyz_build.read_pins(os.path.join(HERE, "requirements.txt"))
        for python, (major, minor, full) in sorted(pythons.items()):
            with self.subTest(python=python, version=full):
                cache = self._dir("cache-%s" % full)
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

    def test_cluster_runs_from_the_pyz_under_every_python(self):
        pythons = sorted(self._carried_interpreters())
        for python in pythons:
            with self.subTest(python=python):
                env = self._env(CARES_CACHE_DIR=self._dir(f"cache-run-{len(os.listdir(self.tmp))}"))
                address = f"127.0.0.1:{free_port()}"
                spawned = []
                for argv in (["orchestrator", "--listen", address, "--headless"],
                             ["worker", address, "--node-id", "from-pyz", "--headless"]):
                    process = subprocess.Popen([python, self.pyz, *argv], env=env, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    self.addCleanup(process.communicate)  # cleanups run last-in first-out: kill, then reap
                    self.addCleanup(process.kill)
                    spawned.append(process)

                def nodes():
                    result = self._run([python, self.pyz, "status", address, "--json", "--timeout", "2"], env)
                    return json.loads(result.stdout)["nodes"] if result.returncode == 0 else []
                self.assertIsNotNone(wait_until(
                    lambda: [(n["node_id"], n["status"]) for n in nodes()] == [("from-pyz", "Active")],
                    30, interval=0.3), f"no Active node from the pyz under {python}")
                for process in reversed(spawned):
                    process.send_signal(signal.SIGTERM)
                    self.assertEqual(process.wait(10), 0)
                    self.assertNotIn("Traceback", process.stderr.read())

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


if __name__ == "__main__":
    unittest.main()
