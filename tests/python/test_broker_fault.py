"""Broker fault: the broker closes the gateway's AMQP connection while WebSocket clients have
requests in flight.

Requirement: every in-flight request ends with a response or an error, none hangs; service
resumes within 10 s; WebSocket clients stay connected throughout and are served again after
the gateway reconnects, without a gateway restart.

A dedicated gateway (its own service name and instance id, a 5 s request timeout and a
reconnect backoff pinned to 1 s) serves three WebSocket clients. Each has slow `sleep`
requests pending at the Python service and keeps a stream of quick `echo` requests going
through the fault and the recovery. Only the gateway's connection is closed, with
`rabbitmqctl close_connection`: nuropb 0.1.8 services never reconnect after a broker-closed
connection (spec defect N4), so the Python service's connection is left alone.

Every frame the clients receive is time-stamped on arrival (`WsClient.timeline`), and the
checks are made on the whole record at the end, so one failure reports everything that went
wrong, not just the first symptom.
"""

import asyncio
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import pytest

from conftest import SERVICE, start_extra_gateway
from interop_helpers import WsClient, close_connection, gateway_connections, run, unique, vhost_of

REQUEST_TIMEOUT_S = 5.0
# min = max: the first reconnect attempt comes 0.5–1 s (jitter) after the loss, so there is a
# window in which new requests must be refused at once, and recovery is still quick.
RECONNECT_MS = 1000
# Every request must be answered within this of being sent (the timeout plus slack).
RESPONSE_BOUND = REQUEST_TIMEOUT_S + 1.5
# An error for a request in flight at the close, or sent while the mesh is down, must come
# within this of the close (or of the send, when later). The close is taken as the moment
# `rabbitmqctl close_connection` returns: the command spends 0.5-1.7 s starting an Erlang
# VM before it closes anything (more on a loaded machine), so its start is not the close.
FAIL_FAST = 1.0
# From the close to the first successful request sent after the gateway noticed the loss.
RECOVERY_BOUND = 10.0

SLEEP_SECONDS = 2.5
# 3 clients x 3 sleeps stays below the service's prefetch (16): echoes are not stuck behind
# sleeps at the service, even while the sleeps whose callers were failed still run there.
SLEEPS_PER_CLIENT = 3
ECHO_INTERVAL = 0.05  # per client: 20 requests/s, well under the gateway's rate limit
LOAD_BEFORE_CLOSE = 0.5
LOAD_AFTER_RECOVERY = 1.0
# After everything is answered: how long a duplicate response would have to show up.
DUPLICATE_GRACE = 0.5

TRANSPORT_ERROR = "NuropbTransportError"


@dataclass
class Sent:
    client: WsClient
    trace_id: str
    kind: str  # warmup | sleep | echo | after
    method: str
    params: Dict[str, Any]
    at: float


@pytest.fixture
def fault_gateway(config, service):
    gw = start_extra_gateway(
        config,
        "gateway-fault",
        f"interop-gw-fault-{uuid.uuid4().hex[:6]}",
        **{
            "--instance-id": uuid.uuid4().hex,
            "--request-timeout-ms": str(int(REQUEST_TIMEOUT_S * 1000)),
            "--reconnect-min-ms": str(RECONNECT_MS),
            "--reconnect-max-ms": str(RECONNECT_MS),
        },
    )
    yield gw
    gw.process.stop()


