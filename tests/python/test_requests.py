"""Requests and commands from WebSocket clients to a real nuropb service, through the gateway."""

import asyncio
import time

from interop_helpers import WsClient, is_response, run, unique


def test_round_trip_with_result(mesh):
    async def scenario():
        alice = await mesh.connect(unique("alice"))
        params = {"text": "h\u00e9llo \U0001f600", "n": 1, "f": 2.5, "nested": {"list": [1, None, True]}}
        assert await alice.call_ok(mesh.service, "echo", params) == params
        assert await alice.call_ok(mesh.service, "add", {"a": 2, "b": 40}) == 42

        # Without a trace id the gateway makes one up and returns it.
        await alice.send({"type": "request", "payload": {"service": mesh.service, "method": "add", "params": {"a": 1, "b": 1}}})
        frame = await alice.expect(lambda f: f.get("type") == "response", what="response without trace_id")
        assert isinstance(frame["payload"]["trace_id"], str) and frame["payload"]["trace_id"]
        assert frame["payload"]["result"] == 2 and frame["payload"]["error"] is None
        await alice.close()

    run(scenario())


def test_service_exception_is_passed_through(mesh):
    async def scenario():
        alice = await mesh.connect(unique("alice"))
        response = await alice.request(mesh.service, "fail", {"message": "boom over ws"}, trace_id="fail-1")
        assert response["result"] is None
        assert response["error"] == {
            "error": "NuropbException",
            "description": f"Runtime exception calling {mesh.service}.fail:ValueError: boom over ws",
        }
        # nuropb 0.1.8 sends a second, bogus response for every failed request (spec §6.1):
        # only the first may reach the client.
        await alice.expect_none(is_response("fail-1"), within=0.3, what="duplicate response")
        response = await alice.request(mesh.service, "reject", {"reason": "not today"})
        assert response["error"] == {"error": "NuropbValidationError", "description": "not today"}
        # Wrong parameters reach the service and come back as its TypeError.
        response = await alice.request(mesh.service, "add", {"a": 1})
        assert response["error"]["error"] == "NuropbException"
        assert "TypeError" in response["error"]["description"]
        await alice.close()

    run(scenario())


def test_unknown_method(mesh):
    async def scenario():
        alice = await mesh.connect(unique("alice"))
        response = await alice.request(mesh.service, "does_not_exist", {})
        assert response["result"] is None
        assert response["error"] == {"error": "NuropbHandlingError", "description": "Unknown method does_not_exist"}
        await alice.close()

    run(scenario())


def test_unknown_service_answered_fast(mesh):
    async def scenario():
        alice = await mesh.connect(unique("alice"))
        started = time.monotonic()
        response = await alice.request("no-such-svc", "echo", {})
        elapsed = time.monotonic() - started
        assert response["result"] is None
        assert response["error"] == {
            "error": "NuropbNotDeliveredError",
            "description": "Service no-such-svc not available. unable to call method echo",
        }
        assert elapsed < 1.0, f"unknown service answered after {elapsed:.2f} s"
        await alice.close()

    run(scenario())


def test_context_carries_user_and_bearer_token(mesh):
    async def scenario():
        user_id = unique("alice")
        token = mesh.tokens(user_id)
        alice = await mesh.connect(user_id)
        trace_id = unique("whoami")
        response = await alice.request(mesh.service, "whoami", {}, trace_id=trace_id)
        assert response["error"] is None, response
        assert response["result"] == {"user_id": user_id, "Authorization": f"Bearer {token}", "trace_id": trace_id}

        # The service also saw the trace id in the AMQP header and the body.
        seen = await alice.call_ok(mesh.service, "seen", {"trace_id": trace_id})
        assert seen is not None, "the service recorded no request with that trace id (header trace_id missing?)"
        assert seen["body_trace_id"] == trace_id and seen["encrypted"] is False

        # @publish_to_mesh(authorize_func=...) gets "Bearer <jwt>" and verifies the JWT.
        response = await alice.request(mesh.service, "needs_token", {})
        assert response["error"] is None, response
        assert response["result"]["claims"]["sub"] == user_id
        assert response["result"]["claims"]["username"] == f"{user_id}@example.com"
        assert response["result"]["user_id"] == user_id
        await alice.close()

    run(scenario())


