// The demo page the gateway serves in demo mode (gateway-bin/src/demo/), in headless
// Chromium: Debian's `chromium` package (/usr/bin/chromium), driven by playwright-core
// over its pipe, with exactly the flags below and a fresh profile per run. Every test
// starts the real binary (its own process group, a free loopback port) and asserts what
// the page shows through its stable element ids.
//
// `cargo xtask browser` installs Chromium and these packages and runs this file (and so
// does `cargo xtask ci`). By hand, from clients/browser-tests:
//   cargo build -p nuropb-gateway && npm ci
//   NUROPB_GATEWAY_BIN=../../target/debug/nuropb-gateway node --test test/demo-page.test.mjs
// The screenshot goes to $NUROPB_BROWSER_ARTIFACTS (default ../../target/browser).

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

const BIN =
  process.env.NUROPB_GATEWAY_BIN ?? fileURLToPath(new URL("../../../target/debug/nuropb-gateway", import.meta.url));
const ARTIFACTS =
  process.env.NUROPB_BROWSER_ARTIFACTS ?? fileURLToPath(new URL("../../../target/browser", import.meta.url));
const CHROMIUM = "/usr/bin/chromium";
// The flags, and nothing else but the profile and Playwright's pipe
// (`ignoreDefaultArgs: true` drops Playwright's own defaults).
const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];
/** Cap of every wait for the page to show something. */
const WAIT_MS = 10_000;
/** A reconnect after a restart waits out the library's backoff (500 ms doubling, jittered). */
const RECONNECT_MS = 20_000;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let browser;
let profile;
const gateways = new Set();

// At its deadline xtask interrupts `node --test`, which sends this file SIGTERM; no `after`
// hook runs then, and the gateways (process groups of their own) would outlive it.
// Playwright closes Chromium on these signals itself.
for (const [signal, code] of [["SIGINT", 130], ["SIGTERM", 143]]) {
  process.once(signal, () => {
    for (const gw of gateways) {
      try {
        process.kill(-gw.child.pid, "SIGKILL");
      } catch {
        // Already gone.
      }
    }
    // Exits now: a test going on would start another gateway. Playwright kills Chromium
    // on exit; the profile goes after it.
    process.once("exit", () => profile && rmSync(profile, { recursive: true, force: true }));
    process.exit(code);
  });
}

before(async () => {
  assert.ok(existsSync(CHROMIUM), `no ${CHROMIUM}: \`cargo xtask browser\` installs Debian's chromium`);
  profile = mkdtempSync(join(tmpdir(), "nuropb-chromium-"));
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    ignoreDefaultArgs: true,
    args: [...FLAGS, `--user-data-dir=${profile}`, "--remote-debugging-pipe"],
    timeout: 30_000,
  });
});

after(async () => {
  // Also when a test failed: every gateway still running is stopped by its PID.
  await Promise.all([...gateways].map((gw) => gw.stop()));
  await browser?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

/** Starts the binary in demo mode on `port` (0: a free one) in its own process group and
 * waits for its "listening on" line, at most 20 s. Rejects with the output if it exits. */
async function startGateway({ port = 0, args = [] } = {}) {
  assert.ok(existsSync(BIN), `no gateway binary at ${BIN}: run \`cargo build -p nuropb-gateway\` or set NUROPB_GATEWAY_BIN`);
  const child = spawn(BIN, ["--listen", `127.0.0.1:${port}`, "--demo-tick-secs", "1", ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    detached: true,
  });
  const exited = new Promise((r) => child.once("exit", r));
  const gw = {
    child,
    async stop() {
      gateways.delete(gw);
      if (child.exitCode !== null || child.signalCode !== null) return;
      process.kill(-child.pid, "SIGTERM");
      // A timer left running would hold the process open for its 15 s after the last test.
      let timer;
      const late = new Promise((r) => {
        timer = setTimeout(() => r(false), 15_000);
      });
      const done = await Promise.race([exited.then(() => true), late]);
      clearTimeout(timer);
      if (!done) {
        process.kill(-child.pid, "SIGKILL");
        await exited;
      }
    },
  };
  gateways.add(gw);
  let output = "";
  try {
    gw.port = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`gateway did not start within 20 s:\n${output}`)), 20_000);
      const onData = (chunk) => {
        output += chunk;
        const m = /listening on ws:\/\/127\.0\.0\.1:(\d+)\//.exec(output);
        if (m) {
          clearTimeout(timer);
          resolve(Number(m[1]));
        }
      };
      child.stdout.on("data", onData);
      child.stderr.on("data", onData);
      exited.then((code) => {
        clearTimeout(timer);
        reject(new Error(`gateway exited with ${code}:\n${output}`));
      });
    });
  } catch (e) {
    await gw.stop();
    throw e;
  }
  gw.origin = `http://127.0.0.1:${gw.port}`;
  return gw;
}

