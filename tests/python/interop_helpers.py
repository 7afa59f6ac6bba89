"""Helpers for the interop suite: managed child processes (gateway, service), JWTs, a
WebSocket client that buffers frames so tests can wait for the one they want, a nuropb
client-only mesh connection, and broker administration through `rabbitmqctl` (there is no
management API). Every wait is bounded."""

import asyncio
import ctypes
import ctypes.util
import json
import os
import re
import signal
import subprocess
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import jwt
import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

# Default bound for one expected frame.
FRAME_TIMEOUT = 5.0

Frame = Dict[str, Any]


def run(coro: Any, timeout: float = 30.0) -> Any:
    """Runs one scenario coroutine on a fresh event loop, bounded by `timeout` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- processes --------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
try:
    _LIBC: Optional[ctypes.CDLL] = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # not Linux/glibc: children then only stop through fixture teardown
    _LIBC = None


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when pytest dies, however pytest dies, so a
    killed test run never leaves a gateway or service behind."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    """A child process whose stdout and stderr go to one log file, started and considered
    ready once a line matching `ready_pattern` appears in that log."""

    def __init__(
        self,
        name: str,
        argv: List[str],
        log_path: Path,
        ready_pattern: str,
        env: Optional[Dict[str, str]] = None,
        ready_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.ready_re = re.compile(ready_pattern)
        self.env = env
        self.ready_timeout = ready_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.ready_match: Optional[re.Match] = None
        self.starts = 0

    def start(self) -> "ManagedProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        start_offset = self.log_size()
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts + 1}: {' '.join(self.argv)}\n".encode())
            log.flush()
            start_offset = log.tell()
            # A new session, so stopping it never signals pytest's own process group.
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.starts += 1
        deadline = time.monotonic() + self.ready_timeout
        while True:
            text = self.read_log(start_offset)
            match = self.ready_re.search(text)
            if match:
                self.ready_match = match
                return self
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{self.name} exited with {code} before it was ready; log:\n{self.tail(start_offset)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} not ready within {self.ready_timeout:.0f} s "
                    f"(waiting for /{self.ready_re.pattern}/); log:\n{self.tail(start_offset)}"
                )
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> Optional[int]:
        """SIGTERM, then SIGKILL after `grace` seconds. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def read_log(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def tail(self, offset: int = 0, lines: int = 120) -> str:
        text = self.read_log(offset).splitlines()
        cut = text[-lines:]
        prefix = f"[... {len(text) - len(cut)} earlier lines in {self.log_path}]\n" if len(text) > len(cut) else ""
        return prefix + "\n".join(cut)


# --- tokens -----------------------------------------------------------------------------


def make_token(secret: str, user_id: str, username: Optional[str] = None, ttl: int = 3600, **extra: Any) -> str:
    claims = {
        "sub": user_id,
        "username": username if username is not None else f"{user_id}@example.com",
        "exp": int(time.time()) + ttl,
        **extra,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


# --- WebSocket client -------------------------------------------------------------------


def is_event(topic: Optional[str] = None) -> Callable[[Frame], bool]:
    def pred(f: Frame) -> bool:
        return f.get("type") == "event" and (
            topic is None or (f.get("payload") or {}).get("topic") == topic
        )

    return pred


# How long a negative check waits for stragglers after its marker.
MARKER_GRACE = 0.3


async def next_event_is_marker(client: "WsClient", marker_topic: str) -> None:
    """Negative checks ("bob does not get it") send a marker after the event under test:
    an event `client` *should* get. The gateway consumes its queue in order, so anything
    wrongly routed to `client` would arrive first; a short grace period afterwards catches
    stragglers anyway."""
    frame = await client.expect(is_event(), what=f"marker event {marker_topic}")
    assert frame["payload"]["topic"] == marker_topic, f"{client.label} got an event meant for others: {frame}"
    await client.expect_none(lambda f: f.get("type") == "event", within=MARKER_GRACE, what="event after the marker")


def is_response(trace_id: Any) -> Callable[[Frame], bool]:
    def pred(f: Frame) -> bool:
        return f.get("type") == "response" and (f.get("payload") or {}).get("trace_id") == trace_id

    return pred


def is_error_frame(f: Frame) -> bool:
    """A top-level error frame `{"error": <name>, "description": <text>, ...}`."""
    return "type" not in f and isinstance(f.get("error"), str) and "description" in f


@dataclass
class Hello:
    session_id: str
    user_id: str
    username: str


class WsClient:
    """One WebSocket session. A reader task buffers every frame; `expect` takes the first
    buffered or future frame matching a predicate, leaving the others for later waits."""

    def __init__(self, ws: ClientConnection, label: str) -> None:
        self.ws = ws
        self.label = label
        self.frames: List[Frame] = []  # not yet taken by `expect`
        self.history: List[Frame] = []  # everything received, for failure messages
        # (time.monotonic() at arrival, frame) for everything received, for latency checks.
        self.timeline: List[Tuple[float, Frame]] = []
        self.changed = asyncio.Event()
        self.close_info: Optional[Tuple[Optional[int], str]] = None
        self.hello: Optional[Hello] = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls,
        url: str,
        token: Optional[str] = None,
        *,
        label: str = "client",
        headers: Optional[Dict[str, str]] = None,
        origin: Optional[str] = None,
        expect_hello: bool = True,
    ) -> "WsClient":
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        ws = await connect(
            url,
            additional_headers=all_headers,
            origin=origin,
            open_timeout=FRAME_TIMEOUT,
            close_timeout=2,
            proxy=None,
            compression=None,
            max_size=None,
            ping_interval=None,
        )
        client = cls(ws, label)
        if expect_hello:
            frame = await client.expect(is_event("hello"))
            event = frame["payload"]["event"]
            client.hello = Hello(event["session_id"], event["user_id"], event["username"])
        return client

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                self._push(self._decode(message))
        except ConnectionClosed:
            pass
        finally:
            self.close_info = (self.ws.close_code, self.ws.close_reason or "")
            self.changed.set()

    @staticmethod
    def _decode(message: Any) -> Frame:
        try:
            value = msgpack.unpackb(message) if isinstance(message, bytes) else json.loads(message)
        except Exception as err:  # keep what arrived, the test will show it
            return {"_undecodable": repr(message)[:500], "_why": str(err)}
        if not isinstance(value, dict):
            return {"_non_object": value}
        if isinstance(message, bytes):
            value["_binary"] = True
        return value

    def _push(self, frame: Frame) -> None:
        self.frames.append(frame)
        self.history.append(frame)
        self.timeline.append((time.monotonic(), frame))
        self.changed.set()

    async def send(self, frame: Any) -> None:
        await self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def expect(self, pred: Callable[[Frame], bool], timeout: float = FRAME_TIMEOUT, what: str = "") -> Frame:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for i, frame in enumerate(self.frames):
                if pred(frame):
                    return self.frames.pop(i)
            if self.close_info is not None:
                raise AssertionError(
                    f"{self.label}: connection closed {self.close_info} while waiting for "
                    f"{what or 'a frame'}; received: {self._recent()}"
                )
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.label}: no {what or 'matching frame'} within {timeout} s; "
                    f"received: {self._recent()}"
                )
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def expect_none(self, pred: Callable[[Frame], bool], within: float, what: str = "") -> None:
        """Fails if a frame matching `pred` is buffered or arrives within `within` seconds."""
        await asyncio.sleep(within)
        hits = [f for f in self.frames if pred(f)]
        assert not hits, f"{self.label}: unexpected {what or 'frame'}: {hits}"

    def take_all(self, pred: Callable[[Frame], bool]) -> List[Frame]:
        hits = [f for f in self.frames if pred(f)]
        self.frames = [f for f in self.frames if not pred(f)]
        return hits

    async def request(
        self,
        service: str,
        method: str,
        params: Any = None,
        trace_id: Optional[str] = None,
        timeout: float = FRAME_TIMEOUT,
    ) -> Dict[str, Any]:
        """Sends a request frame and returns the matching response frame's payload."""
        trace_id = trace_id or unique("t")
        await self.send(
            {
                "type": "request",
                "payload": {
                    "service": service,
                    "method": method,
                    "params": {} if params is None else params,
                    "trace_id": trace_id,
                },
            }
        )
        frame = await self.expect(is_response(trace_id), timeout, f"response to {service}.{method} ({trace_id})")
        return frame["payload"]

    async def call_ok(self, service: str, method: str, params: Any = None, timeout: float = FRAME_TIMEOUT) -> Any:
        """A request that must succeed: returns its result."""
        payload = await self.request(service, method, params, timeout=timeout)
        assert payload.get("error") is None, f"{service}.{method} failed: {payload}"
        return payload.get("result")

    async def ping(self) -> None:
        await self.send({"type": "ping"})
        await self.expect(lambda f: f.get("type") == "pong", what="pong")

    async def wait_closed(self, timeout: float = FRAME_TIMEOUT) -> Tuple[Optional[int], str]:
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.label}: still open after {timeout} s") from None
        assert self.close_info is not None
        return self.close_info

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 3)
        except Exception:  # closing a dead socket: nothing left to do
            pass
        self._reader.cancel()

    def _recent(self, n: int = 8) -> str:
        shown = [json.dumps(f)[:300] for f in self.history[-n:]]
        return "[" + ", ".join(shown) + "]" if shown else "nothing"


