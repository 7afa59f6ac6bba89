"""A nuropb service with an encrypted method restarts with a new RSA key.

nuropb services often generate their key at start (the interop service does), and a
nuropb 0.1.8 service handed a body encrypted for another key rejects it twice and drops off
the mesh for good (spec §7.5). The gateway therefore never encrypts with a key older than
its key TTL (`encryption_key_ttl`, flag `--encryption-key-ttl-secs`, default 30 s), and drops
a service's key when an encrypted call to it gets no response.

The test runs its own service process (`interop-svc-rekey-…`) so that killing it cannot
disturb the suite's service, and its own gateway with a short key TTL when the binary has
the flag; otherwise it uses the suite's gateway and waits out the default TTL.

What it shows, with the real nuropb service:
1. restarted within the key TTL, the service receives a body for its old key and dies (the
   residual window the crate docs describe); the gateway answers `NuropbTimeoutError`;
2. that timeout dropped the key: after another restart, the next encrypted call works at
   once (the gateway looks the key up first);
3. restarted again, the encrypted method works once the key TTL has passed.
"""

import asyncio
import time
import uuid

import pytest

from conftest import gateway_has_flag, start_extra_gateway, start_extra_service
from interop_helpers import run, unique

KEY_TTL_FLAG = "--encryption-key-ttl-secs"
SHORT_KEY_TTL = 3.0
SHORT_REQUEST_TIMEOUT = 2.0
DEFAULT_KEY_TTL = 30.0
# The suite gateway's --request-timeout-ms (conftest.REQUEST_TIMEOUT_MS).
SUITE_REQUEST_TIMEOUT = 5.0
MARGIN = 0.5


@pytest.fixture(scope="module")
def rekey(config, gateway):
    """(gateway, its key TTL, its request timeout, the service process)."""
    name = f"interop-svc-rekey-{uuid.uuid4().hex[:6]}"
    service = start_extra_service(config, "service-rekey", name)
    own_gateway = None
    try:
        if gateway_has_flag(config, KEY_TTL_FLAG):
            own_gateway = start_extra_gateway(
                config,
                "gateway-rekey",
                f"interop-gw-rekey-{uuid.uuid4().hex[:6]}",
                **{
                    KEY_TTL_FLAG: str(int(SHORT_KEY_TTL)),
                    "--request-timeout-ms": str(int(SHORT_REQUEST_TIMEOUT * 1000)),
                },
            )
            yield own_gateway, SHORT_KEY_TTL, SHORT_REQUEST_TIMEOUT, name, service
        else:
            yield gateway, DEFAULT_KEY_TTL, SUITE_REQUEST_TIMEOUT, name, service
    finally:
        if own_gateway is not None:
            own_gateway.process.stop()
        service.stop(grace=2)


def restart(service) -> float:
    """Restarts the service (a new RSA key); returns how long it took."""
    started = time.monotonic()
    # A service that died of an undecryptable body may not stop cleanly.
    service.stop(grace=2)
    service.start()
    return time.monotonic() - started


# Waits out the key TTL: 30 s with the suite's gateway when the binary lacks the flag.
@pytest.mark.timeout(120)
def test_encrypted_method_works_again_after_a_restart_with_a_new_key(mesh, rekey):
    gw, key_ttl, request_timeout, name, service = rekey

    async def secret(client, text: str):
        return await client.request(name, "secret", {"text": text}, timeout=request_timeout + 5)

    async def scenario():
        alice = await mesh.connect(unique("alice"), gateway=gw)
        first_pid = await alice.call_ok(name, "pid")
        response = await secret(alice, "one")
        assert response["error"] is None, response
        assert response["result"] == {"reversed": "eno", "encrypted": True}
        key_fetched = time.monotonic()

        # 1. Restarted within the key TTL: the old key is still used, the new instance
        # cannot decrypt the body, nuropb drops off the mesh, the call times out.
        took = await asyncio.to_thread(restart, service)
        assert await alice.call_ok(name, "pid") != first_pid
        since = time.monotonic() - key_fetched
        assert since < key_ttl - MARGIN, f"the restart took {took:.1f} s: the key expired before the check"
        response = await secret(alice, "two")
        assert response["error"] is not None and response["error"]["error"] == "NuropbTimeoutError", response

        # 2. The timeout dropped the key: after a restart, the next call looks it up first.
        await asyncio.to_thread(restart, service)
        response = await secret(alice, "three")
        assert response["error"] is None, f"right after the restart that followed a timeout: {response}"
        assert response["result"]["reversed"] == "eerht"
        key_fetched = time.monotonic()

        # 3. Restarted again: once the key is older than its TTL, the gateway looks it up
        # before encrypting, and the call works.
        await asyncio.to_thread(restart, service)
        wait = key_fetched + key_ttl + MARGIN - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        response = await secret(alice, "four")
        assert response["error"] is None, f"after the key TTL: {response}"
        assert response["result"] == {"reversed": "ruof", "encrypted": True}
        assert service.alive()
        await alice.close()

    run(scenario(), timeout=key_ttl + 3 * request_timeout + 40)