/** Starts the binary on `port` again, retrying for a few seconds while the old socket
 * still holds it. */
async function restartGateway(port) {
  let last;
  for (let attempt = 0; attempt < 20; attempt++) {
    try {
      return await startGateway({ port });
    } catch (e) {
      last = e;
      await sleep(250);
    }
  }
  throw last;
}

/** A fresh context and page; console errors and uncaught exceptions are collected. */
async function openPage(t) {
  const context = await browser.newContext();
  t.after(() => context.close());
  const page = await context.newPage();
  const errors = [];
  page.on("console", (msg) => {
    if (msg.type() === "error") errors.push(`console: ${msg.text()}`);
  });
  page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
  return { page, errors };
}

/** What the page shows, for failure messages. */
async function shown(page) {
  return page.evaluate(() => {
    const text = (id) => document.getElementById(id)?.textContent ?? null;
    return {
      state: document.getElementById("state")?.dataset.state ?? null,
      error: text("error"),
      addResult: text("add-result"),
      log: [...(document.querySelectorAll("#log li") ?? [])].slice(0, 6).map((li) => li.textContent),
    };
  });
}

/** Waits (at most `ms`) until `predicate(arg)` holds in the page; fails with `what` and
 * what the page shows. */
async function waitUntil(page, what, predicate, arg, ms = WAIT_MS) {
  try {
    await page.waitForFunction(predicate, arg, { timeout: ms, polling: 50 });
  } catch (e) {
    const state = await shown(page).catch((err) => `(page not readable: ${err.message})`);
    assert.fail(`${what}: not within ${ms} ms (${e.message.split("\n")[0]}); the page shows ${JSON.stringify(state)}`);
  }
}

const stateIs = (page, state, ms) =>
  waitUntil(page, `#state is ${state}`, (s) => document.getElementById("state").dataset.state === s, state, ms);

const textIs = (page, id, text) =>
  waitUntil(page, `#${id} shows ${text}`, ([i, t]) => document.getElementById(i).textContent === t, [id, text]);

const text = (page, id) => page.locator(`#${id}`).textContent();

/** Clicks #add (inputs 2 and 40) and waits for 42. */
async function addShows42(page) {
  await page.locator("#add-result").evaluate((el) => {
    el.textContent = "";
  });
  await page.click("#add");
  await textIs(page, "add-result", "42");
}

