// A fake nuropb-gateway for the client's unit tests, on loopback with the `ws` package.
//
// It implements the browser contract of issue 10 as the real gateway is to: the token in
// `Sec-WebSocket-Protocol` (`nuropb.v1` + `nuropb.token.<jwt>`, `nuropb.v1` selected, a bad
// token refused at the upgrade with 401) or as the first frame (`{"type":"auth",...}`
// within `authTimeoutMs`, else close 4401); the hello with `expires_at`; the `id` echoed on
// every answer; request/response, command/accepted, subscribe/subscribed,
// unsubscribe, refresh/refreshed, ping/pong and the top-level error frame of
// docs/PROTOCOL.md.

import { WebSocketServer } from "ws";

/** AMQP topic matching, written independently of the client's (recursive, small inputs). */
function matches(pattern, topic) {
  const go = (p, t) => {
    if (p.length === 0) return t.length === 0;
    if (p[0] === "#") return go(p.slice(1), t) || (t.length > 0 && go(p, t.slice(1)));
    return t.length > 0 && (p[0] === "*" || p[0] === t[0]) && go(p.slice(1), t.slice(1));
  };
  return go(pattern.split("."), topic.split("."));
}

/**
 * options:
 * - tokens: Map token → { user, expiresAt } (seconds); any other token is bad;
 * - authTimeoutMs: first-frame route deadline (default 5000);
 * - services: { "svc.method": (params, conn) => result | throws {error, description} |
 *   returns NEVER (no answer) };
 * - subscribable: (pattern) => boolean (default: everything under `demo.`).
 */
