// @nuropb/gateway-client: the browser and Node client of nuropb-gateway.
//
// One file on purpose: the gateway serves the compiled module as `/nuropb-gateway.js`, so it
// must not import anything relative. No runtime dependency: frames are JSON text.
//
// What it does, in the order a connection lives:
// - `connect()` asks `getToken()` for a JWT and opens the WebSocket with it, either in the
//   subprotocol list (`nuropb.v1`, `nuropb.token.<jwt>`) or as the first frame
//   (`{"type":"auth",...}`); never in the URL. It resolves after the gateway's hello.
// - Every client frame carries an `id` from a counter; every answer carries it back, so
//   requests, commands, subscriptions, refreshes and pings are matched by `id`.
// - The token is refreshed through `getToken()` a margin before the hello's `expires_at`.
// - When the connection drops with a code that allows it (see `isReconnectable`), the
//   client reconnects with jittered exponential backoff, asks `getToken()` again and
//   subscribes again. Requests in flight are rejected with `DisconnectedError`, never resent:
//   the gateway may have published them already.
/** The subprotocol every connection offers and the gateway selects. */
export const SUBPROTOCOL = "nuropb.v1";
/** Prefix of the subprotocol entry that carries the token on the subprotocol route. */
export const TOKEN_SUBPROTOCOL_PREFIX = "nuropb.token.";
// ---------------------------------------------------------------------------------------
// Errors
/** Base class of every error this library rejects with. */
export class GatewayClientError extends Error {
    constructor(message, options) {
        super(message);
        this.name = new.target.name;
        if (options && "cause" in options) {
            Object.defineProperty(this, "cause", { value: options.cause, configurable: true, writable: true });
        }
    }
}
/** The gateway or the service answered with a NuroPb error object. */
export class NuropbError extends GatewayClientError {
    constructor(nuropbError, traceId) {
        const description = typeof nuropbError.description === "string" ? nuropbError.description : "";
        super(description ? `${nuropbError.error}: ${description}` : String(nuropbError.error));
        this.error = String(nuropbError.error);
        this.description = description;
        this.nuropbError = nuropbError;
        this.traceId = traceId;
    }
}
/** No answer within the timeout (the call may still run on the mesh). */
export class RequestTimeoutError extends GatewayClientError {
    constructor(timeout, traceId) {
        super(`no answer within ${timeout} ms${traceId ? ` (trace_id ${traceId})` : ""}`);
        this.timeout = timeout;
        this.traceId = traceId;
    }
}
/** The call's `AbortSignal` fired. `name` is `AbortError`, as `fetch` rejects. */
export class RequestAbortedError extends GatewayClientError {
    constructor(reason, traceId) {
        super("the call was aborted", { cause: reason });
        this.reason = reason;
        this.traceId = traceId;
        this.name = "AbortError";
    }
}
/** The connection was lost while the call waited for its answer, or there was no
 * connection when it was made. The call was not resent; whether it ran is unknown. */
export class DisconnectedError extends GatewayClientError {
    constructor(code, reason, traceId) {
        super(code === 0 ? `not connected (${reason})` : `disconnected (${code}${reason ? ` ${reason}` : ""}) before the answer`);
        this.code = code;
        this.reason = reason;
        this.traceId = traceId;
    }
}
/** The client is closed: by `close()` or a terminal close code. */
export class ClosedError extends GatewayClientError {
    constructor(code, reason) {
        super(`client closed (${code}${reason ? ` ${reason}` : ""})`);
        this.code = code;
        this.reason = reason;
    }
}
/** The first connection attempt failed (no hello). `code` is 0 when no socket closed
 * (e.g. `getToken()` rejected or the WebSocket constructor threw; see `cause`). */
export class ConnectError extends GatewayClientError {
    constructor(code, reason, options) {
        super(`cannot connect (${code}${reason ? ` ${reason}` : ""})`, options);
        this.code = code;
        this.reason = reason;
    }
}
/** `maxPendingRequests` calls are already waiting. */
export class TooManyPendingError extends GatewayClientError {
    constructor(limit) {
        super(`${limit} calls are already waiting for an answer`);
        this.limit = limit;
    }
}
// ---------------------------------------------------------------------------------------
// Pure helpers (exported for tests and for applications that want the same rules)
/** Close codes after which the client does not reconnect. The rest reconnect with backoff
 * (4003, token expired, at once with a fresh token). */