class Load:
    """Requests sent by trace id, and every response frame the clients received."""

    def __init__(self, clients: List[WsClient]) -> None:
        self.clients = clients
        self.sent: Dict[str, Sent] = {}

    async def send(self, client: WsClient, kind: str, method: str, params: Dict[str, Any]) -> str:
        trace_id = unique(f"{kind}-{client.label}")
        # Stamped before the send: a response can never seem to precede its request.
        self.sent[trace_id] = Sent(client, trace_id, kind, method, params, time.monotonic())
        await client.send(
            {"type": "request", "payload": {"service": SERVICE, "method": method, "params": params, "trace_id": trace_id}}
        )
        return trace_id

    def responses(self) -> Dict[Any, List[Tuple[float, Dict[str, Any]]]]:
        """trace_id -> [(arrival, response payload), ...] over all clients."""
        out: Dict[Any, List[Tuple[float, Dict[str, Any]]]] = {}
        for client in self.clients:
            for at, frame in client.timeline:
                if frame.get("type") == "response":
                    payload = frame.get("payload") or {}
                    out.setdefault(payload.get("trace_id"), []).append((at, payload))
        return out

    async def answer(self, trace_id: str, timeout: float) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.responses().get(trace_id)
            if got:
                return got[0][1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no response to {trace_id} within {timeout} s")
            await asyncio.sleep(0.02)

    async def call_ok(self, client: WsClient, kind: str, method: str, params: Dict[str, Any]) -> Any:
        payload = await self.answer(await self.send(client, kind, method, params), RESPONSE_BOUND)
        assert payload.get("error") is None, f"{client.label}: {method} failed: {payload}"
        return payload.get("result")


def _expected_result(sent: Sent) -> Any:
    if sent.method == "sleep":
        return f"slept {sent.params['seconds']}"
    return sent.params  # echo


def _error_name(payload: Dict[str, Any]) -> Optional[str]:
    error = payload.get("error")
    if error is None:
        return None
    return error.get("error", repr(error)) if isinstance(error, dict) else repr(error)


def test_broker_closes_gateway_connection_under_load(mesh, fault_gateway, service):
    gw = fault_gateway
    vhost = vhost_of(mesh.cfg.amqp_url)

    async def scenario():
        before = await asyncio.to_thread(gateway_connections, vhost, gw.service_name, gw.instance_id)
        assert len(before) == 1, f"expected one AMQP connection named {gw.service_name}/{gw.instance_id}: {before}"

        clients = [await mesh.connect(unique(name), label=name, gateway=gw) for name in ("alice", "bob", "carol")]
        load = Load(clients)
        for c in clients:
            assert await load.call_ok(c, "warmup", "echo", {"warm": c.label}) == {"warm": c.label}

        # Slow requests, pending at the service when the connection goes.
        for c in clients:
            for _ in range(SLEEPS_PER_CLIENT):
                await load.send(c, "sleep", "sleep", {"seconds": SLEEP_SECONDS})

        stop = asyncio.Event()

        async def echo_stream(client: WsClient) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                await load.send(client, "echo", "echo", {"n": n, "who": client.label})
                try:
                    await asyncio.wait_for(stop.wait(), ECHO_INTERVAL)
                except asyncio.TimeoutError:
                    pass

        streams = [asyncio.create_task(echo_stream(c)) for c in clients]
        await asyncio.sleep(LOAD_BEFORE_CLOSE)

        closed_at = time.monotonic()
        await asyncio.to_thread(close_connection, before[0].pid, "interop broker fault")
        close_returned_at = time.monotonic()

        # Poll the record: the gateway noticed the loss (first NuropbTransportError), then
        # an echo sent after that succeeded (recovered).
        first_error_at: Optional[float] = None
        recovered_at: Optional[float] = None
        while time.monotonic() < closed_at + RECOVERY_BOUND + 1.0:
            got = load.responses()
            errors = [at for lst in got.values() for at, p in lst if _error_name(p) == TRANSPORT_ERROR]
            if errors:
                first_error_at = min(errors)
                ok = [
                    at
                    for tid, lst in got.items()
                    if tid in load.sent and load.sent[tid].kind == "echo" and load.sent[tid].at > first_error_at
                    for at, p in lst
                    if p.get("error") is None
                ]
                if ok:
                    recovered_at = min(ok)
                    break
            if any(task.done() for task in streams):
                break  # a stream failed (e.g. the socket closed): reported below
            await asyncio.sleep(0.05)
        await asyncio.sleep(LOAD_AFTER_RECOVERY if recovered_at is not None else 0)
        stop.set()
        stream_errors = [
            repr(r) for r in await asyncio.gather(*streams, return_exceptions=True) if isinstance(r, BaseException)
        ]

        # Let every request run to its bound; the pre-fault sleeps' late answers (sent by
        # the service SLEEP_SECONDS after the request) must have had time to show up too.
        last_bound = max(s.at for s in load.sent.values()) + RESPONSE_BOUND
        while time.monotonic() < last_bound and not all(t in load.responses() for t in load.sent):
            await asyncio.sleep(0.05)
        sleeps_done_at = max(s.at for s in load.sent.values() if s.kind == "sleep") + SLEEP_SECONDS
        await asyncio.sleep(max(0.0, sleeps_done_at + DUPLICATE_GRACE - time.monotonic()) + DUPLICATE_GRACE)

        # --- the record ---------------------------------------------------------------
        problems: List[str] = []
        if stream_errors:
            problems.append(f"request streams failed: {stream_errors}")
        for c in clients:
            if c.close_info is not None:
                problems.append(f"{c.label}: WebSocket closed during the fault: {c.close_info}")

        got = load.responses()
        missing = [t for t in load.sent if t not in got]
        duplicated = {t: len(v) for t, v in got.items() if len(v) > 1}
        strangers = [t for t in got if t not in load.sent]
        total_frames = sum(len(v) for v in got.values())
        if missing:
            problems.append(f"{len(missing)} requests never answered (hung): {missing[:10]}")
        if duplicated:
            problems.append(f"duplicate responses: {dict(list(duplicated.items())[:10])}")
        if strangers:
            problems.append(f"responses to requests nobody sent: {strangers[:10]}")
        if total_frames != len(load.sent):
            problems.append(f"{total_frames} response frames for {len(load.sent)} requests")

        outcomes: Counter = Counter()
        slow, not_fast, wrong = [], [], []
        refused_while_down = 0
        for tid, sent in load.sent.items():
            if tid not in got:
                continue
            at, payload = got[tid][0]
            latency = at - sent.at
            name = _error_name(payload)
            outcomes[(sent.kind, name or "ok")] += 1
            if latency > RESPONSE_BOUND:
                slow.append(f"{tid}: {latency:.2f} s")
            if name is None:
                if payload.get("result") != _expected_result(sent):
                    wrong.append(f"{tid}: {payload}")
                continue
            if name != TRANSPORT_ERROR:
                wrong.append(f"{tid} (sent {sent.at - closed_at:+.2f} s from the close): {payload}")
            since = at - max(sent.at, close_returned_at)
            if since > FAIL_FAST:
                not_fast.append(f"{tid} sent {sent.at - closed_at:+.2f} s from the close, error after {latency:.2f} s: {name}")
            if first_error_at is not None and sent.at > first_error_at and name == TRANSPORT_ERROR:
                refused_while_down += 1
        if slow:
            problems.append(f"{len(slow)} responses later than {RESPONSE_BOUND} s: {slow[:10]}")
        if not_fast:
            problems.append(f"{len(not_fast)} errors not within {FAIL_FAST} s of the close or send: {not_fast[:10]}")
        if wrong:
            problems.append(f"{len(wrong)} unexpected outcomes: {wrong[:10]}")
        if first_error_at is None:
            problems.append("no request failed with NuropbTransportError: the gateway never noticed the loss")
        elif refused_while_down == 0:
            problems.append("no request sent while the mesh was down was refused (no down window observed)")
        if recovered_at is None:
            problems.append(f"no request succeeded within {RECOVERY_BOUND} s of the close")
        elif recovered_at - closed_at > RECOVERY_BOUND:
            problems.append(f"service resumed {recovered_at - closed_at:.2f} s after the close")

        def since_close(at: Optional[float]) -> str:
            return "never" if at is None else f"{at - closed_at:+.2f} s"

        summary = (
            f"{len(load.sent)} requests; rabbitmqctl close_connection took {close_returned_at - closed_at:.2f} s; "
            f"first transport error {since_close(first_error_at)}; recovered {since_close(recovered_at)}; "
            f"refused while down: {refused_while_down}; outcomes {dict(outcomes)}"
        )
        print(summary)
        assert not problems, "\n".join(problems + [summary])

        # Served again, on the same sockets, by the same gateway process.
        for c in clients:
            await c.ping()
            assert await load.call_ok(c, "after", "echo", {"after": c.label}) == {"after": c.label}
            assert await load.call_ok(c, "after", "sleep", {"seconds": 0.1}) == "slept 0.1"
        for c in clients:
            await c.close()

        after = await asyncio.to_thread(gateway_connections, vhost, gw.service_name, gw.instance_id)
        assert len(after) == 1, f"expected one AMQP connection for the gateway after the fault: {after}"
        assert after[0].pid != before[0].pid, "the gateway still uses the connection the broker closed"

    run(scenario(), timeout=45)

    assert gw.process.alive() and gw.process.starts == 1, "the gateway was restarted or died"
    assert service.alive(), f"the Python service died (exit {service.proc.returncode})"