# --- nuropb mesh client -------------------------------------------------------------------


class MeshClient:
    """A client-only nuropb RMQAPI, as any Python mesh peer of the gateway would use."""

    def __init__(self, amqp_url: str) -> None:
        from nuropb.rmq_api import RMQAPI

        self.api = RMQAPI(amqp_url=amqp_url)

    async def __aenter__(self) -> "MeshClient":
        await asyncio.wait_for(self.api.connect(), 10)
        assert self.api.connected, "nuropb client could not connect to the mesh"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await asyncio.wait_for(self.api.disconnect(), 10)
        except Exception:  # the test outcome is already decided; a slow close is not it
            pass

    async def request(self, service: str, method: str, params: Dict[str, Any], timeout: float = FRAME_TIMEOUT) -> Dict[str, Any]:
        """Returns nuropb's whole response dict (rpc_response=False)."""
        response = await asyncio.wait_for(
            self.api.request(
                service=service,
                method=method,
                params=params,
                context={},
                trace_id=unique("mesh"),
                rpc_response=False,
            ),
            timeout,
        )
        return response

    async def call_ok(self, service: str, method: str, params: Dict[str, Any], timeout: float = FRAME_TIMEOUT) -> Any:
        response = await self.request(service, method, params, timeout)
        assert response.get("error") is None, f"mesh call {service}.{method} failed: {response}"
        return response.get("result")


