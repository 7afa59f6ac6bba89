"""Several gateway instances: two gateway processes with the same `--service-name` and
different `--instance-id`s on the same vhost, as a scaled-out deployment runs them.

Each instance has its own events queue, so mesh events reach sessions on both; calls from
mesh peers to the gateway's methods land on the service queue the instances share (one
instance takes each call), and the fan-out ones (`push_to_user`, `push_to_all`,
`disconnect_user`) must still reach sessions on both.

The sessions: alice on instance A, alice (second session) and bob on instance B. Negative
checks ("bob does not get it") use a marker, as in test_events.py: the next event bob
receives must be a marker sent after the event under test. "Exactly once" checks wait a
short grace period for a second copy.
"""

import asyncio
import uuid
from dataclasses import dataclass
from typing import Set

import pytest

from conftest import SERVICE, Gateway, echo_problems, start_extra_gateway
from interop_helpers import WsClient, is_event, next_event_is_marker, run, unique

GRACE = 0.3


@pytest.fixture(scope="module")
def two_gateways(config, service):
    name = f"interop-gw-multi-{uuid.uuid4().hex[:6]}"
    a = start_extra_gateway(config, "gateway-multi-a", name, **{"--instance-id": f"a-{uuid.uuid4().hex}"})
    try:
        b = start_extra_gateway(config, "gateway-multi-b", name, **{"--instance-id": f"b-{uuid.uuid4().hex}"})
    except Exception:
        a.process.stop()
        raise
    assert a.instance_id != b.instance_id and a.service_name == b.service_name
    yield a, b
    b.process.stop()
    a.process.stop()


@dataclass
class Sessions:
    alice_id: str
    bob_id: str
    alice_a: WsClient  # alice on instance A
    alice_b: WsClient  # alice's second session, on instance B
    bob_b: WsClient  # bob on instance B

    @property
    def all(self):
        return (self.alice_a, self.alice_b, self.bob_b)

    async def close(self) -> None:
        for c in self.all:
            await c.close()


class Pair:
    def __init__(self, mesh, a: Gateway, b: Gateway) -> None:
        self.mesh = mesh
        self.a = a
        self.b = b
        self.service_name = a.service_name  # shared by both instances

    async def sessions(self) -> Sessions:
        alice_id, bob_id = unique("alice"), unique("bob")
        s = Sessions(
            alice_id,
            bob_id,
            await self.mesh.connect(alice_id, label="alice@A", gateway=self.a),
            await self.mesh.connect(alice_id, label="alice#2@B", gateway=self.b),
            await self.mesh.connect(bob_id, label="bob@B", gateway=self.b),
        )
        assert s.alice_a.hello.session_id != s.alice_b.hello.session_id
        return s


@pytest.fixture
def pair(mesh, two_gateways, tokens):
    """Both instances running; after the test both must be alive and serve an echo."""
    a, b = two_gateways
    a.ensure_running()
    b.ensure_running()
    yield Pair(mesh, a, b)
    problems = []
    for label, gw in (("A", a), ("B", b)):
        if not gw.process.alive():
            problems.append(f"instance {label} exited with {gw.process.proc.returncode}")
            continue
        problems.extend(echo_problems(gw, tokens, f"echo through instance {label} after the test"))
    if problems:
        pytest.fail("multi-instance health check: " + "; ".join(problems), pytrace=False)


async def _got_once(client: WsClient, topic: str, what: str):
    """The event on `topic`, exactly once."""
    frame = await client.expect(is_event(topic), what=what)
    await client.expect_none(is_event(topic), within=GRACE, what=f"second copy of {what}")
    return frame


def test_requests_from_sessions_on_both_instances(pair):
    async def scenario():
        s = await pair.sessions()
        for client, user_id in ((s.alice_a, s.alice_id), (s.alice_b, s.alice_id), (s.bob_b, s.bob_id)):
            marker = unique("m")
            assert await client.call_ok(SERVICE, "echo", {"m": marker}) == {"m": marker}
            context = await client.call_ok(SERVICE, "whoami", {})
            assert context["user_id"] == user_id, f"{client.label}: {context}"
        # Pipelined on both instances at once.
        results = await asyncio.gather(
            *(c.call_ok(SERVICE, "add", {"a": i, "b": 100}) for i, c in enumerate(s.all))
        )
        assert results == [100, 101, 102]
        await s.close()

    run(scenario())


