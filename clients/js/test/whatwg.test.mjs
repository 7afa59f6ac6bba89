// The client on a WHATWG (browser-semantics) WebSocket: Node's built-in one (undici), which
// `npm test` enables with --experimental-websocket. It is what `globalThis.WebSocket` is in
// browsers and Node 22, so the default constructor, the subprotocol negotiation, close
// codes and reasons are checked as a browser sees them.

import { test } from "node:test";
import assert from "node:assert/strict";

import { connect, ConnectError, NuropbError } from "../dist/nuropb-gateway.js";
import { startFakeGateway } from "./fake-gateway.mjs";

const GOOD = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.good-sig";
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(cond, what, ms = 3000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (cond()) return;
    await sleep(5);
  }
  assert.fail(`timed out after ${ms} ms waiting for ${what}`);
}

test("with the built-in WHATWG WebSocket: both routes, calls, events, 4401 reason, reconnect", async () => {
  assert.equal(typeof globalThis.WebSocket, "function", "run with node --experimental-websocket (see package.json)");
  const gw = await startFakeGateway({
    tokens: new Map([[GOOD, { user: "alice", expiresAt: Math.floor(Date.now() / 1000) + 3600 }]]),
    services: { "demo.add": ({ a, b }) => a + b },
    authTimeoutMs: 300,
  });
  try {
    for (const auth of ["subprotocol", "first-frame"]) {
      // No `WebSocket` option: the global one is the default.
      const client = await connect({ url: gw.url, getToken: async () => GOOD, auth, minReconnectDelay: 10, maxReconnectDelay: 50 });
      try {
        assert.equal(gw.last.protocol, "nuropb.v1");
        assert.equal(gw.state.upgrades.at(-1).url, "/ws");
        assert.equal(await client.request("demo", "add", { a: 40, b: 2 }), 42);
        const err = await client.request("demo", "nope", {}).catch((e) => e);
        assert.ok(err instanceof NuropbError && err.error === "NuropbNotDeliveredError", String(err));
        const got = [];
        await client.subscribe("demo.#", (event, topic) => got.push(topic));
        gw.publish("demo.a.b", {});
        await until(() => got.length === 1, "an event");
        const before = gw.state.connections.length;
        gw.last.ws.close(1012, "restart");
        await until(
          () => gw.state.connections.length === before + 1 && gw.last.topics.has("demo.#") && client.state === "connected",
          "resubscribed after the reconnect",
        );
        gw.publish("demo.c", {});
        await until(() => got.length === 2, "an event after the reconnect");
      } finally {
        client.close();
      }
    }
    await assert.rejects(
      connect({ url: gw.url, getToken: async () => "eyJ.bad.token", auth: "first-frame" }),
      (e) => e instanceof ConnectError && e.code === 4401 && e.reason === "unauthorized",
    );
  } finally {
    await gw.close();
  }
});
