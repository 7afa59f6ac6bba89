// The demo page's script (served as /demo.js: the page's policy allows no inline script).
// Stable element ids for browser tests: #state (data-state too), #add-result, #echo-result,
// #ticks, #error, buttons #add, #echo, #refresh. Query: ?auth=subprotocol|first-frame,
// ?token=invalid (getToken returns a token the gateway refuses: shows the reason).
import { connect } from "/nuropb-gateway.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const auth = params.get("auth") === "first-frame" ? "first-frame" : "subprotocol";
const invalidToken = params.get("token") === "invalid";
const MAX_LINES = 50;

$("auth-route").textContent = auth === "first-frame" ? "the first frame" : "the subprotocol";

function line(list, text) {
  const item = document.createElement("li");
  item.textContent = text;
  list.prepend(item);
  while (list.children.length > MAX_LINES) list.lastElementChild.remove();
}

const log = (text) => line($("log"), `${new Date().toLocaleTimeString()} ${text}`);

function showState(state, detail = "") {
  $("state").textContent = state;
  $("state").dataset.state = state;
  $("session").textContent = detail;
  const usable = state === "connected";
  for (const id of ["add", "echo", "refresh"]) $(id).disabled = !usable;
}

function showError(error) {
  $("error").textContent = error ? String(error.message ?? error) : "";
}

function showExpiry(expiresAt) {
  $("expires-at").textContent = expiresAt ? new Date(expiresAt * 1000).toLocaleTimeString() : "–";
  $("expires-at").dataset.expiresAt = expiresAt ?? "";
}

async function getToken() {
  if (invalidToken) return "invalid.token.value";
  const answer = await fetch("/demo/token", { cache: "no-store" });
  if (!answer.ok) throw new Error(`/demo/token answered ${answer.status}`);
  return (await answer.json()).token;
}

async function call(button, output, run) {
  output.textContent = "…";
  try {
    output.textContent = JSON.stringify(await run());
    showError(null);
  } catch (e) {
    output.textContent = "error";
    showError(e);
  }
}

let ticks = 0;

async function main() {
  showState("connecting");
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  let client;
  try {
    client = await connect({ url, getToken, auth });
  } catch (e) {
    showState("closed");
    // A ConnectError names the close code and reason in its message already ("cannot
    // connect (4401 unauthorized)"); its cause, if any, says why no socket closed.
    const cause = e.cause?.message ? `: ${e.cause.message}` : "";
    const text = e.name === "ConnectError" ? `${e.message}${cause}` : `cannot connect: ${e.message}`;
    showError(text);
    log(`connect failed: ${text}`);
    return;
  }
  client.on("connecting", ({ attempt }) => { showState("connecting", `attempt ${attempt}`); log(`connecting, attempt ${attempt}`); });
  client.on("connected", ({ hello }) => {
    showState("connected", `as ${hello.username} (${hello.session_id})`);
    showExpiry(client.expiresAt);
    showError(null);
    log(`connected, session ${hello.session_id}`);
  });
  client.on("disconnected", ({ code, reason, delay }) => {
    showState("disconnected", `retry in ${Math.round(delay)} ms`);
    log(`disconnected: ${code} ${reason}; retry in ${Math.round(delay)} ms`);
  });
  client.on("closed", ({ code, reason }) => {
    showState("closed");
    showError(`closed: ${code} ${reason}`);
    log(`closed: ${code} ${reason}`);
  });
  client.on("refreshed", ({ expiresAt }) => { showExpiry(expiresAt); log("token refreshed"); });
  client.on("error", ({ error }) => { showError(error); log(`error: ${error.message}`); });

  const hello = client.session;
  showState("connected", `as ${hello.username} (${hello.session_id})`);
  showExpiry(client.expiresAt);
  log(`connected, session ${hello.session_id}`);

  $("add").addEventListener("click", () =>
    call($("add"), $("add-result"), () =>
      client.request("demo", "add", { a: Number($("a").value), b: Number($("b").value) })));
  $("echo").addEventListener("click", () =>
    call($("echo"), $("echo-result"), async () => (await client.request("demo", "echo", { text: $("echo-text").value })).text));
  $("refresh").addEventListener("click", async () => {
    try {
      showExpiry(await client.refresh());
      showError(null);
    } catch (e) {
      showError(e);
    }
  });

  try {
    await client.subscribe("demo.*", (event, topic) => {
      ticks += 1;
      $("tick-count").textContent = String(ticks);
      line($("ticks"), `${topic} ${JSON.stringify(event)}`);
    });
    log("subscribed to demo.*");
  } catch (e) {
    showError(e);
  }
}

main();
