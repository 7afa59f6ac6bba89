"""Mesh events reaching WebSocket clients: targeted, broadcast and subscribed.

Negative checks ("bob does not get it") use a marker (`next_event_is_marker`): after the
event under test, a second event that bob *should* get is sent; bob's next event frame must
be the marker.
"""

import asyncio

from interop_helpers import is_event, next_event_is_marker, run, unique


async def _close(*clients):
    for c in clients:
        await c.close()


def test_targeted_event_reaches_only_that_users_sessions(mesh):
    async def scenario():
        alice_id, bob_id, alice1, alice2, bob = await mesh.three_sessions()
        caller = await mesh.connect(unique("carol"), label="carol")
        topic = f"interop.notify.{unique('t')}"
        event = {"for": "alice", "n": 1}
        result = await caller.call_ok(mesh.service, "emit", {"topic": topic, "payload": event, "target": [alice_id]})
        assert result == f"emitted {topic}"
        for alice in (alice1, alice2):
            frame = await alice.expect(is_event(topic), what=f"targeted event {topic}")
            assert frame["payload"] == {"topic": topic, "event": event}
        marker = f"interop.notify.{unique('marker')}"
        await caller.call_ok(mesh.service, "emit", {"topic": marker, "payload": {"marker": True}, "target": [bob_id]})
        await next_event_is_marker(bob, marker)
        await caller.expect_none(lambda f: f.get("type") == "event", within=0, what="event for the caller")
        await _close(alice1, alice2, bob, caller)

    run(scenario())


def test_event_from_encrypted_request_reaches_the_user(mesh):
    """nuropb 0.1.8 publishes events raised by an encrypted request with header
    encrypted=yes over a plaintext body (spec §16 N9). The gateway must still deliver them
    (and must not stall its event stream)."""

    async def scenario():
        alice_id = unique("alice")
        alice = await mesh.connect(alice_id)
        topic = f"interop.notify.{unique('n9')}"
        result = await alice.call_ok(mesh.service, "secret_emit", {"topic": topic, "payload": {"secret": False}})
        assert result == f"emitted {topic}"
        frame = await alice.expect(is_event(topic), what="event raised by an encrypted request")
        assert frame["payload"]["event"] == {"secret": False}
        marker = f"interop.notify.{unique('marker')}"
        await alice.call_ok(mesh.service, "emit", {"topic": marker, "payload": 1, "target": [alice_id]})
        await next_event_is_marker(alice, marker)
        await alice.close()

    run(scenario())


def test_broadcast_event_reaches_everyone(mesh):
    async def scenario():
        _, _, alice1, alice2, bob = await mesh.three_sessions()
        topic = f"interop.broadcast.{unique('b')}"
        result = await bob.call_ok(mesh.service, "publish", {"topic": topic, "event": {"hello": "all"}})
        assert result == f"published {topic}"
        for client in (alice1, alice2, bob):
            frame = await client.expect(is_event(topic), what=f"broadcast {topic}")
            assert frame["payload"]["event"] == {"hello": "all"}
        await _close(alice1, alice2, bob)

    run(scenario())


def test_subscribed_topic_event(mesh):
    async def scenario():
        _, _, alice1, alice2, bob = await mesh.three_sessions()
        base = f"interop.sub.{unique('s')}"
        pattern = f"{base}.*"
        await alice1.send({"type": "subscribe", "payload": {"topics": [pattern]}})
        frame = await alice1.expect(lambda f: f.get("type") == "subscribed", what="subscribed")
        assert pattern in frame["payload"]["topics"]

        await bob.call_ok(mesh.service, "publish", {"topic": f"{base}.x", "event": {"n": 1}})
        frame = await alice1.expect(is_event(f"{base}.x"), what="subscribed event")
        assert frame["payload"]["event"] == {"n": 1}
        # `*` is one word: base.x.y does not match; sessions without the subscription get nothing.
        await bob.call_ok(mesh.service, "publish", {"topic": f"{base}.x.y", "event": {"n": 2}})
        marker = f"interop.broadcast.{unique('marker')}"
        await bob.call_ok(mesh.service, "publish", {"topic": marker, "event": {}})
        for client in (alice1, alice2, bob):
            await next_event_is_marker(client, marker)

        await alice1.send({"type": "unsubscribe", "payload": {"topics": [pattern]}})
        frame = await alice1.expect(lambda f: f.get("type") in ("unsubscribed", "subscribed"), what="unsubscribe ack")
        assert pattern not in frame["payload"]["topics"], frame
        await bob.call_ok(mesh.service, "publish", {"topic": f"{base}.x", "event": {"n": 3}})
        marker = f"interop.broadcast.{unique('marker')}"
        await bob.call_ok(mesh.service, "publish", {"topic": marker, "event": {}})
        await next_event_is_marker(alice1, marker)
        await _close(alice1, alice2, bob)

    run(scenario())


def test_event_to_service_binding_still_reaches_service(mesh):
    """The gateway's bindings do not steal events from services: the Python service's own
    binding (interop.to-service.#) still gets its copy."""

    async def scenario():
        alice = await mesh.connect(unique("alice"))
        topic = f"interop.to-service.{unique('e')}"
        await alice.call_ok(mesh.service, "publish", {"topic": topic, "event": {"x": 1}})
        for _ in range(50):
            events = await alice.call_ok(mesh.service, "events_seen", {})
            if any(e["topic"] == topic for e in events):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"the service never got {topic}")
        await alice.close()

    run(scenario())


def test_per_user_subscription_template_and_refusals(mesh):
    """`--subscribable-topics interop.users.{user_id}.#`: a user may subscribe to their own
    topics only; other users' topics, wildcards over users and unlisted topics are refused."""

    async def scenario():
        alice_id, bob_id, alice1, alice2, bob = await mesh.three_sessions()
        for pattern in (f"interop.users.{alice_id}.#", "interop.users.*.notify", "interop.#", "#"):
            await bob.send({"type": "subscribe", "payload": {"topics": [pattern]}})
            frame = await bob.expect(lambda f: "error" in f, what=f"refusal of {pattern}")
            assert frame["error"] == "NuropbValidationError", frame
            assert "not open to subscription" in frame["description"], frame

        own = f"interop.users.{alice_id}.notify"
        await alice1.send({"type": "subscribe", "payload": {"topics": [own]}})
        frame = await alice1.expect(lambda f: f.get("type") == "subscribed", what="subscribed")
        assert own in frame["payload"]["topics"]
        await bob.call_ok(mesh.service, "publish", {"topic": own, "event": {"otp": "492113"}})
        frame = await alice1.expect(is_event(own), what="alice's own notification")
        assert frame["payload"]["event"] == {"otp": "492113"}
        marker = f"interop.broadcast.{unique('marker')}"
        await bob.call_ok(mesh.service, "publish", {"topic": marker, "event": {}})
        for client in (alice2, bob):
            await next_event_is_marker(client, marker)
        await _close(alice1, alice2, bob)

    run(scenario())
