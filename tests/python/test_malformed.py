"""Malformed client input: every bad frame gets an error frame, the connection stays open,
and nothing reaches the Python service that could kill it (nuropb 0.1.8 services die for
good on malformed messages, spec §7.5)."""

import json

import pytest

from conftest import SERVICE as SVC
from interop_helpers import is_error_frame, run, unique


def _req(payload, kind="request"):
    return json.dumps({"type": kind, "payload": payload})


def _deep(levels: int) -> str:
    return '{"a": ' * levels + "1" + "}" * levels


# (label, frame to send, trace id the error may be tagged with)
MALFORMED = [
    ("not json", "this is not json", None),
    ("empty text", "", None),
    ("json array", "[1, 2, 3]", None),
    ("json number", "42", None),
    ("json null", "null", None),
    ("json string", '"request"', None),
    ("empty object", "{}", None),
    ("missing payload", '{"type": "request"}', None),
    ("missing type", json.dumps({"payload": {"service": SVC, "method": "echo", "params": {}}}), None),
    ("type is a number", '{"type": 5, "payload": {}}', None),
    ("unknown type", '{"type": "frobnicate", "payload": {}}', None),
    ("payload is a list", '{"type": "request", "payload": [1]}', None),
    ("missing service", _req({"method": "echo", "params": {}, "trace_id": "m-nosvc"}), "m-nosvc"),
    ("missing method", _req({"service": SVC, "params": {}, "trace_id": "m-nomethod"}), "m-nomethod"),
    ("missing params", _req({"service": SVC, "method": "echo", "trace_id": "m-noparams"}), "m-noparams"),
    ("params is a list", _req({"service": SVC, "method": "echo", "params": [1, 2], "trace_id": "m-plist"}), "m-plist"),
    ("params is a string", _req({"service": SVC, "method": "echo", "params": "x", "trace_id": "m-pstr"}), "m-pstr"),
    ("params is null", _req({"service": SVC, "method": "echo", "params": None, "trace_id": "m-pnull"}), "m-pnull"),
    ("service is a number", _req({"service": 7, "method": "echo", "params": {}, "trace_id": "m-svcnum"}), "m-svcnum"),
    ("empty service", _req({"service": "", "method": "echo", "params": {}, "trace_id": "m-svcempty"}), "m-svcempty"),
    ("trace_id is a number", _req({"service": SVC, "method": "echo", "params": {}, "trace_id": 12345}), None),
    ("trace_id is an object", _req({"service": SVC, "method": "echo", "params": {}, "trace_id": {"a": 1}}), None),
    ("trace_id of 200 KB", _req({"service": SVC, "method": "echo", "params": {}, "trace_id": "x" * 200_000}), None),
    (
        "params nested 1000 levels",
        '{"type": "request", "payload": {"service": "%s", "method": "echo", "trace_id": "m-deep", "params": %s}}' % (SVC, _deep(1000)),
        "m-deep",
    ),
    ("service name of 300 chars", _req({"service": "s" * 300, "method": "echo", "params": {}, "trace_id": "m-longsvc"}), "m-longsvc"),
    ("method name of 300 chars", _req({"service": SVC, "method": "m" * 300, "params": {}, "trace_id": "m-longmeth"}), "m-longmeth"),
    ("NaN in params", '{"type": "request", "payload": {"service": "%s", "method": "echo", "params": {"x": NaN}, "trace_id": "m-nan"}}' % SVC, "m-nan"),
    ("command with params list", _req({"service": SVC, "method": "note", "params": [1], "trace_id": "m-cmdlist"}, kind="command"), "m-cmdlist"),
    ("subscribe topics not a list", '{"type": "subscribe", "payload": {"topics": "interop.#"}}', None),
    ("subscribe without payload", '{"type": "subscribe"}', None),
    ("binary garbage", b"\xc1\xff\x00garbage\x00\xc1", None),
    ("binary msgpack array", b"\x93\x01\x02\x03", None),
]


def _is_error_for(trace_id):
    def pred(frame):
        if is_error_frame(frame):
            return True
        payload = frame.get("payload") or {}
        return (
            frame.get("type") == "response"
            and payload.get("error") is not None
            and (trace_id is None or payload.get("trace_id") == trace_id)
        )

    return pred


@pytest.mark.parametrize("label,frame,trace_id", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_frame_gets_error_frame(mesh, label, frame, trace_id):
    async def scenario():
        client = await mesh.connect(unique("mallory"), label="mallory")
        pid_before = await client.call_ok(mesh.service, "pid", {})
        await client.send(frame)
        error = await client.expect(_is_error_for(trace_id), what=f"error frame for {label!r}")
        if is_error_frame(error):
            assert isinstance(error["description"], str) and error["description"], error
        # Nothing else came back (e.g. a success response), the connection is still usable,
        # and the service is the same live process.
        stray = [f for f in client.frames if f.get("type") == "response"]
        assert not stray, f"unexpected responses after {label!r}: {stray}"
        await client.ping()
        assert await client.call_ok(mesh.service, "echo", {"after": label}) == {"after": label}
        assert await client.call_ok(mesh.service, "pid", {}) == pid_before
        await client.close()

    run(scenario())


def test_barrage_on_one_connection(mesh):
    """All malformed frames back to back on one connection: one error frame each, then the
    connection and the service still work."""

    async def scenario():
        client = await mesh.connect(unique("mallory"), label="mallory")
        pid_before = await client.call_ok(mesh.service, "pid", {})
        for label, frame, trace_id in MALFORMED:
            await client.send(frame)
            await client.expect(_is_error_for(trace_id), what=f"error frame for {label!r}")
        await client.ping()
        assert await client.call_ok(mesh.service, "echo", {"survived": True}) == {"survived": True}
        assert await client.call_ok(mesh.service, "pid", {}) == pid_before
        await client.close()

    run(scenario(), timeout=45)
