"""Handshake, authentication, origin checks, configuration through the environment, the
request timeout, and exchange compatibility with nuropb's own broker configuration."""

import os
import time
import uuid

import pytest
from websockets.exceptions import InvalidStatus

from conftest import ALLOWED_ORIGIN, SERVICE, start_gateway
from interop_helpers import WsClient, is_event, is_response, make_token, run, unique


def test_hello_frame(mesh):
    async def scenario():
        user_id = unique("alice")
        alice = await mesh.connect(user_id)
        assert alice.hello.user_id == user_id
        assert alice.hello.username == f"{user_id}@example.com"
        assert isinstance(alice.hello.session_id, str) and alice.hello.session_id
        await alice.ping()
        await alice.close()

    run(scenario())


def _status_of_refused(url, **kw):
    async def attempt():
        try:
            client = await WsClient.open(url, **kw)
        except InvalidStatus as err:
            return err.response.status_code
        await client.close()
        return 101

    return run(attempt())


@pytest.mark.parametrize(
    "case",
    ["wrong secret", "expired", "not a jwt", "missing sub", "missing exp", "alg none"],
)
def test_bad_token_refused_with_401(mesh, case):
    import jwt as pyjwt

    user = unique("eve")
    secret = mesh.cfg.jwt_secret
    tokens = {
        "wrong secret": make_token("not-the-secret-" + "0" * 40, user),
        "expired": make_token(secret, user, ttl=-120),
        "not a jwt": "not-a-token",
        "missing sub": pyjwt.encode({"username": user, "exp": int(time.time()) + 60}, secret, algorithm="HS256"),
        "missing exp": pyjwt.encode({"sub": user, "username": user}, secret, algorithm="HS256"),
        "alg none": pyjwt.encode({"sub": user, "username": user, "exp": int(time.time()) + 60}, None, algorithm="none"),
    }
    assert _status_of_refused(mesh.gateway.url, token=tokens[case]) == 401


def test_no_token_takes_the_first_frame_route(mesh):
    """An upgrade without credentials is accepted; only an `auth` frame is acted on first."""

    async def scenario():
        user_id = unique("fay")
        eve = await WsClient.open(mesh.gateway.url, label="eve", expect_hello=False)
        await eve.send({"type": "ping", "id": "p-0"})
        assert await eve.wait_closed() == (4401, "authentication required")
        fay = await WsClient.open(mesh.gateway.url, label="fay", expect_hello=False)
        await fay.send({"type": "auth", "payload": {"token": mesh.tokens(user_id)}})
        hello = (await fay.expect(is_event("hello")))["payload"]["event"]
        assert hello["user_id"] == user_id
        assert isinstance(hello["expires_at"], int) and hello["expires_at"] > time.time()
        await fay.send({"type": "ping", "id": "p-1"})
        pong = await fay.expect(lambda f: f.get("type") == "pong", what="pong")
        assert pong == {"type": "pong", "payload": {}, "id": "p-1"}
        result = await fay.call_ok(SERVICE, "whoami", {})
        assert result["user_id"] == user_id
        await fay.close()

    run(scenario())


def test_cookie_authentication(mesh):
    async def scenario():
        user_id = unique("bob")
        token = mesh.tokens(user_id)
        bob = await WsClient.open(mesh.gateway.url, headers={"Cookie": f"Authorization={token}"}, label="bob")
        assert bob.hello.user_id == user_id
        result = await bob.call_ok(SERVICE, "whoami", {})
        assert result["user_id"] == user_id and result["Authorization"] == f"Bearer {token}"
        await bob.close()

    run(scenario())


def test_origin_check(mesh):
    token = mesh.tokens(unique("alice"))
    assert _status_of_refused(mesh.gateway.url, token=token, origin=ALLOWED_ORIGIN) == 101
    assert _status_of_refused(mesh.gateway.url, token=token, origin="https://evil.example.org") == 403


def test_exchanges_compatible_with_nuropb_configure(mesh):
    """nuropb's own configure_nuropb_rmq (what every Python mesh runs to set up a vhost)
    re-declares the exchanges the gateway declared: type and flags must agree, or it fails
    with PRECONDITION_FAILED."""
    from nuropb.rmq_lib import configure_nuropb_rmq

    assert configure_nuropb_rmq(
        rmq_url=mesh.cfg.amqp_url,
        events_exchange="nuropb-events-exchange",
        rpc_exchange="nuropb-rpc-exchange",
        dl_exchange="nuropb-dl-exchange",
        dl_queue="nuropb-dl-queue",
    )


def test_config_from_environment_and_request_timeout(mesh, config):
    """A second gateway configured only through NUROPB_* variables, with a 500 ms request
    timeout: it authenticates with the env secret, forwards requests, and answers a request
    the service does not answer in time with an error instead of waiting."""
    name = f"interop-gw-env-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "NUROPB_LISTEN": "127.0.0.1:0",
        "NUROPB_AMQP_URL": config.amqp_url,
        "NUROPB_JWT_SECRET": config.jwt_secret,
        "NUROPB_SERVICE_NAME": name,
        "NUROPB_INSTANCE_ID": uuid.uuid4().hex,
        "NUROPB_EVENT_BINDINGS": "interop-env.#",
        "NUROPB_BROADCAST_TOPICS": "interop-env.broadcast.#",
        "NUROPB_REQUEST_TIMEOUT_MS": "500",
        "NUROPB_ALLOWED_ORIGINS": "*",
    }
    process = start_gateway(config, "gateway-env", [config.gateway_bin], env=env)
    try:
        port = int(process.ready_match.group(1))
        url = f"ws://127.0.0.1:{port}/ws"

        async def scenario():
            client = await WsClient.open(url, mesh.tokens(unique("envuser")), label="env-client")
            assert await client.call_ok(SERVICE, "echo", {"env": True}) == {"env": True}
            started = time.monotonic()
            response = await client.request(SERVICE, "sleep", {"seconds": 2.5}, trace_id="too-slow", timeout=4)
            elapsed = time.monotonic() - started
            assert response["error"] is not None and response["result"] is None, response
            assert 0.4 <= elapsed <= 1.8, f"timeout answered after {elapsed:.2f} s (configured 500 ms)"
            # The late answer from the service is dropped, not forwarded.
            await client.expect_none(is_response("too-slow"), within=2.5, what="late response")
            await client.ping()
            await client.close()

        run(scenario())
    finally:
        process.stop()