# --- broker administration (rabbitmqctl) ----------------------------------------------------

RABBITMQCTL_TIMEOUT = 30.0


def vhost_of(amqp_url: str) -> str:
    """The vhost named by an AMQP URL (`/` when the path is empty)."""
    path = urllib.parse.urlsplit(amqp_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


LIST_TRIES = 5  # a listing that met a vanishing process is tried this many times in all


def rabbitmqctl(*args: str, timeout: float = RABBITMQCTL_TIMEOUT) -> str:
    """Runs `rabbitmqctl -q <args>` (bounded) and returns its stdout; fails loudly.

    A listing (`list_*`) asks each connection or queue process in turn and fails with
    `badrpc` when one exits meanwhile (a connection of an earlier test still closing); being
    read-only, it is tried again, at most LIST_TRIES times in all."""
    argv = ["rabbitmqctl", "-q", *args]
    listing = any(a.startswith("list_") for a in args)
    attempt = 1
    while True:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None
        if done.returncode == 0:
            return done.stdout
        said = done.stderr.strip() or done.stdout.strip()
        if not (listing and attempt < LIST_TRIES and "badrpc" in done.stderr + done.stdout):
            raise RuntimeError(f"{' '.join(argv)} failed with {done.returncode} (try {attempt}): {said}")
        time.sleep(0.2)
        attempt += 1


@dataclass
class BrokerConnection:
    pid: str  # as close_connection takes it: <rabbit@host.N.N.N>
    name: str  # the peer addresses, e.g. 127.0.0.1:35414 -> 127.0.0.1:5672
    client_properties: str  # rabbitmqctl's rendering: [{"connection_name","svc/instance"},...]


def list_connections(vhost: str) -> List[BrokerConnection]:
    out = rabbitmqctl("--no-table-headers", "list_connections", "-p", vhost, "pid", "name", "client_properties")
    connections = []
    for line in out.splitlines():
        fields = line.split("\t", 2)
        if len(fields) == 3:
            connections.append(BrokerConnection(*fields))
    return connections


def gateway_connections(vhost: str, service_name: str, instance_id: str) -> List[BrokerConnection]:
    """The AMQP connections of one gateway instance: it names its connection
    `<service_name>/<instance_id>` and sets the client property product=nuropb-gateway."""
    name = f'{{"connection_name","{service_name}/{instance_id}"}}'
    product = '{"product","nuropb-gateway"}'
    return [c for c in list_connections(vhost) if name in c.client_properties and product in c.client_properties]


def close_connection(pid: str, reason: str) -> None:
    """Has the broker close one connection (the client sees CONNECTION_FORCED)."""
    rabbitmqctl("close_connection", pid, reason)


def env_required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(
            f"{name} is not set. Run the suite with `cargo xtask interop`, or set "
            "NUROPB_INTEROP_AMQP_URL, NUROPB_INTEROP_GATEWAY_BIN and NUROPB_INTEROP_JWT_SECRET."
        )
    return value