export const TERMINAL_CLOSE_CODES = new Set([
    1002, // the client broke the WebSocket protocol: a bug here, reconnecting repeats it
    1003, // unsupported data: a client bug
    1007, // a text frame that is not UTF-8: a client bug
    1008, // policy: too many bad frames, the user's session limit, origin
    1009, // message too big: resending it would fail again
    1010, // the client required an extension the gateway refused
    4001, // disconnect_user from a mesh peer: a deliberate kick, not to be undone in 500 ms
    4401, // unauthorized (first-frame route: bad, missing or late token)
]);
/** The close code the gateway uses when a session's token expired unrefreshed. */
export const TOKEN_EXPIRED_CLOSE_CODE = 4003;
/** Whether a connection closed with `code` should be reestablished. 4400–4999 are
 * terminal (4xxx mirrors HTTP: 44xx = refused), every other code not listed in
 * `TERMINAL_CLOSE_CODES` reconnects (1000, 1001, 1005, 1006, 1011–1015, 3000–3999,
 * 4000–4399). */
export function isReconnectable(code) {
    if (TERMINAL_CLOSE_CODES.has(code))
        return false;
    if (code >= 4400 && code <= 4999)
        return false;
    return true;
}
/** The delay before reconnect attempt `attempt` (0 for the first): base =
 * min(max, min·factor^attempt), drawn from base·(1 ± jitter), clamped to [min, max]. */
export function backoffDelay(attempt, options = {}, random = Math.random) {
    const min = options.minReconnectDelay ?? 500;
    const max = Math.max(min, options.maxReconnectDelay ?? 20000);
    const factor = options.reconnectFactor ?? 2;
    const jitter = Math.min(1, Math.max(0, options.reconnectJitter ?? 0.5));
    const base = Math.min(max, min * Math.pow(factor, Math.min(attempt, 64)));
    const drawn = base * (1 + jitter * (2 * random() - 1));
    return Math.round(Math.min(max, Math.max(min, drawn)));
}
/** AMQP topic matching, as the gateway routes: words split on `.`, `*` is exactly one
 * word, `#` zero or more words. */