export async function startFakeGateway(options = {}) {
  const tokens = options.tokens ?? new Map();
  const services = options.services ?? {};
  const subscribable = options.subscribable ?? ((p) => p.startsWith("demo."));
  const state = {
    /** Every upgrade request seen: { url, protocols, refused }. */
    upgrades: [],
    /** Every accepted connection, in order. */
    connections: [],
    /** When set, upgrades are refused with this HTTP status. */
    refuseStatus: 0,
    /** When false, pings go unanswered (a connection that died without a close). */
    answerPings: true,
    /** When false, authenticated connections get no hello. */
    sendHello: true,
  };

  const wss = new WebSocketServer({
    host: "127.0.0.1",
    port: 0,
    handleProtocols: (protocols) => (protocols.has("nuropb.v1") ? "nuropb.v1" : false),
    verifyClient: (info, cb) => {
      const header = info.req.headers["sec-websocket-protocol"] ?? "";
      const protocols = header
        .split(",")
        .map((s) => s.trim())
        .filter(Boolean);
      const upgrade = { url: info.req.url, headers: info.req.headers, protocols, refused: 0, at: Date.now() };
      state.upgrades.push(upgrade);
      if (state.refuseStatus) {
        upgrade.refused = state.refuseStatus;
        return cb(false, state.refuseStatus, "refused");
      }
      const entry = protocols.find((p) => p.startsWith("nuropb.token."));
      if (entry && !tokens.has(entry.slice("nuropb.token.".length))) {
        upgrade.refused = 401;
        return cb(false, 401, "unauthorized", { "WWW-Authenticate": "Bearer" });
      }
      cb(true);
    },
  });
  await new Promise((resolve) => wss.once("listening", resolve));
  const port = wss.address().port;

  wss.on("connection", (ws, req) => {
    const header = req.headers["sec-websocket-protocol"] ?? "";
    const entry = header
      .split(",")
      .map((s) => s.trim())
      .find((p) => p.startsWith("nuropb.token."));
    const conn = {
      ws,
      url: req.url,
      protocol: ws.protocol,
      route: entry ? "subprotocol" : "first-frame",
      token: null,
      user: null,
      authed: false,
      frames: [],
      topics: new Set(),
      closed: null,
    };
    state.connections.push(conn);
    const send = (frame) => ws.send(JSON.stringify(frame));
    const hello = (token) => {
      const t = tokens.get(token);
      conn.token = token;
      conn.user = t.user;
      conn.authed = true;
      if (!state.sendHello) return;
      send({
        type: "event",
        payload: {
          topic: "hello",
          event: { session_id: `s${state.connections.length}`, user_id: t.user, username: t.user, expires_at: t.expiresAt },
        },
      });
    };
    ws.on("close", (code, reason) => {
      conn.closed = { code, reason: reason.toString() };
    });
    let authTimer = null;
    if (entry) hello(entry.slice("nuropb.token.".length));
    else {
      authTimer = setTimeout(() => ws.close(4401, "no auth frame"), options.authTimeoutMs ?? 5000);
    }
    ws.on("message", (data, isBinary) => {
      let frame;
      try {
        frame = JSON.parse(isBinary ? "" : data.toString());
      } catch {
        send({ error: "DecodeError", description: "not JSON" });
        return;
      }
      conn.frames.push(frame);
      if (!conn.authed) {
        // Nothing but the auth frame is acted on before it.
        clearTimeout(authTimer);
        const token = frame?.type === "auth" ? frame?.payload?.token : undefined;
        if (typeof token === "string" && tokens.has(token)) hello(token);
        else ws.close(4401, "unauthorized");
        return;
      }
      const id = typeof frame.id === "string" ? { id: frame.id } : {};
      const p = frame.payload ?? {};
      switch (frame.type) {
        case "request":
        case "command": {
          const traceId = p.trace_id || "generated-trace";
          const fn = services[`${p.service}.${p.method}`];
          if (!fn) {
            if (p.service === "badframe") {
              send({ ...id, error: "NuropbValidationError", description: "missing `payload.method`" });
              return;
            }
            send({
              type: "response",
              ...id,
              payload: {
                trace_id: traceId,
                result: null,
                error: { error: "NuropbNotDeliveredError", description: `Service ${p.service} is not known` },
              },
            });
            return;
          }
          let result;
          try {
            result = fn(p.params, conn);
          } catch (e) {
            send({ type: "response", ...id, payload: { trace_id: traceId, result: null, error: e } });
            return;
          }
          if (result === NEVER) return;
          if (frame.type === "command") send({ type: "accepted", ...id, payload: { trace_id: traceId } });
          else send({ type: "response", ...id, payload: { trace_id: traceId, result, error: null } });
          return;
        }
        case "subscribe": {
          const refused = (p.topics ?? []).filter((t) => !subscribable(t));
          if (refused.length) {
            send({ ...id, error: "NuropbAuthorizationError", description: `may not subscribe to ${refused[0]}` });
            return;
          }
          for (const t of p.topics) conn.topics.add(t);
          send({ type: "subscribed", ...id, payload: { topics: [...conn.topics] } });
          return;
        }
        case "unsubscribe":
          for (const t of p.topics ?? []) conn.topics.delete(t);
          send({ type: "subscribed", ...id, payload: { topics: [...conn.topics] } });
          return;
        case "ping":
          if (!state.answerPings) return;
          send({ type: "pong", ...id, payload: {} });
          return;
        case "refresh": {
          const t = tokens.get(p.token);
          if (!t || t.user !== conn.user) {
            send({ ...id, error: "NuropbAuthorizationError", description: "unauthorized" });
            return;
          }
          conn.token = p.token;
          send({ type: "refreshed", ...id, payload: { expires_at: t.expiresAt } });
          return;
        }
        default:
          send({ ...id, error: "NuropbValidationError", description: "unknown `type`" });
      }
    });
  });

  return {
    url: `ws://127.0.0.1:${port}/ws`,
    state,
    /** The latest accepted connection. */
    get last() {
      return state.connections[state.connections.length - 1];
    },
    /** Sends an event to every authenticated connection with a matching subscription. */
    publish(topic, event) {
      let n = 0;
      for (const c of state.connections) {
        if (c.authed && c.ws.readyState === 1 && [...c.topics].some((t) => matches(t, topic))) {
          c.ws.send(JSON.stringify({ type: "event", payload: { topic, event } }));
          n++;
        }
      }
      return n;
    },
    async close() {
      for (const c of wss.clients) c.terminate();
      await new Promise((resolve) => wss.close(resolve));
    },
  };
}

/** A service function's return value meaning "never answer". */
export const NEVER = Symbol("never");

export { matches };
