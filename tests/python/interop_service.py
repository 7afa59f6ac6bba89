"""A real, unmodified nuropb 0.1.8 service used by the interop suite.

Run it on its own with:

    python tests/python/interop_service.py --amqp-url amqp://guest:guest@127.0.0.1:5672/<vhost> \
        --service-name interop-svc [--jwt-secret SECRET] [--configure]

It prints ``interop-service ready`` on stdout once it consumes from its queue. The exchanges
must exist before it starts (the gateway declares them, or pass ``--configure`` to have
nuropb's own ``configure_nuropb_rmq`` declare them, which needs no management API).

Every method exists to make one interop scenario observable from the WebSocket side: the
service records what reached it (context, whether the request was encrypted, commands,
events) and hands it back through ordinary requests, so a test can check what the gateway
actually put on the wire without sniffing AMQP.
"""

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any, Dict, List, Optional

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from nuropb.contexts.context_manager import NuropbContextManager
from nuropb.contexts.context_manager_decorator import nuropb_context
from nuropb.contexts.describe import publish_to_mesh
from nuropb.interface import (
    NuropbAuthorizationError,
    NuropbSuccess,
    NuropbValidationError,
)
from nuropb.rmq_api import RMQAPI
from nuropb.rmq_lib import configure_nuropb_rmq

logger = logging.getLogger("interop_service")

READY_LINE = "interop-service ready"

# Set from --jwt-secret before the service object is built; read by `authorize_token`.
_JWT_SECRET: Optional[str] = None

# How many requests of each kind the service keeps, so a long run cannot grow it unbounded.
_RECORD_LIMIT = 1000

# The opaque tokens `authorise` accepts: this prefix, then the user id.
OPAQUE_PREFIX = "opaque-ok-"


def authorize_token(token: str) -> Dict[str, Any]:
    """The `authorize_func` of `needs_token`: nuropb hands it `context["Authorization"]`.

    The gateway promises ``"Bearer <jwt>"`` there. The service verifies the JWT itself with
    the shared secret, which proves the gateway forwarded the client's real token.
    """
    if not isinstance(token, str) or not token.startswith("Bearer "):
        raise NuropbAuthorizationError(
            description=f"expected 'Bearer <jwt>' in context Authorization, got {token!r:.80}"
        )
    if _JWT_SECRET is None:
        raise NuropbAuthorizationError(description="service started without --jwt-secret")
    try:
        return jwt.decode(token[len("Bearer ") :], _JWT_SECRET, algorithms=["HS256"])
    except jwt.PyJWTError as err:
        raise NuropbAuthorizationError(description=f"token rejected by the service: {err}")


def _bounded_put(store: Dict[str, Any], key: str, value: Any) -> None:
    if len(store) >= _RECORD_LIMIT:
        store.pop(next(iter(store)))
    store[key] = value