export function topicMatches(pattern, topic) {
    const p = pattern.split(".");
    const t = topic.split(".");
    // Iterative matcher with one backtrack point per `#` (bounded: O(|p|·|t|)).
    const memo = new Map();
    const match = (i, j) => {
        const key = i * (t.length + 1) + j;
        const known = memo.get(key);
        if (known !== undefined)
            return known;
        let result;
        if (i === p.length)
            result = j === t.length;
        else if (p[i] === "#")
            result = match(i + 1, j) || (j < t.length && match(i, j + 1));
        else
            result = j < t.length && (p[i] === "*" || p[i] === t[j]) && match(i + 1, j + 1);
        memo.set(key, result);
        return result;
    };
    return match(0, 0);
}
/** The refresh margin by default: min(30 s, 10 % of the remaining lifetime). */
export function defaultRefreshMargin(lifetimeMs) {
    return Math.min(30000, Math.max(0, lifetimeMs) / 10);
}
const OPEN = 1;
/** setTimeout's limit (2^31 − 1 ms): longer delays are chained. */
const MAX_TIMER_MS = 2147483647;
/** A client close code for a connection given up locally (no hello in time). */
const CLIENT_GAVE_UP = 4000;
const defaultTimers = {
    setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
    clearTimeout: (handle) => globalThis.clearTimeout(handle),
    now: () => Date.now(),
};
function randomHex(bytes) {
    const buf = new Uint8Array(bytes);
    const c = globalThis.crypto;
    if (c && typeof c.getRandomValues === "function")
        c.getRandomValues(buf);
    else
        for (let i = 0; i < bytes; i++)
            buf[i] = Math.floor(Math.random() * 256);
    let s = "";
    for (const b of buf)
        s += b.toString(16).padStart(2, "0");
    return s;
}
function isObject(v) {
    return typeof v === "object" && v !== null && !Array.isArray(v);
}
/** A token must be a valid HTTP token (RFC 9110 tchar) to ride in `Sec-WebSocket-Protocol`. */
const TOKEN_CHARS = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
export class GatewayClient {
    /** Use `connect()`. */
    constructor(options) {
        this.listeners = new Map();
        this.currentState = "connecting";
        this.hello = null;
        this.ws = null;
        /** Incremented per attempt; callbacks of an older attempt check it and do nothing. */
        this.generation = 0;
        this.attempt = 0;
        this.nextId = 0;
        this.pending = new Map();
        /** Requests and commands among `pending` (what `maxPendingRequests` bounds). */
        this.pendingCalls = 0;
        this.subscriptions = new Map();
        /** Every armed timer handle (cleared all at once on close) and, per `startTimer` token,
         * its current handle. */
        this.liveTimers = new Set();
        this.timerHandles = new Map();
        this.closeInfo = { code: 1000, reason: "" };
        this.connectTimer = null;
        this.reconnectTimer = null;
        this.refreshTimer = null;
        this.pingTimer = null;
        this.firstConnect = null;
        if (typeof options.url !== "string" || options.url === "")
            throw new TypeError("connect: `url` is required");
        if (typeof options.getToken !== "function")
            throw new TypeError("connect: `getToken` must be a function");
        const WS = options.WebSocket ?? globalThis.WebSocket;
        if (!WS)
            throw new TypeError("connect: no WebSocket constructor (pass `WebSocket`, e.g. the `ws` package's)");
        const auth = options.auth ?? "subprotocol";
        if (auth !== "subprotocol" && auth !== "first-frame") {
            throw new TypeError(`connect: \`auth\` must be "subprotocol" or "first-frame", not ${JSON.stringify(auth)}`);
        }
        this.WS = WS;
        this.timers = options.timers ?? defaultTimers;
        this.random = options.random ?? Math.random;
        this.opts = {
            ...options,
            auth,
            requestTimeout: options.requestTimeout ?? 35000,
            connectTimeout: options.connectTimeout ?? 10000,
            maxPendingRequests: options.maxPendingRequests ?? 1000,
            reconnect: options.reconnect ?? true,
            pingInterval: options.pingInterval ?? 25000,
            pongTimeout: options.pongTimeout ?? 10000,
        };
    }
    /** The current connection state. */
    get state() {
        return this.currentState;
    }
    /** The hello of the current (or last) connection. */
    get session() {
        return this.hello;
    }
    /** When the gateway closes the session unless refreshed (seconds since the epoch). */
    get expiresAt() {
        return this.lastExpiresAt;
    }
    /** Subscribe to a connection event; returns the function that unsubscribes. */
    on(event, listener) {
        let set = this.listeners.get(event);
        if (!set) {
            set = new Set();
            this.listeners.set(event, set);
        }
        set.add(listener);
        return () => this.off(event, listener);
    }
    off(event, listener) {
        this.listeners.get(event)?.delete(listener);
    }
    /** Calls `service.method(**params)` and resolves with its result. */
    request(service, method, params = {}, options = {}) {
        return this.call("request", service, method, params, options).then((frame) => {
            const payload = frame.payload;
            return payload.result;
        });
    }
    /** Publishes a command (services never answer commands); resolves with its trace id
     * once the gateway has published it. */
    command(service, method, params = {}, options = {}) {
        return this.call("command", service, method, params, options).then((frame) => {
            const payload = isObject(frame.payload) ? frame.payload : {};
            return typeof payload.trace_id === "string" ? payload.trace_id : (options.traceId ?? "");
        });
    }
    /** Subscribes `handler` to events whose topic matches `pattern` (AMQP topic syntax).
     * Resolves once the gateway confirmed the pattern (at once when it already has);
     * rejects with `NuropbError` when the gateway refuses it. Called while disconnected, it
     * resolves after the next connection subscribed. Subscriptions are renewed after every
     * reconnect. */
    subscribe(pattern, handler) {
        if (this.currentState === "closed")
            return Promise.reject(this.closedError());
        if (typeof pattern !== "string" || pattern === "")
            return Promise.reject(new TypeError("subscribe: empty pattern"));
        if (typeof handler !== "function")
            return Promise.reject(new TypeError("subscribe: handler must be a function"));
        let sub = this.subscriptions.get(pattern);
        if (sub) {
            sub.handlers.add(handler);
            if (sub.confirmed)
                return Promise.resolve();
            const s = sub;
            return new Promise((resolve, reject) => s.waiters.push({ resolve, reject }));
        }
        sub = { handlers: new Set([handler]), confirmed: false, waiters: [] };
        this.subscriptions.set(pattern, sub);
        const s = sub;
        const promise = new Promise((resolve, reject) => s.waiters.push({ resolve, reject }));
        if (this.currentState === "connected")
            this.sendSubscribe(pattern, s);
        return promise;
    }
    /** Drops every handler of `pattern` and tells the gateway. Resolves when the gateway
     * confirmed, or at once when disconnected (the next connection will not subscribe it). */
    unsubscribe(pattern) {
        const sub = this.subscriptions.get(pattern);
        if (!sub)
            return Promise.resolve();
        this.subscriptions.delete(pattern);
        for (const w of sub.waiters)
            w.reject(new GatewayClientError(`unsubscribed from ${pattern} before it was confirmed`));
        if (this.currentState !== "connected")
            return Promise.resolve();
        return this.send("unsubscribe", { topics: [pattern] }, this.opts.requestTimeout).then(() => undefined, (error) => {
            // Lost with the connection: the next one does not subscribe the pattern, so it is gone.
            if (error instanceof DisconnectedError)
                return;
            throw error;
        });
    }
    /** Sends a fresh token from `getToken()` now; resolves with the new `expires_at`.
     * The client also does this by itself before the token expires. */
    async refresh() {
        if (this.currentState !== "connected") {
            throw this.currentState === "closed" ? this.closedError() : new DisconnectedError(0, "not connected");
        }
        const generation = this.generation;
        const token = await this.opts.getToken();
        if (generation !== this.generation || this.currentState !== "connected") {
            throw new DisconnectedError(0, "the connection changed while getToken() ran");
        }
        const frame = await this.send("refresh", { token }, this.opts.requestTimeout);
        const payload = isObject(frame.payload) ? frame.payload : {};
        const expiresAt = Number(payload.expires_at);
        if (!Number.isFinite(expiresAt))
            throw new GatewayClientError("refreshed without expires_at");
        const previous = this.lastExpiresAt;
        this.lastExpiresAt = expiresAt;
        this.emit("refreshed", { expiresAt });
        // A refresh that does not extend the expiry is not repeated (getToken() returning the
        // same token would otherwise refresh in a tight loop).
        if (previous === undefined || expiresAt > previous)
            this.scheduleRefresh(expiresAt);
        else
            this.clearTimer("refreshTimer");
        return expiresAt;
    }
    /** A round trip to the gateway. */
    ping(options = {}) {
        if (this.currentState !== "connected") {
            return Promise.reject(this.currentState === "closed" ? this.closedError() : new DisconnectedError(0, "not connected"));
        }
        return this.send("ping", undefined, options.timeout ?? this.opts.requestTimeout).then(() => undefined);
    }
    /** Closes the connection for good: no reconnect, every waiting call rejected with
     * `ClosedError`, every timer cleared. */
    close() {
        if (this.currentState === "closed")
            return;
        this.terminate(1000, "client closed");
    }
    // -------------------------------------------------------------------------------------
    // Connection
    /** Starts the first attempt; resolves after its hello. Called once, by `connect()`.
     * @internal */
    start() {
        return new Promise((resolve, reject) => {
            this.firstConnect = { resolve, reject };
            void this.openConnection();
        });
    }
    async openConnection() {
        const generation = ++this.generation;
        this.setState("connecting");
        this.emit("connecting", { attempt: this.attempt });
        // One deadline for getToken(), the upgrade and the hello.
        this.connectTimer = this.startTimer(() => {
            this.connectTimer = null;
            if (generation !== this.generation)
                return;
            this.connectionLost(CLIENT_GAVE_UP, "no hello within connectTimeout");
        }, this.opts.connectTimeout);
        let token;
        try {
            token = await this.opts.getToken();
            if (typeof token !== "string" || token === "")
                throw new GatewayClientError("getToken() returned no token");
            if (!TOKEN_CHARS.test(token))
                throw new GatewayClientError("getToken() returned a token with characters a JWT cannot hold");
        }
        catch (e) {
            if (generation !== this.generation)
                return;
            this.attemptFailed(0, "getToken() failed", e);
            return;
        }
        if (generation !== this.generation)
            return;
        const protocols = this.opts.auth === "subprotocol" ? [SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + token] : [SUBPROTOCOL];
        let ws;
        try {
            ws = new this.WS(this.opts.url, protocols);
        }
        catch (e) {
            this.attemptFailed(0, "cannot open the WebSocket", e);
            return;
        }
        this.ws = ws;
        try {
            ws.binaryType = "arraybuffer";
        }
        catch {
            // Read-only in some implementations; binary frames are ignored anyway.
        }
        ws.onopen = () => {
            if (generation !== this.generation)
                return;
            if (this.opts.auth === "first-frame")
                this.sendRaw({ type: "auth", payload: { token } });
        };
        ws.onmessage = (ev) => {
            if (generation !== this.generation)
                return;
            this.onFrame(ev.data);
        };
        ws.onerror = () => {
            // Followed by a close event, which is where the failure is handled.
        };
        ws.onclose = (ev) => {
            if (generation !== this.generation)
                return;
            this.connectionLost(typeof ev.code === "number" ? ev.code : 1006, typeof ev.reason === "string" ? ev.reason : "");
        };
    }
    onFrame(data) {
        if (typeof data !== "string") {
            this.emit("error", { error: new GatewayClientError("ignored a binary frame (this client speaks JSON)") });
            return;
        }
        let frame;
        try {
            frame = JSON.parse(data);
        }
        catch (e) {
            this.emit("error", { error: new GatewayClientError("ignored a frame that is not JSON", { cause: e }) });
            return;
        }
        if (!isObject(frame))
            return;
        const type = frame.type;
        if (this.currentState === "connecting") {
            // Before the hello nothing else is expected; anything else is ignored.
            if (type === "event" && isObject(frame.payload) && frame.payload.topic === "hello" && isObject(frame.payload.event)) {
                this.onHello(frame.payload.event);
            }
            return;
        }
        if (type === "event") {
            if (!isObject(frame.payload) || typeof frame.payload.topic !== "string")
                return;
            this.dispatchEvent(frame.payload.topic, frame.payload.event);
            return;
        }
        const pending = this.findPending(frame);
        if (type === undefined && typeof frame.error === "string") {
            const error = new NuropbError(frame, pending?.traceId);
            if (pending)
                this.settle(pending, frame, error);
            else
                this.emit("error", { error });
            return;
        }
        if (!pending)
            return; // An answer to a call that timed out or was aborted.
        if (type === "response" && isObject(frame.payload) && isObject(frame.payload.error)) {
            this.settle(pending, frame, new NuropbError(frame.payload.error, pending.traceId));
            return;
        }
        this.settle(pending, frame, null);
    }
    /** The call an answer belongs to: by `id`; for responses of a gateway that does not
     * echo ids yet, by `trace_id` (every call sends a unique one). */
    findPending(frame) {
        if (typeof frame.id === "string") {
            const p = this.pending.get(frame.id);
            if (p)
                return p;
        }
        if ((frame.type === "response" || frame.type === "accepted") && isObject(frame.payload)) {
            const traceId = frame.payload.trace_id;
            if (typeof traceId === "string") {
                for (const p of this.pending.values())
                    if (p.traceId === traceId)
                        return p;
            }
        }
        return undefined;
    }
    settle(pending, frame, error) {
        if (error)
            pending.reject(error);
        else
            pending.resolve(frame);
    }
    onHello(hello) {
        this.clearTimer("connectTimer");
        this.hello = hello;
        this.attempt = 0;
        this.setState("connected");
        const expiresAt = typeof hello.expires_at === "number" && Number.isFinite(hello.expires_at) ? hello.expires_at : undefined;
        this.lastExpiresAt = expiresAt;
        if (expiresAt !== undefined)
            this.scheduleRefresh(expiresAt);
        this.schedulePing();
        this.resubscribe();
        const first = this.firstConnect;
        this.firstConnect = null;
        this.emit("connected", { hello });
        first?.resolve(this);
    }
    /** Renews every subscription on a new connection: all patterns in one frame (they were
     * accepted before, and one frame costs one token of the gateway's frame rate); if the
     * gateway refuses it (one refused pattern refuses the frame), one frame per pattern, so
     * only the refused ones are dropped. */
    resubscribe() {
        const subs = [...this.subscriptions];
        for (const [, sub] of subs)
            sub.confirmed = false;
        if (subs.length === 0)
            return;
        if (subs.length === 1) {
            const [pattern, sub] = subs[0];
            this.sendSubscribe(pattern, sub);
            return;
        }
        const generation = this.generation;
        this.send("subscribe", { topics: subs.map(([pattern]) => pattern) }, this.opts.requestTimeout).then(() => {
            for (const [pattern, sub] of subs) {
                if (this.subscriptions.get(pattern) !== sub)
                    continue;
                sub.confirmed = true;
                for (const w of sub.waiters.splice(0))
                    w.resolve();
            }
        }, (error) => {
            if (error instanceof DisconnectedError || generation !== this.generation)
                return;
            for (const [pattern, sub] of subs)
                if (this.subscriptions.get(pattern) === sub)
                    this.sendSubscribe(pattern, sub);
        });
    }
    sendSubscribe(pattern, sub) {
        this.send("subscribe", { topics: [pattern] }, this.opts.requestTimeout).then(() => {
            if (this.subscriptions.get(pattern) !== sub)
                return;
            sub.confirmed = true;
            const waiters = sub.waiters.splice(0);
            for (const w of waiters)
                w.resolve();
        }, (error) => {
            if (this.subscriptions.get(pattern) !== sub)
                return;
            // Lost with the connection: the next connection subscribes again; the waiters wait.
            if (error instanceof DisconnectedError)
                return;
            this.subscriptions.delete(pattern);
            const waiters = sub.waiters.splice(0);
            if (waiters.length === 0)
                this.emit("error", { error });
            for (const w of waiters)
                w.reject(error);
        });
    }
    dispatchEvent(topic, event) {
        this.emit("event", { topic, event });
        for (const [pattern, sub] of this.subscriptions) {
            if (!topicMatches(pattern, topic))
                continue;
            for (const handler of [...sub.handlers]) {
                try {
                    handler(event, topic);
                }
                catch (e) {
                    rethrowLater(e);
                }
            }
        }
    }
    scheduleRefresh(expiresAt) {
        this.clearTimer("refreshTimer");
        const now = this.timers.now();
        const expiresMs = expiresAt * 1000;
        const margin = (this.opts.refreshMargin ?? defaultRefreshMargin)(expiresMs - now);
        const generation = this.generation;
        this.refreshTimer = this.startTimer(() => {
            this.refreshTimer = null;
            if (generation !== this.generation || this.currentState !== "connected")
                return;
            this.refresh().catch((error) => {
                if (generation !== this.generation || this.currentState !== "connected")
                    return;
                this.emit("error", { error: new GatewayClientError("token refresh failed", { cause: error }) });
                // Try again while the session lasts: halfway to the expiry, at most in 5 s.
                const left = expiresMs - this.timers.now();
                if (left > 1000) {
                    this.refreshTimer = this.startTimer(() => {
                        this.refreshTimer = null;
                        if (generation === this.generation && this.currentState === "connected")
                            this.scheduleRefresh(expiresAt);
                    }, Math.min(5000, left / 2));
                }
            });
        }, Math.max(0, expiresMs - margin - now));
    }
    /** Keep-alive: a `ping` every `pingInterval`; no answer within `pongTimeout` means the
     * connection is dead. Any answer counts, an error frame too (e.g. `RateLimited`). */
    schedulePing() {
        this.clearTimer("pingTimer");
        const interval = this.opts.pingInterval;
        if (!(interval > 0) || !Number.isFinite(interval))
            return;
        const generation = this.generation;
        this.pingTimer = this.startTimer(() => {
            this.pingTimer = null;
            if (generation !== this.generation || this.currentState !== "connected")
                return;
            this.send("ping", undefined, this.opts.pongTimeout).then(() => this.schedulePing(), (error) => {
                if (generation !== this.generation || this.currentState !== "connected")
                    return;
                if (error instanceof RequestTimeoutError) {
                    this.connectionLost(CLIENT_GAVE_UP, `no pong within ${this.opts.pongTimeout} ms`);
                }
                else {
                    this.schedulePing();
                }
            });
        }, interval);
    }
    /** The socket of the current attempt closed (or was given up). */
    connectionLost(code, reason) {
        const ws = this.ws;
        this.detachSocket();
        if (ws && ws.readyState <= OPEN) {
            try {
                ws.close(CLIENT_GAVE_UP, reason.slice(0, 100));
            }
            catch {
                // Closing a socket that is still connecting may throw in some implementations.
            }
        }
        this.attemptFailed(code, reason, undefined);
    }
    /** Decides what happens after an attempt or a connection ended. */
    attemptFailed(code, reason, cause) {
        this.generation++;
        this.detachSocket();
        this.clearTimer("connectTimer");
        this.clearTimer("refreshTimer");
        this.clearTimer("pingTimer");
        this.rejectPending(new DisconnectedError(code, reason));
        if (cause !== undefined) {
            this.emit("error", { error: cause instanceof Error ? cause : new GatewayClientError(String(cause)) });
        }
        const connectError = () => new ConnectError(code, reason, cause === undefined ? undefined : { cause });
        if (this.firstConnect && !this.opts.retryFirstConnect) {
            this.terminate(code, reason, connectError());
            return;
        }
        const decide = this.opts.shouldReconnect ?? isReconnectable;
        // code 0: no socket closed (getToken() or the constructor failed): always retry.
        if (!this.opts.reconnect || (code !== 0 && !decide(code, reason))) {
            this.terminate(code, reason, this.firstConnect ? connectError() : undefined);
            return;
        }
        // A session closed for an expired token reconnects at once with a fresh one.
        const delay = code === TOKEN_EXPIRED_CLOSE_CODE && this.attempt === 0 ? 0 : backoffDelay(this.attempt, this.opts, this.random);
        this.attempt++;
        this.setState("disconnected");
        this.emit("disconnected", { code, reason, delay });
        this.reconnectTimer = this.startTimer(() => {
            this.reconnectTimer = null;
            if (this.currentState !== "disconnected")
                return;
            void this.openConnection();
        }, delay);
    }
    /** Ends the client for good. */
    terminate(code, reason, error) {
        this.generation++;
        const ws = this.ws;
        this.detachSocket();
        if (ws && ws.readyState <= OPEN) {
            try {
                ws.close(1000, "client closed");
            }
            catch {
                // See connectionLost.
            }
        }
        for (const t of [...this.liveTimers])
            this.timers.clearTimeout(t);
        this.liveTimers.clear();
        this.connectTimer = this.reconnectTimer = this.refreshTimer = this.pingTimer = null;
        this.setState("closed");
        this.closeInfo = { code, reason };
        const closed = error ?? new ClosedError(code, reason);
        this.rejectPending(closed);
        for (const sub of this.subscriptions.values())
            for (const w of sub.waiters.splice(0))
                w.reject(closed);
        this.emit("closed", { code, reason });
        const first = this.firstConnect;
        this.firstConnect = null;
        first?.reject(closed);
    }
    closedError() {
        return new ClosedError(this.closeInfo.code, this.closeInfo.reason);
    }
    detachSocket() {
        const ws = this.ws;
        if (!ws)
            return;
        ws.onopen = ws.onmessage = ws.onclose = null;
        // Keep a no-op error handler: some implementations throw on an unhandled error event.
        ws.onerror = () => undefined;
        this.ws = null;
    }
    rejectPending(error) {
        const all = [...this.pending.values()];
        for (const p of all) {
            p.reject(error instanceof DisconnectedError && p.traceId ? new DisconnectedError(error.code, error.reason, p.traceId) : error);
        }
    }
    setState(state) {
        this.currentState = state;
    }
    // -------------------------------------------------------------------------------------
    // Frames
    call(kind, service, method, params, options) {
        if (typeof service !== "string" || service === "" || typeof method !== "string" || method === "") {
            return Promise.reject(new TypeError(`${kind}: service and method must be non-empty strings`));
        }
        if (!isObject(params))
            return Promise.reject(new TypeError(`${kind}: params must be an object`));
        const traceId = options.traceId ?? randomHex(16);
        if (options.signal?.aborted)
            return Promise.reject(new RequestAbortedError(options.signal.reason, traceId));
        if (this.currentState === "closed")
            return Promise.reject(this.closedError());
        if (this.currentState !== "connected")
            return Promise.reject(new DisconnectedError(0, "not connected", traceId));
        if (this.pendingCalls >= this.opts.maxPendingRequests) {
            return Promise.reject(new TooManyPendingError(this.opts.maxPendingRequests));
        }
        this.pendingCalls++;
        return this.send(kind, { service, method, params, trace_id: traceId }, options.timeout ?? this.opts.requestTimeout, {
            traceId,
            signal: options.signal,
        }).finally(() => {
            this.pendingCalls--;
        });
    }
    /** Sends one frame with a fresh `id` and waits for its answer. */
    send(kind, payload, timeout, extra = {}) {
        return new Promise((resolve, reject) => {
            const id = String(++this.nextId);
            const { traceId, signal } = extra;
            let timer = null;
            const onAbort = () => done(new RequestAbortedError(signal?.reason, traceId), null);
            const done = (error, frame) => {
                if (!this.pending.delete(id))
                    return;
                if (timer !== null)
                    this.stopTimer(timer);
                signal?.removeEventListener("abort", onAbort);
                if (error)
                    reject(error);
                else
                    resolve(frame);
            };
            this.pending.set(id, {
                kind,
                traceId,
                resolve: (frame) => done(null, frame),
                reject: (error) => done(error, null),
            });
            if (timeout > 0 && Number.isFinite(timeout)) {
                timer = this.startTimer(() => {
                    timer = null;
                    done(new RequestTimeoutError(timeout, traceId), null);
                }, timeout);
            }
            signal?.addEventListener("abort", onAbort, { once: true });
            const frame = { type: kind, id };
            if (payload !== undefined)
                frame.payload = payload;
            try {
                this.sendRaw(frame);
            }
            catch (e) {
                done(e instanceof Error ? e : new GatewayClientError(String(e)), null);
            }
        });
    }
    sendRaw(frame) {
        const ws = this.ws;
        if (!ws || ws.readyState !== OPEN)
            throw new DisconnectedError(0, "not connected");
        ws.send(JSON.stringify(frame));
    }
    // -------------------------------------------------------------------------------------
    // Timers and events
    /** setTimeout that tracks its handle (all are cleared on close) and chains delays
     * beyond setTimeout's 2^31 − 1 ms limit. Returns a token for `stopTimer`. */
    startTimer(fn, ms) {
        const token = {};
        const due = this.timers.now() + ms;
        const arm = (delay) => {
            const handle = this.timers.setTimeout(() => {
                this.liveTimers.delete(handle);
                this.timerHandles.delete(token);
                const left = due - this.timers.now();
                if (left > 0 && delay === MAX_TIMER_MS)
                    arm(Math.min(left, MAX_TIMER_MS));
                else
                    fn();
            }, Math.min(Math.max(0, delay), MAX_TIMER_MS));
            this.liveTimers.add(handle);
            this.timerHandles.set(token, handle);
        };
        arm(ms);
        return token;
    }
    stopTimer(token) {
        const handle = this.timerHandles.get(token);
        if (handle === undefined)
            return;
        this.timerHandles.delete(token);
        this.liveTimers.delete(handle);
        this.timers.clearTimeout(handle);
    }
    clearTimer(field) {
        const token = this[field];
        if (token !== null)
            this.stopTimer(token);
        this[field] = null;
    }
    emit(event, value) {
        const set = this.listeners.get(event);
        if (!set)
            return;
        for (const listener of [...set]) {
            try {
                listener(value);
            }
            catch (e) {
                rethrowLater(e);
            }
        }
    }
}
/** A throwing handler must not break the client's dispatch: its error is rethrown from a
 * fresh task, where the host reports it as uncaught (the browser console, Node's
 * `uncaughtException`). */
function rethrowLater(e) {
    globalThis.setTimeout(() => {
        throw e;
    }, 0);
}
/** Connects to the gateway; resolves after the hello with a client that reconnects by
 * itself. Rejects with `ConnectError` when the first attempt fails (unless
 * `retryFirstConnect`). */
export function connect(options) {
    let client;
    try {
        client = new GatewayClient(options);
    }
    catch (e) {
        return Promise.reject(e);
    }
    return client.start();
}
