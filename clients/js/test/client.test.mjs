// Unit tests of the client against the fake gateway (test/fake-gateway.mjs), over loopback.
// Every wait is bounded by `until` (or the client's own timeouts).

import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";

import {
  connect,
  backoffDelay,
  isReconnectable,
  topicMatches,
  defaultRefreshMargin,
  NuropbError,
  RequestTimeoutError,
  RequestAbortedError,
  DisconnectedError,
  ClosedError,
  ConnectError,
  TooManyPendingError,
} from "../dist/nuropb-gateway.js";
import { startFakeGateway, NEVER, matches } from "./fake-gateway.mjs";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` every 5 ms for at most `ms`; fails the test with `what` when it never holds. */
async function until(cond, what, ms = 3000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (cond()) return;
    await sleep(5);
  }
  assert.fail(`timed out after ${ms} ms waiting for ${what}`);
}

const nowSecs = () => Math.floor(Date.now() / 1000);
const GOOD = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.good-sig";
const GOOD2 = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.fresh-sig";
const BAD = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.bad-sig";

function tokens(extra = []) {
  return new Map([
    [GOOD, { user: "alice", expiresAt: nowSecs() + 3600 }],
    [GOOD2, { user: "alice", expiresAt: nowSecs() + 7200 }],
    ...extra,
  ]);
}

const services = {
  "demo.add": ({ a, b }) => a + b,
  "demo.fail": () => {
    throw { error: "NuropbHandlingError", description: "Unknown method nope" };
  },
  "demo.never": () => NEVER,
};

/** Fast reconnects for tests; every client gets the `ws` constructor. */
function opts(gw, extra = {}) {
  return {
    url: gw.url,
    getToken: async () => GOOD,
    WebSocket,
    minReconnectDelay: 10,
    maxReconnectDelay: 80,
    ...extra,
  };
}

describe("connect and auth routes", () => {
  let gw;
  before(async () => {
    gw = await startFakeGateway({ tokens: tokens(), services, authTimeoutMs: 300 });
  });
  after(() => gw.close());

  test("subprotocol route: resolves after the hello, token only in Sec-WebSocket-Protocol", async () => {
    const client = await connect(opts(gw));
    try {
      assert.equal(client.state, "connected");
      assert.equal(client.session.user_id, "alice");
      assert.equal(typeof client.expiresAt, "number");
      const up = gw.state.upgrades.at(-1);
      assert.deepEqual(up.protocols, ["nuropb.v1", `nuropb.token.${GOOD}`]);
      assert.equal(up.url, "/ws");
      assert.ok(!up.url.includes(GOOD), "token in the URL");
      assert.equal(up.headers.authorization, undefined);
      assert.equal(up.headers.cookie, undefined);
      assert.equal(gw.last.protocol, "nuropb.v1");
      assert.equal(gw.last.route, "subprotocol");
      assert.deepEqual(gw.last.frames, [], "nothing sent before or with the hello");
    } finally {
      client.close();
    }
  });

  test("first-frame route: auth frame first, no token in the URL or the subprotocols", async () => {
    const client = await connect(opts(gw, { auth: "first-frame" }));
    try {
      assert.equal(client.state, "connected");
      const up = gw.state.upgrades.at(-1);
      assert.deepEqual(up.protocols, ["nuropb.v1"]);
      assert.ok(!up.url.includes(GOOD));
      assert.equal(gw.last.route, "first-frame");
      assert.deepEqual(gw.last.frames[0], { type: "auth", payload: { token: GOOD } });
      assert.equal(await client.request("demo", "add", { a: 1, b: 2 }), 3);
    } finally {
      client.close();
    }
  });

  test("first-frame route with a bad token: ConnectError 4401 with the reason, no retry", async () => {
    const before = gw.state.upgrades.length;
    const closed = [];
    await assert.rejects(
      connect(opts(gw, { auth: "first-frame", getToken: async () => BAD, retryFirstConnect: true })).then(
        (c) => c,
        (e) => {
          closed.push(e);
          throw e;
        },
      ),
      (e) => e instanceof ConnectError && e.code === 4401 && e.reason === "unauthorized",
    );
    await sleep(150); // several reconnect delays (10–80 ms): none may happen
    assert.equal(gw.state.upgrades.length, before + 1, "reconnected after 4401");
  });

  test("subprotocol route with a bad token: refused at the upgrade, connect rejects", async () => {
    await assert.rejects(connect(opts(gw, { getToken: async () => BAD })), (e) => e instanceof ConnectError);
    assert.equal(gw.state.upgrades.at(-1).refused, 401);
  });

  test("no hello within connectTimeout: ConnectError 4000, the socket closed", async () => {
    gw.state.sendHello = false;
    try {
      const t0 = Date.now();
      await assert.rejects(
        connect(opts(gw, { connectTimeout: 100 })),
        (e) => e instanceof ConnectError && e.code === 4000 && /no hello/.test(e.reason),
      );
      assert.ok(Date.now() - t0 >= 95);
      await until(() => gw.last.closed !== null, "the socket closed");
    } finally {
      gw.state.sendHello = true;
    }
  });

  test("getToken failing on the first attempt rejects connect with it as the cause", async () => {
    const boom = new Error("no session cookie");
    await assert.rejects(
      connect(opts(gw, { getToken: async () => Promise.reject(boom) })),
      (e) => e instanceof ConnectError && e.cause === boom,
    );
  });

  test("a token that cannot be a subprotocol value is refused before any upgrade", async () => {
    const before = gw.state.upgrades.length;
    await assert.rejects(connect(opts(gw, { getToken: async () => "Bearer abc def" })), ConnectError);
    assert.equal(gw.state.upgrades.length, before);
  });
});

describe("calls", () => {
  let gw;
  let client;
  before(async () => {
    gw = await startFakeGateway({ tokens: tokens(), services });
    client = await connect(opts(gw, { maxPendingRequests: 3 }));
  });
  after(async () => {
    client.close();
    await gw.close();
  });

  test("request resolves with the result; frames carry counter ids and unique trace ids", async () => {
    const [x, y] = await Promise.all([
      client.request("demo", "add", { a: 2, b: 3 }),
      client.request("demo", "add", { a: 10, b: -1 }),
    ]);
    assert.deepEqual([x, y], [5, 9]);
    const reqs = gw.last.frames.filter((f) => f.type === "request");
    const ids = reqs.map((f) => Number(f.id));
    assert.ok(ids.every((n, i) => i === 0 || n > ids[i - 1]), `ids ${ids} not increasing`);
    assert.ok(reqs.every((f) => typeof f.id === "string"));
    assert.equal(new Set(reqs.map((f) => f.payload.trace_id)).size, reqs.length);
    assert.deepEqual(reqs[0].payload.params, { a: 2, b: 3 });
  });

  test("request rejects with the NuroPb error object and the trace id", async () => {
    const err = await client.request("demo", "fail", {}, { traceId: "t-42" }).catch((e) => e);
    assert.ok(err instanceof NuropbError, String(err));
    assert.equal(err.error, "NuropbHandlingError");
    assert.equal(err.description, "Unknown method nope");
    assert.deepEqual(err.nuropbError, { error: "NuropbHandlingError", description: "Unknown method nope" });
    assert.equal(err.traceId, "t-42");
  });

  test("a top-level error frame is matched to its call by id", async () => {
    const err = await client.request("badframe", "x", {}).catch((e) => e);
    assert.ok(err instanceof NuropbError);
    assert.equal(err.error, "NuropbValidationError");
  });

  test("timeout rejects with RequestTimeoutError and the call is forgotten", async () => {
    const t0 = Date.now();
    const err = await client.request("demo", "never", {}, { timeout: 60, traceId: "slow" }).catch((e) => e);
    assert.ok(err instanceof RequestTimeoutError, String(err));
    assert.ok(!(err instanceof RequestAbortedError));
    assert.equal(err.traceId, "slow");
    assert.ok(Date.now() - t0 >= 55, "rejected too early");
  });

  test("AbortSignal rejects with RequestAbortedError (AbortError); an aborted signal sends nothing", async () => {
    const ac = new AbortController();
    const p = client.request("demo", "never", {}, { signal: ac.signal });
    await sleep(10);
    ac.abort(new Error("user left"));
    const err = await p.catch((e) => e);
    assert.ok(err instanceof RequestAbortedError);
    assert.ok(!(err instanceof RequestTimeoutError));
    assert.equal(err.name, "AbortError");
    assert.equal(err.reason.message, "user left");

    const sent = gw.last.frames.length;
    const err2 = await client.request("demo", "add", { a: 1, b: 1 }, { signal: AbortSignal.abort() }).catch((e) => e);
    assert.ok(err2 instanceof RequestAbortedError);
    await sleep(20);
    assert.equal(gw.last.frames.length, sent, "an already-aborted request was sent");
  });

  test("command resolves on accepted with its trace id", async () => {
    const traceId = await client.command("demo", "add", { a: 1, b: 1 }, { traceId: "c-1" });
    assert.equal(traceId, "c-1");
    assert.equal(gw.last.frames.at(-1).type, "command");
  });

  test("ping resolves on pong", async () => {
    await client.ping();
    assert.equal(gw.last.frames.at(-1).type, "ping");
  });

  test("pending requests are bounded", async () => {
    const ps = [1, 2, 3].map(() => client.request("demo", "never", {}, { timeout: 300 }).catch((e) => e));
    const err = await client.request("demo", "add", { a: 1, b: 1 }).catch((e) => e);
    assert.ok(err instanceof TooManyPendingError, String(err));
    assert.equal(err.limit, 3);
    for (const e of await Promise.all(ps)) assert.ok(e instanceof RequestTimeoutError);
    // Freed again once they settled.
    assert.equal(await client.request("demo", "add", { a: 1, b: 1 }), 2);
  });

  test("bad arguments are refused locally", async () => {
    await assert.rejects(client.request("", "add", {}), TypeError);
    await assert.rejects(client.request("demo", "add", [1, 2]), TypeError);
  });
});

describe("subscriptions and reconnect", () => {
  test("events reach matching handlers; refusal rejects; resubscribed after a reconnect", async () => {
    const gw = await startFakeGateway({ tokens: tokens(), services });
    let tokenCalls = 0;
    const client = await connect(opts(gw, { getToken: async () => (tokenCalls++, GOOD) }));
    try {
      const got = [];
      const all = [];
      client.on("event", (e) => all.push(e.topic));
      await client.subscribe("demo.*", (event, topic) => got.push([topic, event]));
      const sub = gw.last.frames.find((f) => f.type === "subscribe");
      assert.deepEqual(sub.payload, { topics: ["demo.*"] });
      assert.equal(typeof sub.id, "string");

      const refused = await client.subscribe("secret.#", () => {}).catch((e) => e);
      assert.ok(refused instanceof NuropbError, String(refused));
      assert.equal(refused.error, "NuropbAuthorizationError");

      assert.equal(gw.publish("demo.tick", { n: 1 }), 1);
      await until(() => got.length === 1, "the first event");
      assert.deepEqual(got[0], ["demo.tick", { n: 1 }]);

      const states = [];
      for (const s of ["disconnected", "connecting", "connected"]) client.on(s, () => states.push(s));
      const first = gw.last;
      first.ws.close(1012, "restart");
      await until(() => gw.state.connections.length === 2 && gw.last.topics.has("demo.*"), "resubscription");
      await until(() => client.state === "connected", "connected again");
      assert.deepEqual(states, ["disconnected", "connecting", "connected"]);
      assert.equal(tokenCalls, 2, "getToken not asked again for the reconnect");
      assert.ok(!gw.last.topics.has("secret.#"), "a refused pattern was resubscribed");

      gw.publish("demo.tick", { n: 2 });
      gw.publish("other.tick", { n: 3 });
      await until(() => got.length === 2, "the event after the reconnect");
      assert.deepEqual(got[1], ["demo.tick", { n: 2 }]);

      await client.unsubscribe("demo.*");
      assert.ok(!gw.last.topics.has("demo.*"));
      assert.equal(gw.publish("demo.tick", { n: 4 }), 0);
      assert.deepEqual(all, ["demo.tick", "demo.tick"]);
    } finally {
      client.close();
      await gw.close();
    }
  });

  test("resubscription: one frame for all patterns; when refused, one per pattern and only the refused dropped", async () => {
    let refuse = "";
    const gw = await startFakeGateway({ tokens: tokens(), services, subscribable: (p) => p.startsWith("demo.") && p !== refuse });
    const client = await connect(opts(gw));
    const errors = [];
    client.on("error", (e) => errors.push(e.error));
    try {
      await Promise.all([client.subscribe("demo.a", () => {}), client.subscribe("demo.b", () => {})]);
      gw.last.ws.close(1001, "drain");
      await until(() => gw.state.connections.length === 2 && gw.last.topics.size === 2, "resubscribed");
      assert.deepEqual(
        gw.last.frames.map((f) => f.payload.topics),
        [["demo.a", "demo.b"]],
      );

      refuse = "demo.b";
      gw.last.ws.close(1001, "drain");
      await until(() => gw.state.connections.length === 3 && errors.length === 1, "the refusal reported");
      await until(() => gw.last.topics.has("demo.a"), "demo.a renewed");
      assert.deepEqual(
        gw.last.frames.map((f) => f.payload.topics),
        [["demo.a", "demo.b"], ["demo.a"], ["demo.b"]],
      );
      assert.ok(errors[0] instanceof NuropbError && errors[0].error === "NuropbAuthorizationError");
      assert.deepEqual([...gw.last.topics], ["demo.a"]);
      // demo.b is gone from the client too: the next connection does not ask for it.
      refuse = "";
      gw.last.ws.close(1001, "drain");
      await until(() => gw.state.connections.length === 4 && gw.last.topics.size === 1, "renewed again");
      assert.deepEqual(gw.last.frames.map((f) => f.payload.topics), [["demo.a"]]);
    } finally {
      client.close();
      await gw.close();
    }
  });

  test("in-flight requests are rejected with DisconnectedError on a disconnect and never resent", async () => {
    const gw = await startFakeGateway({ tokens: tokens(), services });
    const client = await connect(opts(gw));
    try {
      const p = client.request("demo", "never", {}, { traceId: "lost-1" });
      const c = client.command("demo", "never", {});
      await until(() => gw.last.frames.length === 2, "both calls sent");
      gw.last.ws.terminate(); // abnormal: the client sees 1006
      const [e1, e2] = await Promise.all([p.catch((e) => e), c.catch((e) => e)]);
      assert.ok(e1 instanceof DisconnectedError, String(e1));
      assert.equal(e1.code, 1006);
      assert.equal(e1.traceId, "lost-1");
      assert.ok(e2 instanceof DisconnectedError);

      // While disconnected, a new call fails at once rather than waiting; a subscription
      // waits for the next connection.
      const e3 = await client.request("demo", "add", { a: 1, b: 2 }).catch((e) => e);
      assert.ok(e3 instanceof DisconnectedError);
      assert.equal(e3.code, 0);
      const late = client.subscribe("demo.late", () => {});

      await until(() => client.state === "connected", "the reconnect");
      await late;
      assert.equal(gw.state.connections.length, 2);
      await sleep(30);
      assert.deepEqual(
        gw.last.frames.map((f) => f.type),
        ["subscribe"],
        "a call was resent on the new connection",
      );
      assert.ok(gw.last.topics.has("demo.late"));
      assert.equal(await client.request("demo", "add", { a: 1, b: 2 }), 3);
    } finally {
      client.close();
      await gw.close();
    }
  });

  test("backoff: delays grow by the factor, are jittered, capped; the attempts are that far apart", async () => {
    const gw = await startFakeGateway({ tokens: tokens(), services });
    // random() alternates 0.5 (no jitter: the base), 0 (−jitter) and 0.999 (+jitter).
    const seq = [0.5, 0.5, 0.5, 0, 0.999, 0.5];
    let i = 0;
    const client = await connect(
      opts(gw, { minReconnectDelay: 20, maxReconnectDelay: 200, reconnectFactor: 2, reconnectJitter: 0.5, random: () => seq[i++ % seq.length] }),
    );
    const delays = [];
    client.on("disconnected", (e) => delays.push(e.delay));
    try {
      gw.state.refuseStatus = 503;
      gw.last.ws.close(1013, "slow");
      await until(() => delays.length === 6, "six failed attempts", 5000);
      const ups = gw.state.upgrades.slice(-5);
      // Bases 20, 40, 80, 160, 200 (capped), 200: drawn as base, base, base, base·0.5, cap, base.
      assert.deepEqual(delays, [20, 40, 80, 80, 200, 200]);
      for (let k = 1; k < ups.length; k++) {
        const gap = ups[k].at - ups[k - 1].at;
        assert.ok(gap >= delays[k] - 5, `attempt ${k} came ${gap} ms after the previous one, delay ${delays[k]}`);
      }
      gw.state.refuseStatus = 0;
      await until(() => client.state === "connected", "recovery", 2000);
      // The backoff restarts from the minimum after a successful connection.
      delays.length = 0;
      gw.last.ws.close(1001, "going away");
      await until(() => delays.length === 1, "the next disconnect");
      assert.ok(delays[0] <= 30, `backoff not reset: ${delays[0]}`);
    } finally {
      client.close();
      await gw.close();
    }
  });

  test("no reconnect after terminal codes (4401, 1008, 4001); reconnect after 1001, 1006, 1011, 1013", async () => {
    const gw = await startFakeGateway({ tokens: tokens(), services });
    try {
      for (const [code, reconnects] of [
        [4401, false],
        [1008, false],
        [4001, false],
        [1009, false],
        [1001, true],
        [1011, true],
        [1013, true],
        [4000, true],
      ]) {
        const client = await connect(opts(gw));
        const closed = [];
        client.on("closed", (e) => closed.push(e));
        const n = gw.state.upgrades.length;
        gw.last.ws.close(code, `reason ${code}`);
        if (reconnects) {
          await until(() => client.state === "connected" && gw.state.upgrades.length === n + 1, `reconnect after ${code}`);
          assert.deepEqual(closed, []);
        } else {
          await until(() => client.state === "closed", `closed after ${code}`);
          assert.deepEqual(closed, [{ code, reason: `reason ${code}` }]);
          await sleep(100);
          assert.equal(gw.state.upgrades.length, n, `reconnected after ${code}`);
          const e = await client.request("demo", "add", { a: 1, b: 1 }).catch((x) => x);
          assert.ok(e instanceof ClosedError && e.code === code);
        }
        client.close();
      }
    } finally {
      await gw.close();
    }
  });

  test("keep-alive: pings on the interval; an unanswered one drops the connection and reconnects", async () => {
    const gw = await startFakeGateway({ tokens: tokens(), services });
    const client = await connect(opts(gw, { pingInterval: 40, pongTimeout: 60 }));
    const lost = [];
    client.on("disconnected", (e) => lost.push(e));
    try {
      await until(() => gw.last.frames.filter((f) => f.type === "ping").length >= 3, "three pings");
      assert.equal(client.state, "connected");
      assert.deepEqual(lost, []);
      gw.state.answerPings = false;
      await until(() => lost.length === 1, "the dead connection noticed");
      assert.equal(lost[0].code, 4000);
      assert.match(lost[0].reason, /no pong/);
      gw.state.answerPings = true;
      await until(() => client.state === "connected" && gw.state.connections.length === 2, "the reconnect");
      await until(() => gw.state.connections[0].closed !== null, "the dead socket closed");
    } finally {
      client.close();
      await gw.close();
    }
  });

  test("4003 (token expired): reconnects at once with a fresh getToken()", async () => {
    const gw = await startFakeGateway({ tokens: tokens(), services });
    const handed = [GOOD, GOOD2];
    let calls = 0;
    const client = await connect(opts(gw, { minReconnectDelay: 5000, getToken: async () => handed[Math.min(calls++, 1)] }));
    const delays = [];
    client.on("disconnected", (e) => delays.push(e.delay));
    try {
      gw.last.ws.close(4003, "token expired");
      await until(() => gw.state.connections.length === 2 && client.state === "connected", "the reconnect");
      assert.deepEqual(delays, [0]);
      assert.equal(gw.last.token, GOOD2);
    } finally {
      client.close();
      await gw.close();
    }
  });
});

describe("refresh and close", () => {
  test("the token is refreshed through getToken() before expires_at", async () => {
    // Expires in 1–2 s: the default margin is 10 % of the lifetime, 0.1–0.2 s.
    const soon = nowSecs() + 2;
    const gw = await startFakeGateway({
      tokens: new Map([
        [GOOD, { user: "alice", expiresAt: soon }],
        [GOOD2, { user: "alice", expiresAt: soon + 3600 }],
      ]),
      services,
    });
    let calls = 0;
    const client = await connect(opts(gw, { getToken: async () => (calls++ === 0 ? GOOD : GOOD2) }));
    const refreshed = [];
    client.on("refreshed", (e) => refreshed.push(e.expiresAt));
    try {
      assert.equal(client.expiresAt, soon);
      await until(() => refreshed.length === 1, "the refresh", 3000);
      const frame = gw.last.frames.find((f) => f.type === "refresh");
      assert.deepEqual(frame.payload, { token: GOOD2 });
      assert.equal(typeof frame.id, "string");
      assert.ok(Date.now() < soon * 1000, "refreshed after expires_at");
      assert.deepEqual(refreshed, [soon + 3600]);
      assert.equal(client.expiresAt, soon + 3600);
      assert.equal(gw.last.token, GOOD2);
      assert.equal(gw.state.connections.length, 1);
      assert.equal(await client.refresh(), soon + 3600); // by hand, too
    } finally {
      client.close();
      await gw.close();
    }
  });

  test("a refused refresh is reported as an error event and rejects refresh()", async () => {
    const soon = nowSecs() + 2;
    const gw = await startFakeGateway({
      tokens: new Map([
        [GOOD, { user: "alice", expiresAt: soon }],
        ["other", { user: "bob", expiresAt: soon + 60 }],
      ]),
      services,
    });
    let calls = 0;
    const client = await connect(opts(gw, { getToken: async () => (calls++ === 0 ? GOOD : "other") }));
    const errors = [];
    client.on("error", (e) => errors.push(e.error));
    try {
      await until(() => errors.length === 1, "the automatic refresh refused", 3000);
      assert.ok(errors[0].cause instanceof NuropbError, String(errors[0].cause));
      assert.equal(errors[0].cause.error, "NuropbAuthorizationError");
      assert.equal(client.expiresAt, soon, "a refused refresh changed the expiry");
      const err = await client.refresh().catch((e) => e);
      assert.ok(err instanceof NuropbError && err.description === "unauthorized", String(err));
      assert.equal(client.state, "connected");
    } finally {
      client.close();
      await gw.close();
    }
  });

  test("close(): closed event, waiting calls rejected with ClosedError, every timer cleared", async () => {
    const gw = await startFakeGateway({ tokens: tokens(), services });
    const live = new Set();
    const timers = {
      setTimeout(fn, ms) {
        const h = setTimeout(() => {
          live.delete(h);
          fn();
        }, ms);
        live.add(h);
        return h;
      },
      clearTimeout(h) {
        live.delete(h);
        clearTimeout(h);
      },
      now: () => Date.now(),
    };
    const client = await connect(opts(gw, { timers }));
    const closed = [];
    client.on("closed", (e) => closed.push(e));
    try {
      const waiting = client.request("demo", "never", {});
      await until(() => gw.last.frames.length === 1, "the request sent");
      assert.ok(live.size >= 2, `expected the refresh and request timers, found ${live.size}`);
      client.close();
      const err = await waiting.catch((e) => e);
      assert.ok(err instanceof ClosedError, String(err));
      assert.equal(client.state, "closed");
      assert.deepEqual(closed, [{ code: 1000, reason: "client closed" }]);
      assert.equal(live.size, 0, "timers left after close()");
      await until(() => gw.last.closed !== null, "the server seeing the close");
      assert.equal(gw.last.closed.code, 1000);
      await assert.rejects(client.subscribe("demo.*", () => {}), ClosedError);
    } finally {
      client.close();
      await gw.close();
    }
  });

  test("close() during the reconnect delay stops reconnecting", async () => {
    const gw = await startFakeGateway({ tokens: tokens(), services });
    const client = await connect(opts(gw, { minReconnectDelay: 100, maxReconnectDelay: 100 }));
    try {
      gw.last.ws.close(1001, "drain");
      await until(() => client.state === "disconnected", "disconnected");
      client.close();
      await sleep(200);
      assert.equal(gw.state.connections.length, 1);
      assert.equal(client.state, "closed");
    } finally {
      await gw.close();
    }
  });
});

describe("pure rules", () => {
  test("every close code of docs/PROTOCOL.md and the issue-10 contract is mapped", () => {
    const table = [
      [1000, true],
      [1001, true],
      [1002, false],
      [1003, false],
      [1006, true],
      [1007, false],
      [1008, false],
      [1009, false],
      [1011, true],
      [1012, true],
      [1013, true],
      [4000, true],
      [4001, false],
      [4003, true],
      [4399, true],
      [4401, false],
      [4499, false],
    ];
    for (const [code, expected] of table) assert.equal(isReconnectable(code), expected, `close code ${code}`);
  });

  test("backoffDelay: bounds and growth for random draws", () => {
    const o = { minReconnectDelay: 500, maxReconnectDelay: 20_000, reconnectFactor: 2, reconnectJitter: 0.5 };
    assert.equal(backoffDelay(0, {}, () => 0.5), 500); // the defaults
    assert.equal(backoffDelay(30, {}, () => 0.5), 20_000);
    for (let attempt = 0; attempt < 12; attempt++) {
      const base = Math.min(20_000, 500 * 2 ** attempt);
      const seen = new Set();
      for (let k = 0; k < 50; k++) {
        const d = backoffDelay(attempt, o);
        assert.ok(d >= Math.max(500, base * 0.5) - 1 && d <= Math.min(20_000, base * 1.5) + 1, `${attempt}: ${d}`);
        seen.add(d);
      }
      assert.ok(seen.size > 5, `attempt ${attempt}: no jitter (${[...seen]})`);
    }
    assert.equal(backoffDelay(3, { ...o, reconnectJitter: 0 }, Math.random), 4000);
  });

  test("topicMatches agrees with AMQP topic rules (and the fake gateway's matcher)", () => {
    const cases = [
      ["demo.*", "demo.tick", true],
      ["demo.*", "demo.tick.x", false],
      ["demo.#", "demo", true],
      ["demo.#", "demo.a.b.c", true],
      ["#", "anything.at.all", true],
      ["*.b.#", "a.b", true],
      ["*.b.#", "b", false],
      ["a.#.z", "a.z", true],
      ["a.#.z", "a.b.c.z", true],
      ["a.#.z", "a.b.c", false],
      ["users.alice.notify", "users.alice.notify", true],
      ["users.alice.notify", "users.bob.notify", false],
    ];
    for (const [p, t, expected] of cases) {
      assert.equal(topicMatches(p, t), expected, `${p} ~ ${t}`);
      assert.equal(matches(p, t), expected, `fake: ${p} ~ ${t}`);
    }
  });

  test("defaultRefreshMargin is min(30 s, 10 % of the lifetime)", () => {
    assert.equal(defaultRefreshMargin(3600_000), 30_000);
    assert.equal(defaultRefreshMargin(60_000), 6_000);
    assert.equal(defaultRefreshMargin(-5), 0);
  });

  test("connect refuses a missing WebSocket constructor and an unknown auth route", async () => {
    const saved = globalThis.WebSocket;
    try {
      delete globalThis.WebSocket;
      await assert.rejects(connect({ url: "ws://127.0.0.1:1/ws", getToken: async () => GOOD }), TypeError);
    } finally {
      if (saved) globalThis.WebSocket = saved;
    }
    await assert.rejects(connect({ url: "ws://127.0.0.1:1/ws", getToken: async () => GOOD, WebSocket, auth: "query" }), TypeError);
  });
});