class InteropService:
    """Interop test service: echo, errors, context, commands, encryption and events."""

    _service_name: str
    _version = "0.1.8-interop"
    _private_key: rsa.RSAPrivateKey

    def __init__(self, service_name: str) -> None:
        self._service_name = service_name
        # nuropb's Encryptor and describe read `_private_key`: describe publishes its public
        # half (only because `secret` requires encryption) and the transport decrypts with it.
        self._private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._api: Optional[RMQAPI] = None
        # trace_id -> what the transport saw for that request/command (see RecordingRMQAPI).
        self._seen: Dict[str, Dict[str, Any]] = {}
        # key -> texts recorded by the `note` command.
        self._notes: Dict[str, List[str]] = {}
        # Events delivered to `_handle_event_`.
        self._events: List[Dict[str, Any]] = []
        # token -> how many times `authorise` was called with it.
        self._authorise_calls: Dict[str, int] = {}

    # --- plain request/response -------------------------------------------------------

    def echo(self, **params: Any) -> Dict[str, Any]:
        """Returns its parameters."""
        return params

    def add(self, a: int, b: int) -> int:
        """Adds two numbers."""
        return a + b

    def fail(self, message: str) -> None:
        """Raises a plain ValueError: nuropb wraps it as NuropbException."""
        raise ValueError(message)

    # --- the gateway's mesh token check (`--auth-service-method interop-svc.authorise`) ---

    def authorise(self, token: str) -> Dict[str, Any]:
        """Checks an opaque token the way nuropb-gw's `authorise_from_token` did: a known
        token (``opaque-ok-<user>``) gives the user's claims, any other an authorization
        error. Every call is counted per token (see `authorise_calls`)."""
        _bounded_put(self._authorise_calls, token, self._authorise_calls.get(token, 0) + 1)
        if not isinstance(token, str) or not token.startswith(OPAQUE_PREFIX) or token == OPAQUE_PREFIX:
            raise NuropbAuthorizationError(description="unknown token")
        user_id = token[len(OPAQUE_PREFIX) :]
        return {"user_id": user_id, "username": f"{user_id}@opaque", "expires_at": time.time() + 600}

    def authorise_calls(self, token: str) -> int:
        """How many times `authorise` was asked about `token`."""
        return self._authorise_calls.get(token, 0)

    def reject(self, reason: str) -> None:
        """Raises a NuropbValidationError: nuropb passes it through by name."""
        raise NuropbValidationError(description=reason)

    async def sleep(self, seconds: float) -> str:
        """Sleeps without blocking the service (the service uses a prefetch above 1)."""
        await asyncio.sleep(float(seconds))
        return f"slept {seconds}"

    # --- context and authorisation ------------------------------------------------------

    @nuropb_context
    def whoami(self, ctx: NuropbContextManager) -> Dict[str, Any]:
        """Returns the mesh context the request carried."""
        return dict(ctx.context)

    @nuropb_context
    @publish_to_mesh(authorize_func=authorize_token)
    def needs_token(self, ctx: NuropbContextManager) -> Dict[str, Any]:
        """Only reachable with a valid bearer token in context["Authorization"]."""
        return {"claims": ctx.user_claims, "user_id": ctx.context.get("user_id")}

    def seen(self, trace_id: str) -> Optional[Dict[str, Any]]:
        """What the transport saw for the request or command with this trace id."""
        return self._seen.get(trace_id)

    # --- commands -------------------------------------------------------------------------

    def note(self, key: str, text: str) -> str:
        """Meant to be sent as a command: records `text` under `key`."""
        notes = self._notes.setdefault(key, [])
        if len(notes) < _RECORD_LIMIT:
            notes.append(text)
        return "noted"

    def notes(self, key: str) -> List[str]:
        """What `note` recorded under `key`."""
        return list(self._notes.get(key, []))

    # --- encryption -----------------------------------------------------------------------

    @nuropb_context
    @publish_to_mesh(requires_encryption=True)
    def secret(self, ctx: NuropbContextManager, text: str) -> Dict[str, Any]:
        """Requires encryption. nuropb does not enforce `requires_encryption`, so this
        method does: a plaintext call fails, an encrypted one gets `text` reversed back."""
        trace_id = ctx.context.get("trace_id")
        seen = self._seen.get(trace_id) if isinstance(trace_id, str) else None
        if not seen or not seen.get("encrypted"):
            raise NuropbValidationError(
                description=f"secret must be called encrypted (trace_id {trace_id!r}, seen {seen!r})"
            )
        return {"reversed": text[::-1], "encrypted": True}

    # --- events ---------------------------------------------------------------------------

    def emit(self, topic: str, payload: Any, target: Optional[List[str]] = None) -> str:
        """Answers through NuropbSuccess, which makes nuropb publish an event (with
        `target`, which `publish_event` cannot carry) after the response."""
        raise NuropbSuccess(
            result=f"emitted {topic}",
            events=[{"topic": topic, "payload": payload, "target": target}],
        )

    def publish(self, topic: str, event: Any) -> str:
        """Publishes an event with RMQAPI.publish_event (target is always null)."""
        if self._api is None:
            raise RuntimeError("service not connected")
        self._api.publish_event(topic=topic, event=event, context={})
        return f"published {topic}"

    def _handle_event_(
        self, topic: str, event: Any, target: Optional[List[Any]], context: Dict[str, Any]
    ) -> None:
        if len(self._events) < _RECORD_LIMIT:
            self._events.append(
                {"topic": topic, "event": event, "target": target, "context": context}
            )

    def events_seen(self) -> List[Dict[str, Any]]:
        """Events delivered to this service through its event bindings."""
        return list(self._events)

    def python_values(self) -> Dict[str, Any]:
        """Values only Python's json writes: NaN/Infinity tokens and astral characters
        (escaped as surrogate pairs)."""
        return {
            "nan": float("nan"),
            "inf": float("inf"),
            "ninf": float("-inf"),
            "astral": "\U0001f600 \u00e9",
            "float": 1.0,
        }

    def deep(self, levels: int) -> Any:
        """A result nested `levels` deep."""
        value: Any = "bottom"
        for _ in range(int(levels)):
            value = {"d": value}
        return value

    @nuropb_context
    @publish_to_mesh(requires_encryption=True)
    def secret_emit(self, ctx: NuropbContextManager, topic: str, payload: Any) -> str:
        """Requires encryption and answers through NuropbSuccess with an event targeted at
        the caller. nuropb 0.1.8 publishes that event with header encrypted=yes but a
        plaintext body (spec §16 N9)."""
        trace_id = ctx.context.get("trace_id")
        seen = self._seen.get(trace_id) if isinstance(trace_id, str) else None
        if not seen or not seen.get("encrypted"):
            raise NuropbValidationError(description="secret_emit must be called encrypted")
        raise NuropbSuccess(
            result=f"emitted {topic}",
            events=[{"topic": topic, "payload": payload, "target": [ctx.context.get("user_id")]}],
        )

    def pid(self) -> int:
        """The process id, so a test can tell a restarted service apart."""
        return os.getpid()