def test_client_cannot_inject_context(mesh):
    async def scenario():
        user_id = unique("alice")
        token = mesh.tokens(user_id)
        alice = await WsClient.open(mesh.gateway.url, token, label="alice")
        trace_id = unique("inject")
        await alice.send(
            {
                "type": "request",
                "payload": {
                    "service": mesh.service,
                    "method": "whoami",
                    "params": {},
                    "trace_id": trace_id,
                    "context": {"user_id": "mallory", "Authorization": "Bearer forged"},
                },
            }
        )
        frame = await alice.expect(
            lambda f: is_response(trace_id)(f) or "error" in f and "type" not in f, what="answer to a request with a context"
        )
        payload = frame.get("payload", {})
        if payload.get("error") is None and "error" not in frame:
            # Accepted: the extra key must have been ignored.
            assert payload["result"].get("user_id") == user_id, payload
            assert payload["result"].get("Authorization") == f"Bearer {token}", payload
        await alice.close()

    run(scenario())


def test_describe_service_through_gateway(mesh):
    async def scenario():
        alice = await mesh.connect(unique("alice"))
        info = await alice.call_ok(mesh.service, "nuropb_describe", {})
        assert info["service_name"] == mesh.service
        assert info["encrypted_methods"] is True
        assert info["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
        for name in ("echo", "add", "fail", "whoami", "needs_token", "note", "secret", "emit", "publish"):
            assert name in info["methods"], f"{name} missing from describe: {sorted(info['methods'])}"
        assert info["methods"]["secret"]["requires_encryption"] is True
        assert info["methods"]["echo"]["requires_encryption"] is False
        await alice.close()

    run(scenario())


def test_command_is_delivered(mesh):
    async def scenario():
        alice = await mesh.connect(unique("alice"))
        key, trace_id = unique("note"), unique("cmd")
        await alice.send(
            {
                "type": "command",
                "payload": {"service": mesh.service, "method": "note", "params": {"key": key, "text": "written by a command"}, "trace_id": trace_id},
            }
        )
        accepted = await alice.expect(lambda f: f.get("type") == "accepted", what="accepted")
        assert accepted["payload"]["trace_id"] == trace_id
        # Commands are never answered; poll what the service recorded.
        for _ in range(50):
            notes = await alice.call_ok(mesh.service, "notes", {"key": key})
            if notes:
                break
            await asyncio.sleep(0.1)
        assert notes == ["written by a command"]
        seen = await alice.call_ok(mesh.service, "seen", {"trace_id": trace_id})
        assert seen is not None and seen["type"] == "command" and seen["method"] == "note"
        # No response frame is ever produced for a command.
        await alice.expect_none(is_response(trace_id), within=0.3, what="response to a command")
        await alice.close()

    run(scenario())


def test_encrypted_method(mesh):
    """`secret` requires encryption: the gateway learns that from describe, encrypts the
    request with the service's public key and decrypts the encrypted response. The service
    refuses plaintext calls, so a result proves both directions worked."""

    async def scenario():
        alice = await mesh.connect(unique("alice"))
        trace_id = unique("secret")
        response = await alice.request(mesh.service, "secret", {"text": "attack at dawn"}, trace_id=trace_id)
        assert response["error"] is None, f"encrypted call failed: {response}"
        assert response["result"] == {"reversed": "nwad ta kcatta", "encrypted": True}
        seen = await alice.call_ok(mesh.service, "seen", {"trace_id": trace_id})
        assert seen["encrypted"] is True
        # A second call works too (key caching / fresh symmetric key per request).
        response = await alice.request(mesh.service, "secret", {"text": "again"})
        assert response["error"] is None and response["result"]["reversed"] == "niaga", response
        await alice.close()

    run(scenario())


def test_pipelined_requests_answered_out_of_order(mesh):
    async def scenario():
        alice = await mesh.connect(unique("alice"))
        started = time.monotonic()
        await alice.send({"type": "request", "payload": {"service": mesh.service, "method": "sleep", "params": {"seconds": 1.5}, "trace_id": "slow"}})
        await alice.send({"type": "request", "payload": {"service": mesh.service, "method": "echo", "params": {"fast": True}, "trace_id": "fast"}})
        first = await alice.expect(lambda f: f.get("type") == "response", what="first response")
        fast_at = time.monotonic() - started
        assert first["payload"]["trace_id"] == "fast", f"slow request blocked the fast one: {first}"
        assert first["payload"]["result"] == {"fast": True}
        assert fast_at < 1.0, f"fast response after {fast_at:.2f} s"
        second = await alice.expect(is_response("slow"), what="slow response")
        assert second["payload"]["result"] == "slept 1.5"
        assert time.monotonic() - started >= 1.4
        await alice.close()

    run(scenario())


def test_many_concurrent_requests(mesh):
    async def scenario():
        alice = await mesh.connect(unique("alice"))
        n = 50
        for i in range(n):
            await alice.send({"type": "request", "payload": {"service": mesh.service, "method": "add", "params": {"a": i, "b": 1000}, "trace_id": f"many-{i}"}})
        for i in range(n):
            frame = await alice.expect(is_response(f"many-{i}"), what=f"response many-{i}")
            assert frame["payload"]["result"] == i + 1000, frame
        await alice.close()

    run(scenario())


def test_messagepack_request(mesh):
    import msgpack

    async def scenario():
        alice = await mesh.connect(unique("alice"))
        frame = {"type": "request", "payload": {"service": mesh.service, "method": "echo", "params": {"via": "msgpack"}, "trace_id": "mp-1"}}
        await alice.send(msgpack.packb(frame))
        response = await alice.expect(is_response("mp-1"), what="response to a MessagePack request")
        assert response["payload"]["result"] == {"via": "msgpack"}
        await alice.close()

    run(scenario())


def test_python_json_dialect_in_results(mesh):
    """Results as Python's json writes them: NaN/Infinity tokens (not JSON), astral
    characters as surrogate-pair escapes, deep nesting. The client gets valid JSON, and a
    result the gateway cannot take is answered with an error at once, not after the request
    timeout."""

    async def scenario():
        alice = await mesh.connect(unique("alice"))
        values = await alice.call_ok(mesh.service, "python_values", {})
        assert values["astral"] == "\U0001f600 \u00e9"
        assert values["float"] == 1.0
        # JSON has no NaN/Infinity; whatever stands in for them must be valid JSON (the
        # frame parsed) and not a number.
        for key in ("nan", "inf", "ninf"):
            assert not isinstance(values[key], (int, float)), values

        deep = await alice.call_ok(mesh.service, "deep", {"levels": 100})
        for _ in range(100):
            deep = deep["d"]
        assert deep == "bottom"

        started = time.monotonic()
        response = await alice.request(mesh.service, "deep", {"levels": 500})
        elapsed = time.monotonic() - started
        assert elapsed < 3.0, f"answered after {elapsed:.2f} s: waited for the request timeout?"
        if response["error"] is None:
            value = response["result"]
            for _ in range(500):
                value = value["d"]
            assert value == "bottom"
        await alice.close()

    run(scenario())


def test_traceparent_reaches_the_service_as_its_trace_id(mesh):
    """A W3C traceparent in the request is the NuroPb trace_id the service sees (header and
    context); the answer keeps the client's own trace_id. A malformed one never reaches it."""

    async def scenario():
        alice = await mesh.connect(unique("alice"))
        tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-" + unique("p").encode().hex()[:16].rjust(16, "1") + "-01"
        await alice.send({
            "type": "request",
            "payload": {"service": mesh.service, "method": "whoami", "params": {}, "trace_id": "tp-mine", "traceparent": tp},
        })
        frame = await alice.expect(is_response("tp-mine"), what="whoami response")
        assert frame["payload"]["error"] is None, frame
        assert frame["payload"]["result"]["trace_id"] == tp
        seen = await alice.call_ok(mesh.service, "seen", {"trace_id": tp})
        assert seen is not None and seen["method"] == "whoami", seen
        assert seen["body_trace_id"] == tp and seen["context"]["trace_id"] == tp, seen

        await alice.send({
            "type": "request",
            "payload": {"service": mesh.service, "method": "whoami", "params": {}, "trace_id": "tp-bad", "traceparent": tp.upper()},
        })
        frame = await alice.expect(is_response("tp-bad"), what="refusal")
        assert frame["payload"]["error"]["error"] == "NuropbValidationError", frame
        assert "traceparent" in frame["payload"]["error"]["description"], frame
        assert await alice.call_ok(mesh.service, "seen", {"trace_id": tp.upper()}) is None
        await alice.close()

    run(scenario())