def test_targeted_event_reaches_user_on_both_instances(pair):
    async def scenario():
        s = await pair.sessions()
        caller = await pair.mesh.connect(unique("carol"), label="carol@A", gateway=pair.a)
        topic = f"interop.notify.{unique('multi')}"
        event = {"for": "alice", "multi": True}
        result = await caller.call_ok(SERVICE, "emit", {"topic": topic, "payload": event, "target": [s.alice_id]})
        assert result == f"emitted {topic}"
        for alice in (s.alice_a, s.alice_b):
            frame = await _got_once(alice, topic, f"targeted event {topic}")
            assert frame["payload"] == {"topic": topic, "event": event}
        marker = f"interop.notify.{unique('marker')}"
        await caller.call_ok(SERVICE, "emit", {"topic": marker, "payload": {"marker": True}, "target": [s.bob_id]})
        await next_event_is_marker(s.bob_b, marker)
        await caller.expect_none(lambda f: f.get("type") == "event", within=0, what="event for the caller")
        await s.close()
        await caller.close()

    run(scenario())


def test_broadcast_event_reaches_both_instances(pair):
    async def scenario():
        s = await pair.sessions()
        topic = f"interop.broadcast.{unique('multi')}"
        assert await s.bob_b.call_ok(SERVICE, "publish", {"topic": topic, "event": {"hello": "everyone"}}) == f"published {topic}"
        for client in s.all:
            frame = await _got_once(client, topic, f"broadcast {topic}")
            assert frame["payload"]["event"] == {"hello": "everyone"}
        await s.close()

    run(scenario())


def test_shared_service_queue_served_by_both_instances(pair):
    """Calls to the shared service name are taken by either instance: `stats` (answered
    by the instance that took the call) shows both instances' session counts."""

    async def scenario():
        extra_b = [await pair.mesh.connect(unique("dave"), label=f"dave#{i}@B", gateway=pair.b) for i in range(2)]
        s = await pair.sessions()  # A: 1 session, B: 4 sessions
        seen: Set[int] = set()
        # Bounded polling: sessions of earlier tests may take a moment to leave the counts.
        deadline = asyncio.get_running_loop().time() + 5.0
        async with pair.mesh.mesh_client() as client:
            while asyncio.get_running_loop().time() < deadline:
                stats = await client.call_ok(pair.service_name, "stats", {})
                seen.add(stats["sessions"])
                if {1, 4} <= seen:
                    break
                await asyncio.sleep(0.05)
        assert {1, 4} <= seen, f"session counts seen in stats: {sorted(seen)} (expected A=1 and B=4)"
        await s.close()
        for c in extra_b:
            await c.close()

    run(scenario())


def test_push_to_user_reaches_user_on_both_instances(pair):
    """Several calls, so that each instance takes at least one from the shared queue
    (RabbitMQ hands consecutive messages to its consumers in turn)."""

    async def scenario():
        s = await pair.sessions()
        async with pair.mesh.mesh_client() as client:
            for i in range(4):
                topic = f"push.{unique(f'multi{i}')}"
                response = await client.request(
                    pair.service_name, "push_to_user", {"user_id": s.alice_id, "topic": topic, "event": {"i": i}}
                )
                assert response["error"] is None, response
                for alice in (s.alice_a, s.alice_b):
                    frame = await _got_once(alice, topic, f"push #{i}")
                    assert frame["payload"] == {"topic": topic, "event": {"i": i}}
            marker = f"push.{unique('marker')}"
            await client.call_ok(pair.service_name, "push_to_user", {"user_id": s.bob_id, "topic": marker, "event": None})
        await next_event_is_marker(s.bob_b, marker)
        await s.close()

    run(scenario())


def test_push_to_all_reaches_both_instances(pair):
    async def scenario():
        s = await pair.sessions()
        topic = f"all.{unique('multi')}"
        async with pair.mesh.mesh_client() as client:
            await client.call_ok(pair.service_name, "push_to_all", {"topic": topic, "event": [1, 2, 3]})
        for c in s.all:
            frame = await _got_once(c, topic, "push_to_all event")
            assert frame["payload"]["event"] == [1, 2, 3]
        await s.close()

    run(scenario())


def test_disconnect_user_closes_sessions_on_both_instances(pair):
    async def scenario():
        s = await pair.sessions()
        async with pair.mesh.mesh_client() as client:
            response = await client.request(
                pair.service_name, "disconnect_user", {"user_id": s.alice_id, "reason": "interop multi-instance"}
            )
            assert response["error"] is None, response
        for alice in (s.alice_a, s.alice_b):
            code, reason = await alice.wait_closed()
            assert code == 4001, f"{alice.label} closed with {code} {reason!r}, expected 4001"
        # Bob, on the same instance as alice's second session, is untouched.
        await s.bob_b.ping()
        assert await s.bob_b.call_ok(SERVICE, "add", {"a": 2, "b": 3}) == 5
        assert s.bob_b.close_info is None
        await s.close()

    run(scenario())