class RecordingRMQAPI(RMQAPI):
    """RMQAPI that records, per trace id, what the transport reported about each incoming
    request or command (notably whether it arrived encrypted) before nuropb handles it.
    Observation only: the message is passed on unchanged."""

    def receive_transport_message(
        self, service_message: Any, message_complete_callback: Any, metadata: Dict[str, Any]
    ) -> None:
        instance = self._service_instance
        if service_message["nuropb_type"] in ("request", "command") and isinstance(
            instance, InteropService
        ):
            payload = service_message["nuropb_payload"]
            trace_id = service_message.get("trace_id")
            if isinstance(trace_id, str):
                _bounded_put(
                    instance._seen,
                    trace_id,
                    {
                        "type": service_message["nuropb_type"],
                        "encrypted": bool(metadata.get("encrypted")),
                        "method": payload.get("method"),
                        "context": payload.get("context"),
                        "body_trace_id": payload.get("trace_id"),
                    },
                )
        super().receive_transport_message(service_message, message_complete_callback, metadata)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", default=os.environ.get("NUROPB_AMQP_URL"))
    parser.add_argument("--service-name", default="interop-svc")
    parser.add_argument("--jwt-secret", default=os.environ.get("NUROPB_JWT_SECRET"))
    parser.add_argument(
        "--event-bindings",
        default="interop.to-service.#",
        help="comma-separated topic patterns bound to the service queue",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=16,
        help="AMQP prefetch; above 1 so slow async methods do not block fast ones",
    )
    parser.add_argument(
        "--configure",
        action="store_true",
        help="declare the nuropb exchanges first with nuropb's configure_nuropb_rmq",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not args.amqp_url:
        parser.error("--amqp-url (or NUROPB_AMQP_URL) is required")
    return args


async def serve(args: argparse.Namespace) -> None:
    service = InteropService(args.service_name)
    bindings = [b for b in args.event_bindings.split(",") if b]
    api = RecordingRMQAPI(
        amqp_url=args.amqp_url,
        service_name=args.service_name,
        service_instance=service,
        transport_settings={"event_bindings": bindings, "prefetch_count": args.prefetch},
    )
    service._api = api
    await api.connect()
    if not api.connected:
        raise SystemExit("interop-service: could not connect to the mesh (see log above)")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(READY_LINE, flush=True)
    await stop.wait()
    logger.info("stopping")
    await api.disconnect()


def main(argv: Optional[List[str]] = None) -> None:
    global _JWT_SECRET
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _JWT_SECRET = args.jwt_secret
    if args.configure:
        configure_nuropb_rmq(
            rmq_url=args.amqp_url,
            events_exchange="nuropb-events-exchange",
            rpc_exchange="nuropb-rpc-exchange",
            dl_exchange="nuropb-dl-exchange",
            dl_queue="nuropb-dl-queue",
        )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
