"""The gateway as a nuropb service: a Python mesh client (client-only RMQAPI) calls its
methods push_to_user, push_to_all, disconnect_user, stats and nuropb_describe."""

import asyncio

from interop_helpers import is_event, run, unique


def test_describe_gateway_from_python(mesh):
    async def scenario():
        async with mesh.mesh_client() as client:
            info = await client.call_ok(mesh.gateway.service_name, "nuropb_describe", {})
        assert info["service_name"] == mesh.gateway.service_name
        for method in ("push_to_user", "push_to_all", "disconnect_user", "stats"):
            assert method in info["methods"], f"{method} missing from {sorted(info['methods'])}"
        assert info["encrypted_methods"] is False

    run(scenario())


def test_push_to_user_from_python(mesh):
    async def scenario():
        alice_id, bob_id, alice1, alice2, bob = await mesh.three_sessions()
        topic, marker = f"push.{unique('p')}", f"push.{unique('marker')}"
        async with mesh.mesh_client() as client:
            gw = mesh.gateway.service_name
            response = await client.request(gw, "push_to_user", {"user_id": alice_id, "topic": topic, "event": {"msg": "hi alice"}})
            assert response["error"] is None, response
            for alice in (alice1, alice2):
                frame = await alice.expect(is_event(topic), what="pushed event")
                assert frame["payload"] == {"topic": topic, "event": {"msg": "hi alice"}}
            await client.call_ok(gw, "push_to_user", {"user_id": bob_id, "topic": marker, "event": None})
        frame = await bob.expect(is_event(), what="marker push")
        assert frame["payload"]["topic"] == marker, f"bob got alice's push: {frame}"
        for c in (alice1, alice2, bob):
            await c.close()

    run(scenario())


def test_push_to_all_from_python(mesh):
    async def scenario():
        _, _, alice1, alice2, bob = await mesh.three_sessions()
        topic = f"all.{unique('a')}"
        async with mesh.mesh_client() as client:
            await client.call_ok(mesh.gateway.service_name, "push_to_all", {"topic": topic, "event": [1, 2, 3]})
        for c in (alice1, alice2, bob):
            frame = await c.expect(is_event(topic), what="push_to_all event")
            assert frame["payload"]["event"] == [1, 2, 3]
            await c.close()

    run(scenario())


def test_stats_from_python(mesh):
    async def scenario():
        _, _, alice1, alice2, bob = await mesh.three_sessions()
        async with mesh.mesh_client() as client:
            stats = await client.call_ok(mesh.gateway.service_name, "stats", {})
            assert isinstance(stats, dict) and isinstance(stats.get("sessions"), int), stats
            assert stats["sessions"] >= 3, stats
            with_three = stats["sessions"]
            await bob.close()
            await bob.wait_closed()
            # The gateway notices the close asynchronously.
            for _ in range(30):
                stats = await client.call_ok(mesh.gateway.service_name, "stats", {})
                if stats["sessions"] <= with_three - 1:
                    break
                await asyncio.sleep(0.1)
            assert stats["sessions"] <= with_three - 1, f"closed session still counted: {stats}"
        for c in (alice1, alice2):
            await c.close()

    run(scenario())


def test_disconnect_user_from_python(mesh):
    async def scenario():
        alice_id, _, alice1, alice2, bob = await mesh.three_sessions()
        async with mesh.mesh_client() as client:
            response = await client.request(mesh.gateway.service_name, "disconnect_user", {"user_id": alice_id, "reason": "interop test"})
            assert response["error"] is None, response
        for alice in (alice1, alice2):
            code, reason = await alice.wait_closed()
            assert code is not None, f"{alice.label} closed without a close frame"
        # Bob is untouched.
        await bob.ping()
        assert await bob.call_ok(mesh.service, "add", {"a": 1, "b": 2}) == 3
        await bob.close()

    run(scenario())


def test_websocket_clients_cannot_call_the_gateways_own_methods(mesh):
    """The gateway's methods are for mesh peers: a WebSocket client naming the gateway's
    service is refused before anything is published, and nobody is pushed to or kicked."""

    async def scenario():
        alice_id, bob_id, alice1, alice2, bob = await mesh.three_sessions()
        gw = mesh.gateway.service_name
        for method, params in (
            ("push_to_all", {"topic": "hello", "event": {"msg": "re-enter your password"}}),
            ("disconnect_user", {"user_id": alice_id, "reason": "kicked by bob"}),
            ("stats", {}),
        ):
            response = await bob.request(gw, method, params)
            assert response["error"]["error"] == "NuropbAuthorizationError", response
        # Alice was neither pushed to nor disconnected: her sessions still answer.
        for alice in (alice1, alice2):
            await alice.expect_none(lambda f: f.get("type") == "event", within=0.3, what="a forged push")
            await alice.ping()
        for c in (alice1, alice2, bob):
            await c.close()

    run(scenario())
