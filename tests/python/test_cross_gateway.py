"""Two gateway deployments on one vhost, under different service names.

A client of one gateway must not reach the other gateway's methods by naming its service:
every call a gateway relays for a client carries the AMQP header `x-nuropb-gateway`, and a
gateway answers such calls only for `nuropb_describe` (anything else gets
`NuropbAuthorizationError`). Mesh peers, which send no such header, still reach them.
"""

import uuid

import pytest

from conftest import start_extra_gateway
from interop_helpers import is_event, run, unique


@pytest.fixture(scope="module")
def other_gateway(config, service):
    gw = start_extra_gateway(config, "gateway-other", f"interop-gw-other-{uuid.uuid4().hex[:6]}")
    yield gw
    gw.process.stop()


def test_client_of_one_gateway_cannot_use_another_gateways_methods(mesh, other_gateway):
    async def scenario():
        other = other_gateway.service_name
        bob_id = unique("bob")
        bob = await mesh.connect(bob_id, gateway=other_gateway)
        mallory = await mesh.connect(unique("mallory"))
        for method, params in (
            ("disconnect_user", {"user_id": bob_id, "reason": "kicked from another deployment"}),
            ("push_to_user", {"user_id": bob_id, "topic": "hello", "event": {"msg": "re-enter your password"}}),
            ("push_to_all", {"topic": "hello", "event": {"msg": "re-enter your password"}}),
            ("stats", {}),
        ):
            response = await mallory.request(other, method, params)
            assert response["result"] is None, response
            assert response["error"]["error"] == "NuropbAuthorizationError", response
            assert mesh.gateway.service_name in response["error"]["description"], response
        described = await mallory.call_ok(other, "nuropb_describe")
        assert described["service_name"] == other
        # Bob was neither pushed to nor disconnected.
        await bob.expect_none(is_event("hello"), within=0.3, what="a forged push")
        await bob.ping()

        # A mesh peer is not a client: its call goes through.
        async with mesh.mesh_client() as peer:
            response = await peer.request(other, "disconnect_user", {"user_id": bob_id, "reason": "by a peer"})
            assert response["error"] is None, response
        code, _ = await bob.wait_closed()
        assert code is not None, "bob closed without a close frame"
        await mallory.close()

    run(scenario())