test("subprotocol route: connect, add, echo, ticks, expiry, refresh, no console errors; screenshot", async (t) => {
  const gw = await startGateway();
  t.after(() => gw.stop());
  const { page, errors } = await openPage(t);
  await page.goto(`${gw.origin}/`);
  await stateIs(page, "connected");
  assert.equal(await text(page, "auth-route"), "the subprotocol");

  assert.equal(await page.inputValue("#a"), "2");
  assert.equal(await page.inputValue("#b"), "40");
  await addShows42(page);
  await page.fill("#echo-text", "hello from chromium");
  await page.click("#echo");
  await textIs(page, "echo-result", JSON.stringify("hello from chromium"));

  // demo.tick every second (--demo-tick-secs 1): the count grows and the list shows them.
  await waitUntil(page, "#tick-count reaches 2", () => Number(document.getElementById("tick-count").textContent) >= 2);
  const firstTick = await page.locator("#ticks li").last().textContent();
  assert.match(firstTick, /^demo\.tick \{.*"n":\d+/, firstTick);

  // The hello's expires_at: the token's `exp`, /demo/token's 15 minutes.
  const expiresAt = Number(await page.locator("#expires-at").getAttribute("data-expires-at"));
  const now = Date.now() / 1000;
  assert.ok(expiresAt > now + 14 * 60 && expiresAt <= now + 15 * 60 + 1, `expires_at ${expiresAt}, now ${now}`);
  assert.match(await text(page, "expires-at"), /\d{1,2}:\d{2}/);

  // A refresh a second later gets a later token (exp has a one-second grain).
  await sleep(1_100);
  await page.click("#refresh");
  await waitUntil(
    page,
    "#expires-at moves on after #refresh",
    (before) => Number(document.getElementById("expires-at").dataset.expiresAt) > before,
    expiresAt,
  );
  assert.equal(await text(page, "error"), "");
  await stateIs(page, "connected");

  mkdirSync(ARTIFACTS, { recursive: true });
  const shot = join(ARTIFACTS, "demo.png");
  await page.screenshot({ path: shot, fullPage: true });
  console.log(`screenshot: ${shot}`);

  assert.deepEqual(errors, [], "console errors on the demo page");
});

test("first-frame route: connect and add", async (t) => {
  const gw = await startGateway();
  t.after(() => gw.stop());
  const { page, errors } = await openPage(t);
  await page.goto(`${gw.origin}/?auth=first-frame`);
  await stateIs(page, "connected");
  assert.equal(await text(page, "auth-route"), "the first frame");
  await addShows42(page);
  assert.match(await text(page, "session"), /^as \S+ \(.+\)$/);
  assert.deepEqual(errors, []);
});

test("a refused token: the first-frame route shows 4401 and its reason, the subprotocol route an error", async (t) => {
  const gw = await startGateway();
  t.after(() => gw.stop());
  const { page } = await openPage(t);

  await page.goto(`${gw.origin}/?auth=first-frame&token=invalid`);
  await stateIs(page, "closed");
  await waitUntil(page, "#error shows the reason", () => document.getElementById("error").textContent !== "");
  assert.equal(await text(page, "error"), "cannot connect (4401 unauthorized)");
  assert.equal(await page.isDisabled("#add"), true);

  // Refused at the upgrade: a browser sees 1006 and no reason; the page still says so.
  await page.goto(`${gw.origin}/?token=invalid`);
  await stateIs(page, "closed");
  assert.equal(await text(page, "error"), "cannot connect (1006)");
});

test("survives a gateway restart: disconnected, then connected again, add works, ticks resume", async (t) => {
  const first = await startGateway();
  t.after(() => first.stop());
  const { page } = await openPage(t);
  await page.goto(`${first.origin}/`);
  await stateIs(page, "connected");
  await addShows42(page);
  const session = await text(page, "session");

  await first.stop();
  await waitUntil(page, "#state leaves connected", () =>
    ["disconnected", "connecting"].includes(document.getElementById("state").dataset.state),
  );
  assert.equal(await page.isDisabled("#add"), true, "#add is disabled while disconnected");
  // The drain said goodbye with 1001 (reconnect), and the page logged it.
  await waitUntil(page, "the log shows the 1001 close", () =>
    [...document.querySelectorAll("#log li")].some((li) => / disconnected: 1001 /.test(li.textContent)),
  );

  const second = await restartGateway(first.port);
  t.after(() => second.stop());
  await stateIs(page, "connected", RECONNECT_MS);
  const again = await text(page, "session");
  assert.notEqual(again, session, "a new session after the restart");
  await addShows42(page);
  const ticks = Number(await text(page, "tick-count"));
  await waitUntil(
    page,
    "ticks resume after the restart (resubscribed)",
    (n) => Number(document.getElementById("tick-count").textContent) > n,
    ticks,
  );
});

/** A tiny page on another origin: imports the library from the gateway, fetches the token
 * there cross-origin, connects, adds. Same element ids as the demo page. */
function crossOriginPage(gatewayOrigin) {
  const ws = gatewayOrigin.replace(/^http/, "ws");
  return `<!doctype html>
<meta charset="utf-8">
<title>another origin</title>
<p>State: <strong id="state" data-state="loading">loading</strong></p>
<p id="error"></p>
<output id="add-result"></output>
<script type="module">
const $ = (id) => document.getElementById(id);
const show = (s) => { $("state").textContent = s; $("state").dataset.state = s; };
try {
  const { connect } = await import("${gatewayOrigin}/nuropb-gateway.js");
  const getToken = async () => (await (await fetch("${gatewayOrigin}/demo/token")).json()).token;
  show("connecting");
  const client = await connect({ url: "${ws}/ws", getToken, reconnect: false });
  show("connected");
  $("add-result").textContent = JSON.stringify(await client.request("demo", "add", { a: 40, b: 2 }));
} catch (e) {
  show("failed");
  $("error").textContent = String(e && e.message || e);
}
</script>`;
}

/** A loopback HTTP server answering every GET with `html`. */
async function staticServer(html) {
  const server = createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
    res.end(html());
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  return {
    origin: `http://127.0.0.1:${server.address().port}`,
    close: () => new Promise((r) => server.close(r)),
  };
}

test("a page on another origin, allowed by --allowed-origins, connects and calls demo.add; another is refused", async (t) => {
  let gatewayOrigin = "";
  const allowed = await staticServer(() => crossOriginPage(gatewayOrigin));
  t.after(() => allowed.close());
  const refused = await staticServer(() => crossOriginPage(gatewayOrigin));
  t.after(() => refused.close());
  const gw = await startGateway({ args: ["--allowed-origins", allowed.origin] });
  t.after(() => gw.stop());
  gatewayOrigin = gw.origin;

  const { page, errors } = await openPage(t);
  await page.goto(`${allowed.origin}/`);
  await stateIs(page, "connected");
  await textIs(page, "add-result", "42");
  assert.deepEqual(errors, [], "console errors on the allowed page");

  // The same page from an origin the gateway does not list: the browser refuses to let
  // it read the library (no access-control-allow-origin), so it never connects.
  await page.goto(`${refused.origin}/`);
  await stateIs(page, "failed");
  assert.equal(await text(page, "add-result"), "");
});
