"""Opaque (non-JWT) tokens checked by a NuroPb service method: a gateway started with
`--auth-service-method interop-svc.authorise` asks the suite's real nuropb service about
every token that is not a JWT, and caches the answers (`--auth-cache-secs`)."""

from websockets.exceptions import InvalidStatus

from conftest import SERVICE, start_extra_gateway
from interop_helpers import WsClient, run, unique


def _status_of(url, token):
    async def attempt():
        try:
            client = await WsClient.open(url, token)
        except InvalidStatus as err:
            return err.response.status_code
        await client.close()
        return 101

    return run(attempt())


def test_opaque_tokens_are_checked_by_the_service_and_cached(mesh):
    gw = start_extra_gateway(
        mesh.cfg,
        "gateway-opaque",
        unique("opaque-gw"),
        **{"--auth-service-method": f"{SERVICE}.authorise", "--auth-cache-secs": "30"},
    )
    try:
        user_id = unique("olive")
        token = f"opaque-ok-{user_id}"

        async def scenario():
            # A known opaque token: a session of the user the service named.
            first = await WsClient.open(gw.url, token, label="olive#1")
            assert first.hello.user_id == user_id
            assert first.hello.username == f"{user_id}@opaque"
            calls = await first.call_ok(SERVICE, "authorise_calls", {"token": token})
            assert calls == 1, calls
            # Within the cache time a second connection makes no second call.
            second = await WsClient.open(gw.url, token, label="olive#2")
            assert second.hello.user_id == user_id
            assert await second.call_ok(SERVICE, "authorise_calls", {"token": token}) == 1
            # JWTs still go to the JWT check, not to the service.
            jwt_user = unique("jay")
            jay = await WsClient.open(gw.url, mesh.tokens(jwt_user), label="jay")
            assert jay.hello.user_id == jwt_user
            for c in (first, second, jay):
                await c.close()
            return calls

        run(scenario())

        # An unknown opaque token: the service refuses it, the upgrade answers 401.
        unknown = f"opaque-nope-{unique('x')}"
        assert _status_of(gw.url, unknown) == 401

        async def asked():
            client = await WsClient.open(gw.url, token, label="olive#3")
            try:
                return await client.call_ok(SERVICE, "authorise_calls", {"token": unknown})
            finally:
                await client.close()

        # The refusal came from the service (it was asked), and is not cached.
        assert run(asked()) == 1
        assert _status_of(gw.url, unknown) == 401
        assert run(asked()) == 2
    finally:
        gw.process.stop()
