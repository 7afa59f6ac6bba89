// The client against the real gateway binary in demo mode (the embedded in-memory mesh with
// the `demo` service and `demo.tick` events), over Node's built-in WHATWG WebSocket, which
// negotiates subprotocols and reports close codes as a browser does.
//
// Not part of `npm test` (it needs the binary); `cargo xtask js` runs it. By hand:
//   cargo build -p nuropb-gateway
//   NUROPB_GATEWAY_BIN=../../target/debug/nuropb-gateway \
//     node --experimental-websocket --no-warnings=ExperimentalWarning --test test/real-gateway.test.mjs
// (without NUROPB_GATEWAY_BIN it looks for ../../target/debug/nuropb-gateway and fails when
// it is not there). Tokens are minted here with the secret given to the binary as
// `--jwt-secret`, as the demo's own banner token is.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

import { connect, ConnectError } from "../dist/nuropb-gateway.js";

const SECRET = "real-gateway-test-secret-0123456789";
const BIN =
  process.env.NUROPB_GATEWAY_BIN ?? fileURLToPath(new URL("../../../target/debug/nuropb-gateway", import.meta.url));

const b64url = (data) => Buffer.from(data).toString("base64url");

/** An HS256 JWT, as the gateway's `--jwt-secret` checks it. */
function jwt(claims, secret = SECRET) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

const now = () => Math.floor(Date.now() / 1000);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Starts the binary on a free loopback port (its own process group) and waits for its
 * "listening on ws://…" line, at most 20 s. */
async function startGateway() {
  assert.ok(existsSync(BIN), `no gateway binary at ${BIN}: run \`cargo build -p nuropb-gateway\` or set NUROPB_GATEWAY_BIN`);
  const child = spawn(
    BIN,
    ["--listen", "127.0.0.1:0", "--jwt-secret", SECRET, "--demo-tick-secs", "1", "--auth-timeout-secs", "2"],
    { stdio: ["ignore", "pipe", "pipe"], detached: true },
  );
  let output = "";
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`gateway did not start within 20 s:\n${output}`)), 20_000);
    const onData = (chunk) => {
      output += chunk;
      const m = /listening on (ws:\/\/127\.0\.0\.1:\d+)\//.exec(output);
      if (m) {
        clearTimeout(timer);
        resolve(`${m[1]}/ws`);
      }
    };
    child.stdout.on("data", onData);
    child.stderr.on("data", onData);
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`gateway exited with ${code}:\n${output}`));
    });
  });
  return {
    url,
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((r) => child.once("exit", r));
      // The process group, by the child's own id.
      process.kill(-child.pid, "SIGTERM");
      let timer;
      const late = new Promise((r) => (timer = setTimeout(() => r(false), 15_000)));
      const done = await Promise.race([exited.then(() => true), late]);
      // A pending timer would keep the test process alive for the rest of the 15 s.
      clearTimeout(timer);
      if (!done) process.kill(-child.pid, "SIGKILL");
    },
  };
}

test("the client against the real gateway: both routes, calls, events, refresh, 4401", async (t) => {
  assert.equal(typeof globalThis.WebSocket, "function", "run with node --experimental-websocket");
  const gw = await startGateway();
  t.after(() => gw.stop());
  const exp = now() + 3600;
  const good = jwt({ sub: "web-user", username: "Web", exp });

  for (const auth of ["subprotocol", "first-frame"]) {
    const client = await connect({ url: gw.url, getToken: async () => good, auth, reconnect: false });
    try {
      assert.equal(client.session.user_id, "web-user", auth);
      assert.equal(client.session.username, "Web", auth);
      // The token's own `exp` (the gateway ends the session a 30 s leeway later).
      assert.equal(client.session.expires_at, exp, auth);
      assert.equal(client.expiresAt, exp, auth);
      assert.equal(await client.request("demo", "add", { a: 40, b: 2 }), 42, auth);
      assert.deepEqual(await client.request("demo", "echo", { text: "hi" }), { text: "hi" }, auth);
      const err = await client.request("demo", "fail", { message: "nope" }).catch((e) => e);
      assert.equal(err.error, "NuropbException", `${auth}: ${err}`);
      // A refused subscription is matched by its id, so it rejects this call.
      const refused = await client.subscribe("secret.#", () => {}).catch((e) => e);
      assert.equal(refused.error, "NuropbValidationError", `${auth}: ${refused}`);
      const ticks = [];
      await client.subscribe("demo.*", (event, topic) => ticks.push([topic, event]));
      const deadline = Date.now() + 5000;
      while (ticks.length < 2 && Date.now() < deadline) await sleep(20);
      assert.ok(ticks.length >= 2, `${auth}: ticks ${JSON.stringify(ticks)}`);
      assert.equal(ticks[0][0], "demo.tick");
      assert.equal(typeof ticks[0][1].n, "number");
      await client.command("demo", "echo", { note: 1 });
      const refreshed = await client.refresh();
      assert.equal(refreshed, exp, auth);
    } finally {
      client.close();
    }
  }

  // A bad token: the first-frame route says why (4401 with a reason); the subprotocol
  // route is refused at the upgrade, which a browser reports as 1006.
  const bad = jwt({ sub: "web-user", exp }, "another-secret-0123456789abcdef");
  const firstFrame = await connect({ url: gw.url, getToken: async () => bad, auth: "first-frame", reconnect: false }).catch(
    (e) => e,
  );
  assert.ok(firstFrame instanceof ConnectError, String(firstFrame));
  assert.deepEqual([firstFrame.code, firstFrame.reason], [4401, "unauthorized"], String(firstFrame));
  // Node 20's built-in WebSocket (undici) fires `error` but no `close` for a refused
  // upgrade (the same against the `ws` package's server), so the library gives up at its
  // connectTimeout (4000); a browser reports 1006.
  const started = Date.now();
  const subprotocol = await connect({
    url: gw.url,
    getToken: async () => bad,
    auth: "subprotocol",
    reconnect: false,
    connectTimeout: 1500,
  }).catch((e) => e);
  assert.ok(subprotocol instanceof ConnectError, String(subprotocol));
  assert.ok([1006, 4000].includes(subprotocol.code), String(subprotocol));
  assert.ok(Date.now() - started < 5000, "refused within the connect timeout");
});
