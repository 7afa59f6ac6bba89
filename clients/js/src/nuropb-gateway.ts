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

/** Which browser-safe route carries the token. */
export type AuthRoute = "subprotocol" | "first-frame";

/** The life of a client: `connecting` → `connected` ⇄ `disconnected` → `closed`. */
export type ConnectionState = "connecting" | "connected" | "disconnected" | "closed";

/** The part of a WebSocket the client uses: the browser's, or the `ws` package's. */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  binaryType: string;
  // `any`: the browser's and `ws`'s event types differ; the client reads only
  // `data`, `code` and `reason`.
  onopen: ((ev: any) => unknown) | null;
  onmessage: ((ev: any) => unknown) | null;
  onclose: ((ev: any) => unknown) | null;
  onerror: ((ev: any) => unknown) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** Timer functions, injectable so tests can count or control them. */
export interface Timers {
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  /** Milliseconds since the epoch. */
  now(): number;
}

export interface BackoffOptions {
  /** Delay before the first reconnect attempt, in ms. Default 500. */
  minReconnectDelay?: number;
  /** Upper bound of any delay, in ms. Default 20 000. */
  maxReconnectDelay?: number;
  /** Growth per failed attempt. Default 2. */
  reconnectFactor?: number;
  /** 0…1: each delay is drawn from base·(1 ± jitter), then clamped to min…max. Default 0.5. */
  reconnectJitter?: number;
}

export interface ConnectOptions extends BackoffOptions {
  /** `ws://host:port/path` or `wss://…`. Never put a token in it. */
  url: string;
  /** Returns a fresh JWT; called before every connection attempt and every refresh. */
  getToken: () => Promise<string>;
  /** How the token travels. Default `"subprotocol"`. */
  auth?: AuthRoute;
  /** Default `globalThis.WebSocket` (Node 20 has none: pass the `ws` package's). */
  WebSocket?: WebSocketConstructor;
  /** Default timeout of `request`, `command`, `subscribe`, `refresh`, `ping`, in ms.
   * Default 35 000: a little over the gateway's own 30 s request timeout, so the gateway's
   * `NuropbTimeoutError` normally comes first. */
  requestTimeout?: number;
  /** How long a connection attempt may take from `getToken()` to the hello, in ms.
   * Default 10 000. */
  connectTimeout?: number;
  /** Requests and commands waiting for an answer; beyond it calls reject with
   * `TooManyPendingError`. Default 1000. */
  maxPendingRequests?: number;
  /** Send a `ping` this often while connected, in ms; 0 turns it off. Default 25 000.
   * The gateway's WebSocket pings are invisible to browser code, so this is how a client
   * notices a connection that died without a close (a laptop lid, a lost network). */
  pingInterval?: number;
  /** No answer to a `ping` within this long (ms) drops the connection and reconnects.
   * Default 10 000. */
  pongTimeout?: number;
  /** Reconnect after a reconnectable close. Default true. */
  reconnect?: boolean;
  /** Keep trying (with backoff) when the very first attempt fails, instead of rejecting
   * `connect()`. Default false: a wrong URL or token shows up as an error at once. */
  retryFirstConnect?: boolean;
  /** Decides for a close code; default `isReconnectable`. */
  shouldReconnect?: (code: number, reason: string) => boolean;
  /** Refresh this long before `expires_at`, in ms, given the token's remaining lifetime
   * when it was learnt. Default min(30 s, 10 % of the lifetime). */
  refreshMargin?: (lifetimeMs: number) => number;
  /** Default: the global timer functions and `Date.now`. */
  timers?: Timers;
  /** A number in [0, 1), for the jitter. Default `Math.random`. */
  random?: () => number;
}

export interface RequestOptions {
  /** In ms; default the client's `requestTimeout`. */
  timeout?: number;
  /** Aborting rejects the call with `RequestAbortedError` (the gateway is not told: a
   * request already sent may still run). */
  signal?: AbortSignal;
  /** Default: 32 random hex digits, generated here so that timeouts and aborts can name it. */
  traceId?: string;
}

/** The hello's `payload.event`. */
export interface Hello {
  session_id: string;
  user_id: string;
  username: string;
  /** Seconds since the epoch: when the gateway closes the session unless refreshed. */
  expires_at?: number;
  [key: string]: unknown;
}

/** A NuroPb error object as the gateway sends it. */
export interface NuropbErrorObject {
  error: string;
  description?: string | null;
  [key: string]: unknown;
}

export type EventHandler = (event: unknown, topic: string) => void;

export interface ClientEvents {
  connecting: { attempt: number };
  connected: { hello: Hello };
  /** The connection is gone; a reconnect is scheduled after `delay` ms. */
  disconnected: { code: number; reason: string; delay: number };
  /** Terminal: no reconnect (`close()`, a terminal close code, or reconnect off). */
  closed: { code: number; reason: string };
  /** Every event from the gateway (hello excepted), subscribed or targeted at the user. */
  event: { topic: string; event: unknown };
  refreshed: { expiresAt: number };
  /** Something went wrong that no promise reports: a failed refresh or `getToken()`, a
   * refused resubscription, an error frame matching no call, an undecodable frame. */
  error: { error: Error };
}

// ---------------------------------------------------------------------------------------
// Errors

/** Base class of every error this library rejects with. */
export class GatewayClientError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message);
    this.name = new.target.name;
    if (options && "cause" in options) {
      Object.defineProperty(this, "cause", { value: options.cause, configurable: true, writable: true });
    }
  }
}

/** The gateway or the service answered with a NuroPb error object. */
export class NuropbError extends GatewayClientError {
  /** The error class name, e.g. `NuropbHandlingError`, `NuropbTimeoutError`. */
  readonly error: string;
  readonly description: string;
  /** The whole error object, unchanged. */
  readonly nuropbError: NuropbErrorObject;
  readonly traceId: string | undefined;
  constructor(nuropbError: NuropbErrorObject, traceId: string | undefined) {
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
  constructor(
    readonly timeout: number,
    readonly traceId: string | undefined,
  ) {
    super(`no answer within ${timeout} ms${traceId ? ` (trace_id ${traceId})` : ""}`);
  }
}

/** The call's `AbortSignal` fired. `name` is `AbortError`, as `fetch` rejects. */
export class RequestAbortedError extends GatewayClientError {
  constructor(
    readonly reason: unknown,
    readonly traceId: string | undefined,
  ) {
    super("the call was aborted", { cause: reason });
    this.name = "AbortError";
  }
}

/** The connection was lost while the call waited for its answer, or there was no
 * connection when it was made. The call was not resent; whether it ran is unknown. */
export class DisconnectedError extends GatewayClientError {
  constructor(
    readonly code: number,
    readonly reason: string,
    readonly traceId?: string,
  ) {
    super(code === 0 ? `not connected (${reason})` : `disconnected (${code}${reason ? ` ${reason}` : ""}) before the answer`);
  }
}

/** The client is closed: by `close()` or a terminal close code. */
export class ClosedError extends GatewayClientError {
  constructor(
    readonly code: number,
    readonly reason: string,
  ) {
    super(`client closed (${code}${reason ? ` ${reason}` : ""})`);
  }
}

/** The first connection attempt failed (no hello). `code` is 0 when no socket closed
 * (e.g. `getToken()` rejected or the WebSocket constructor threw; see `cause`). */
export class ConnectError extends GatewayClientError {
  constructor(
    readonly code: number,
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(`cannot connect (${code}${reason ? ` ${reason}` : ""})`, options);
  }
}

/** `maxPendingRequests` calls are already waiting. */
export class TooManyPendingError extends GatewayClientError {
  constructor(readonly limit: number) {
    super(`${limit} calls are already waiting for an answer`);
  }
}

// ---------------------------------------------------------------------------------------
// Pure helpers (exported for tests and for applications that want the same rules)

/** Close codes after which the client does not reconnect. The rest reconnect with backoff
 * (4003, token expired, at once with a fresh token). */
export const TERMINAL_CLOSE_CODES: ReadonlySet<number> = new Set([
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
export function isReconnectable(code: number): boolean {
  if (TERMINAL_CLOSE_CODES.has(code)) return false;
  if (code >= 4400 && code <= 4999) return false;
  return true;
}

/** The delay before reconnect attempt `attempt` (0 for the first): base =
 * min(max, min·factor^attempt), drawn from base·(1 ± jitter), clamped to [min, max]. */
export function backoffDelay(attempt: number, options: BackoffOptions = {}, random: () => number = Math.random): number {
  const min = options.minReconnectDelay ?? 500;
  const max = Math.max(min, options.maxReconnectDelay ?? 20_000);
  const factor = options.reconnectFactor ?? 2;
  const jitter = Math.min(1, Math.max(0, options.reconnectJitter ?? 0.5));
  const base = Math.min(max, min * Math.pow(factor, Math.min(attempt, 64)));
  const drawn = base * (1 + jitter * (2 * random() - 1));
  return Math.round(Math.min(max, Math.max(min, drawn)));
}

/** AMQP topic matching, as the gateway routes: words split on `.`, `*` is exactly one
 * word, `#` zero or more words. */
export function topicMatches(pattern: string, topic: string): boolean {
  const p = pattern.split(".");
  const t = topic.split(".");
  // Iterative matcher with one backtrack point per `#` (bounded: O(|p|·|t|)).
  const memo = new Map<number, boolean>();
  const match = (i: number, j: number): boolean => {
    const key = i * (t.length + 1) + j;
    const known = memo.get(key);
    if (known !== undefined) return known;
    let result: boolean;
    if (i === p.length) result = j === t.length;
    else if (p[i] === "#") result = match(i + 1, j) || (j < t.length && match(i, j + 1));
    else result = j < t.length && (p[i] === "*" || p[i] === t[j]) && match(i + 1, j + 1);
    memo.set(key, result);
    return result;
  };
  return match(0, 0);
}

/** The refresh margin by default: min(30 s, 10 % of the remaining lifetime). */
export function defaultRefreshMargin(lifetimeMs: number): number {
  return Math.min(30_000, Math.max(0, lifetimeMs) / 10);
}

// ---------------------------------------------------------------------------------------
// The client

type Listener<K extends keyof ClientEvents> = (event: ClientEvents[K]) => void;

interface Pending {
  kind: "request" | "command" | "subscribe" | "unsubscribe" | "refresh" | "ping";
  traceId: string | undefined;
  resolve(frame: Record<string, unknown>): void;
  reject(error: Error): void;
}

interface Subscription {
  handlers: Set<EventHandler>;
  /** Invariant: true once the gateway confirmed it on the current connection. */
  confirmed: boolean;
  /** Callers of `subscribe` waiting for the confirmation. */
  waiters: Array<{ resolve(): void; reject(e: Error): void }>;
}

const OPEN = 1;
/** setTimeout's limit (2^31 − 1 ms): longer delays are chained. */
const MAX_TIMER_MS = 2_147_483_647;
/** A client close code for a connection given up locally (no hello in time). */
const CLIENT_GAVE_UP = 4000;

const defaultTimers: Timers = {
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (handle) => globalThis.clearTimeout(handle as ReturnType<typeof globalThis.setTimeout>),
  now: () => Date.now(),
};

function randomHex(bytes: number): string {
  const buf = new Uint8Array(bytes);
  const c = (globalThis as { crypto?: { getRandomValues?(a: Uint8Array): Uint8Array } }).crypto;
  if (c && typeof c.getRandomValues === "function") c.getRandomValues(buf);
  else for (let i = 0; i < bytes; i++) buf[i] = Math.floor(Math.random() * 256);
  let s = "";
  for (const b of buf) s += b.toString(16).padStart(2, "0");
  return s;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** A token must be a valid HTTP token (RFC 9110 tchar) to ride in `Sec-WebSocket-Protocol`. */
const TOKEN_CHARS = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

export class GatewayClient {
  private readonly opts: Required<
    Pick<
      ConnectOptions,
      | "url"
      | "getToken"
      | "auth"
      | "requestTimeout"
      | "connectTimeout"
      | "maxPendingRequests"
      | "reconnect"
      | "pingInterval"
      | "pongTimeout"
    >
  > &
    ConnectOptions;
  private readonly WS: WebSocketConstructor;
  private readonly timers: Timers;
  private readonly random: () => number;
  private readonly listeners = new Map<keyof ClientEvents, Set<(e: never) => void>>();

  private currentState: ConnectionState = "connecting";
  private hello: Hello | null = null;
  private ws: WebSocketLike | null = null;
  /** Incremented per attempt; callbacks of an older attempt check it and do nothing. */
  private generation = 0;
  private attempt = 0;
  private nextId = 0;
  private readonly pending = new Map<string, Pending>();
  /** Requests and commands among `pending` (what `maxPendingRequests` bounds). */
  private pendingCalls = 0;
  private readonly subscriptions = new Map<string, Subscription>();
  /** Every armed timer handle (cleared all at once on close) and, per `startTimer` token,
   * its current handle. */
  private readonly liveTimers = new Set<unknown>();
  private readonly timerHandles = new Map<unknown, unknown>();
  private closeInfo: { code: number; reason: string } = { code: 1000, reason: "" };
  private connectTimer: unknown = null;
  private reconnectTimer: unknown = null;
  private refreshTimer: unknown = null;
  private pingTimer: unknown = null;
  private lastExpiresAt: number | undefined;
  private firstConnect: { resolve(c: GatewayClient): void; reject(e: Error): void } | null = null;

  /** Use `connect()`. */
  constructor(options: ConnectOptions) {
    if (typeof options.url !== "string" || options.url === "") throw new TypeError("connect: `url` is required");
    if (typeof options.getToken !== "function") throw new TypeError("connect: `getToken` must be a function");
    const WS = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new TypeError("connect: no WebSocket constructor (pass `WebSocket`, e.g. the `ws` package's)");
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
      requestTimeout: options.requestTimeout ?? 35_000,
      connectTimeout: options.connectTimeout ?? 10_000,
      maxPendingRequests: options.maxPendingRequests ?? 1000,
      reconnect: options.reconnect ?? true,
      pingInterval: options.pingInterval ?? 25_000,
      pongTimeout: options.pongTimeout ?? 10_000,
    };
  }

  /** The current connection state. */
  get state(): ConnectionState {
    return this.currentState;
  }

  /** The hello of the current (or last) connection. */
  get session(): Hello | null {
    return this.hello;
  }

  /** When the gateway closes the session unless refreshed (seconds since the epoch). */
  get expiresAt(): number | undefined {
    return this.lastExpiresAt;
  }

  /** Subscribe to a connection event; returns the function that unsubscribes. */
  on<K extends keyof ClientEvents>(event: K, listener: Listener<K>): () => void {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(listener as (e: never) => void);
    return () => this.off(event, listener);
  }

  off<K extends keyof ClientEvents>(event: K, listener: Listener<K>): void {
    this.listeners.get(event)?.delete(listener as (e: never) => void);
  }

  /** Calls `service.method(**params)` and resolves with its result. */
  request<T = unknown>(service: string, method: string, params: Record<string, unknown> = {}, options: RequestOptions = {}): Promise<T> {
    return this.call("request", service, method, params, options).then((frame) => {
      const payload = frame.payload as Record<string, unknown>;
      return payload.result as T;
    });
  }

  /** Publishes a command (services never answer commands); resolves with its trace id
   * once the gateway has published it. */
  command(service: string, method: string, params: Record<string, unknown> = {}, options: RequestOptions = {}): Promise<string> {
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
  subscribe(pattern: string, handler: EventHandler): Promise<void> {
    if (this.currentState === "closed") return Promise.reject(this.closedError());
    if (typeof pattern !== "string" || pattern === "") return Promise.reject(new TypeError("subscribe: empty pattern"));
    if (typeof handler !== "function") return Promise.reject(new TypeError("subscribe: handler must be a function"));
    let sub = this.subscriptions.get(pattern);
    if (sub) {
      sub.handlers.add(handler);
      if (sub.confirmed) return Promise.resolve();
      const s = sub;
      return new Promise((resolve, reject) => s.waiters.push({ resolve, reject }));
    }
    sub = { handlers: new Set([handler]), confirmed: false, waiters: [] };
    this.subscriptions.set(pattern, sub);
    const s = sub;
    const promise = new Promise<void>((resolve, reject) => s.waiters.push({ resolve, reject }));
    if (this.currentState === "connected") this.sendSubscribe(pattern, s);
    return promise;
  }

  /** Drops every handler of `pattern` and tells the gateway. Resolves when the gateway
   * confirmed, or at once when disconnected (the next connection will not subscribe it). */
  unsubscribe(pattern: string): Promise<void> {
    const sub = this.subscriptions.get(pattern);
    if (!sub) return Promise.resolve();
    this.subscriptions.delete(pattern);
    for (const w of sub.waiters) w.reject(new GatewayClientError(`unsubscribed from ${pattern} before it was confirmed`));
    if (this.currentState !== "connected") return Promise.resolve();
    return this.send("unsubscribe", { topics: [pattern] }, this.opts.requestTimeout).then(
      () => undefined,
      (error: Error) => {
        // Lost with the connection: the next one does not subscribe the pattern, so it is gone.
        if (error instanceof DisconnectedError) return;
        throw error;
      },
    );
  }

  /** Sends a fresh token from `getToken()` now; resolves with the new `expires_at`.
   * The client also does this by itself before the token expires. */
  async refresh(): Promise<number> {
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
    if (!Number.isFinite(expiresAt)) throw new GatewayClientError("refreshed without expires_at");
    const previous = this.lastExpiresAt;
    this.lastExpiresAt = expiresAt;
    this.emit("refreshed", { expiresAt });
    // A refresh that does not extend the expiry is not repeated (getToken() returning the
    // same token would otherwise refresh in a tight loop).
    if (previous === undefined || expiresAt > previous) this.scheduleRefresh(expiresAt);
    else this.clearTimer("refreshTimer");
    return expiresAt;
  }

  /** A round trip to the gateway. */
  ping(options: { timeout?: number } = {}): Promise<void> {
    if (this.currentState !== "connected") {
      return Promise.reject(this.currentState === "closed" ? this.closedError() : new DisconnectedError(0, "not connected"));
    }
    return this.send("ping", undefined, options.timeout ?? this.opts.requestTimeout).then(() => undefined);
  }

  /** Closes the connection for good: no reconnect, every waiting call rejected with
   * `ClosedError`, every timer cleared. */
  close(): void {
    if (this.currentState === "closed") return;
    this.terminate(1000, "client closed");
  }

  // -------------------------------------------------------------------------------------
  // Connection

  /** Starts the first attempt; resolves after its hello. Called once, by `connect()`.
   * @internal */
  start(): Promise<GatewayClient> {
    return new Promise((resolve, reject) => {
      this.firstConnect = { resolve, reject };
      void this.openConnection();
    });
  }

  private async openConnection(): Promise<void> {
    const generation = ++this.generation;
    this.setState("connecting");
    this.emit("connecting", { attempt: this.attempt });
    // One deadline for getToken(), the upgrade and the hello.
    this.connectTimer = this.startTimer(() => {
      this.connectTimer = null;
      if (generation !== this.generation) return;
      this.connectionLost(CLIENT_GAVE_UP, "no hello within connectTimeout");
    }, this.opts.connectTimeout);

    let token: string;
    try {
      token = await this.opts.getToken();
      if (typeof token !== "string" || token === "") throw new GatewayClientError("getToken() returned no token");
      if (!TOKEN_CHARS.test(token)) throw new GatewayClientError("getToken() returned a token with characters a JWT cannot hold");
    } catch (e) {
      if (generation !== this.generation) return;
      this.attemptFailed(0, "getToken() failed", e);
      return;
    }
    if (generation !== this.generation) return;

    const protocols =
      this.opts.auth === "subprotocol" ? [SUBPROTOCOL, TOKEN_SUBPROTOCOL_PREFIX + token] : [SUBPROTOCOL];
    let ws: WebSocketLike;
    try {
      ws = new this.WS(this.opts.url, protocols);
    } catch (e) {
      this.attemptFailed(0, "cannot open the WebSocket", e);
      return;
    }
    this.ws = ws;
    try {
      ws.binaryType = "arraybuffer";
    } catch {
      // Read-only in some implementations; binary frames are ignored anyway.
    }
    ws.onopen = () => {
      if (generation !== this.generation) return;
      if (this.opts.auth === "first-frame") this.sendRaw({ type: "auth", payload: { token } });
    };
    ws.onmessage = (ev: { data: unknown }) => {
      if (generation !== this.generation) return;
      this.onFrame(ev.data);
    };
    ws.onerror = () => {
      // Followed by a close event, which is where the failure is handled.
    };
    ws.onclose = (ev: { code?: number; reason?: string }) => {
      if (generation !== this.generation) return;
      this.connectionLost(typeof ev.code === "number" ? ev.code : 1006, typeof ev.reason === "string" ? ev.reason : "");
    };
  }

  private onFrame(data: unknown): void {
    if (typeof data !== "string") {
      this.emit("error", { error: new GatewayClientError("ignored a binary frame (this client speaks JSON)") });
      return;
    }
    let frame: unknown;
    try {
      frame = JSON.parse(data);
    } catch (e) {
      this.emit("error", { error: new GatewayClientError("ignored a frame that is not JSON", { cause: e }) });
      return;
    }
    if (!isObject(frame)) return;
    const type = frame.type;
    if (this.currentState === "connecting") {
      // Before the hello nothing else is expected; anything else is ignored.
      if (type === "event" && isObject(frame.payload) && frame.payload.topic === "hello" && isObject(frame.payload.event)) {
        this.onHello(frame.payload.event as Hello);
      }
      return;
    }
    if (type === "event") {
      if (!isObject(frame.payload) || typeof frame.payload.topic !== "string") return;
      this.dispatchEvent(frame.payload.topic, frame.payload.event);
      return;
    }
    const pending = this.findPending(frame);
    if (type === undefined && typeof frame.error === "string") {
      const error = new NuropbError(frame as NuropbErrorObject, pending?.traceId);
      if (pending) this.settle(pending, frame, error);
      else this.emit("error", { error });
      return;
    }
    if (!pending) return; // An answer to a call that timed out or was aborted.
    if (type === "response" && isObject(frame.payload) && isObject(frame.payload.error)) {
      this.settle(pending, frame, new NuropbError(frame.payload.error as NuropbErrorObject, pending.traceId));
      return;
    }
    this.settle(pending, frame, null);
  }

  /** The call an answer belongs to: by `id`; for responses of a gateway that does not
   * echo ids yet, by `trace_id` (every call sends a unique one). */
  private findPending(frame: Record<string, unknown>): Pending | undefined {
    if (typeof frame.id === "string") {
      const p = this.pending.get(frame.id);
      if (p) return p;
    }
    if ((frame.type === "response" || frame.type === "accepted") && isObject(frame.payload)) {
      const traceId = frame.payload.trace_id;
      if (typeof traceId === "string") {
        for (const p of this.pending.values()) if (p.traceId === traceId) return p;
      }
    }
    return undefined;
  }

  private settle(pending: Pending, frame: Record<string, unknown>, error: Error | null): void {
    if (error) pending.reject(error);
    else pending.resolve(frame);
  }

  private onHello(hello: Hello): void {
    this.clearTimer("connectTimer");
    this.hello = hello;
    this.attempt = 0;
    this.setState("connected");
    const expiresAt = typeof hello.expires_at === "number" && Number.isFinite(hello.expires_at) ? hello.expires_at : undefined;
    this.lastExpiresAt = expiresAt;
    if (expiresAt !== undefined) this.scheduleRefresh(expiresAt);
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
  private resubscribe(): void {
    const subs = [...this.subscriptions];
    for (const [, sub] of subs) sub.confirmed = false;
    if (subs.length === 0) return;
    if (subs.length === 1) {
      const [pattern, sub] = subs[0] as [string, Subscription];
      this.sendSubscribe(pattern, sub);
      return;
    }
    const generation = this.generation;
    this.send("subscribe", { topics: subs.map(([pattern]) => pattern) }, this.opts.requestTimeout).then(
      () => {
        for (const [pattern, sub] of subs) {
          if (this.subscriptions.get(pattern) !== sub) continue;
          sub.confirmed = true;
          for (const w of sub.waiters.splice(0)) w.resolve();
        }
      },
      (error: Error) => {
        if (error instanceof DisconnectedError || generation !== this.generation) return;
        for (const [pattern, sub] of subs) if (this.subscriptions.get(pattern) === sub) this.sendSubscribe(pattern, sub);
      },
    );
  }

  private sendSubscribe(pattern: string, sub: Subscription): void {
    this.send("subscribe", { topics: [pattern] }, this.opts.requestTimeout).then(
      () => {
        if (this.subscriptions.get(pattern) !== sub) return;
        sub.confirmed = true;
        const waiters = sub.waiters.splice(0);
        for (const w of waiters) w.resolve();
      },
      (error: Error) => {
        if (this.subscriptions.get(pattern) !== sub) return;
        // Lost with the connection: the next connection subscribes again; the waiters wait.
        if (error instanceof DisconnectedError) return;
        this.subscriptions.delete(pattern);
        const waiters = sub.waiters.splice(0);
        if (waiters.length === 0) this.emit("error", { error });
        for (const w of waiters) w.reject(error);
      },
    );
  }

  private dispatchEvent(topic: string, event: unknown): void {
    this.emit("event", { topic, event });
    for (const [pattern, sub] of this.subscriptions) {
      if (!topicMatches(pattern, topic)) continue;
      for (const handler of [...sub.handlers]) {
        try {
          handler(event, topic);
        } catch (e) {
          rethrowLater(e);
        }
      }
    }
  }

  private scheduleRefresh(expiresAt: number): void {
    this.clearTimer("refreshTimer");
    const now = this.timers.now();
    const expiresMs = expiresAt * 1000;
    const margin = (this.opts.refreshMargin ?? defaultRefreshMargin)(expiresMs - now);
    const generation = this.generation;
    this.refreshTimer = this.startTimer(() => {
      this.refreshTimer = null;
      if (generation !== this.generation || this.currentState !== "connected") return;
      this.refresh().catch((error: Error) => {
        if (generation !== this.generation || this.currentState !== "connected") return;
        this.emit("error", { error: new GatewayClientError("token refresh failed", { cause: error }) });
        // Try again while the session lasts: halfway to the expiry, at most in 5 s.
        const left = expiresMs - this.timers.now();
        if (left > 1000) {
          this.refreshTimer = this.startTimer(() => {
            this.refreshTimer = null;
            if (generation === this.generation && this.currentState === "connected") this.scheduleRefresh(expiresAt);
          }, Math.min(5000, left / 2));
        }
      });
    }, Math.max(0, expiresMs - margin - now));
  }

  /** Keep-alive: a `ping` every `pingInterval`; no answer within `pongTimeout` means the
   * connection is dead. Any answer counts, an error frame too (e.g. `RateLimited`). */
  private schedulePing(): void {
    this.clearTimer("pingTimer");
    const interval = this.opts.pingInterval;
    if (!(interval > 0) || !Number.isFinite(interval)) return;
    const generation = this.generation;
    this.pingTimer = this.startTimer(() => {
      this.pingTimer = null;
      if (generation !== this.generation || this.currentState !== "connected") return;
      this.send("ping", undefined, this.opts.pongTimeout).then(
        () => this.schedulePing(),
        (error: Error) => {
          if (generation !== this.generation || this.currentState !== "connected") return;
          if (error instanceof RequestTimeoutError) {
            this.connectionLost(CLIENT_GAVE_UP, `no pong within ${this.opts.pongTimeout} ms`);
          } else {
            this.schedulePing();
          }
        },
      );
    }, interval);
  }

  /** The socket of the current attempt closed (or was given up). */
  private connectionLost(code: number, reason: string): void {
    const ws = this.ws;
    this.detachSocket();
    if (ws && ws.readyState <= OPEN) {
      try {
        ws.close(CLIENT_GAVE_UP, reason.slice(0, 100));
      } catch {
        // Closing a socket that is still connecting may throw in some implementations.
      }
    }
    this.attemptFailed(code, reason, undefined);
  }

  /** Decides what happens after an attempt or a connection ended. */
  private attemptFailed(code: number, reason: string, cause: unknown): void {
    this.generation++;
    this.detachSocket();
    this.clearTimer("connectTimer");
    this.clearTimer("refreshTimer");
    this.clearTimer("pingTimer");
    this.rejectPending(new DisconnectedError(code, reason));
    if (cause !== undefined) {
      this.emit("error", { error: cause instanceof Error ? cause : new GatewayClientError(String(cause)) });
    }
    const connectError = (): ConnectError =>
      new ConnectError(code, reason, cause === undefined ? undefined : { cause });
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
      if (this.currentState !== "disconnected") return;
      void this.openConnection();
    }, delay);
  }

  /** Ends the client for good. */
  private terminate(code: number, reason: string, error?: Error): void {
    this.generation++;
    const ws = this.ws;
    this.detachSocket();
    if (ws && ws.readyState <= OPEN) {
      try {
        ws.close(1000, "client closed");
      } catch {
        // See connectionLost.
      }
    }
    for (const t of [...this.liveTimers]) this.timers.clearTimeout(t);
    this.liveTimers.clear();
    this.connectTimer = this.reconnectTimer = this.refreshTimer = this.pingTimer = null;
    this.setState("closed");
    this.closeInfo = { code, reason };
    const closed = error ?? new ClosedError(code, reason);
    this.rejectPending(closed);
    for (const sub of this.subscriptions.values()) for (const w of sub.waiters.splice(0)) w.reject(closed);
    this.emit("closed", { code, reason });
    const first = this.firstConnect;
    this.firstConnect = null;
    first?.reject(closed);
  }

  private closedError(): ClosedError {
    return new ClosedError(this.closeInfo.code, this.closeInfo.reason);
  }

  private detachSocket(): void {
    const ws = this.ws;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = null;
    // Keep a no-op error handler: some implementations throw on an unhandled error event.
    ws.onerror = () => undefined;
    this.ws = null;
  }

  private rejectPending(error: Error): void {
    const all = [...this.pending.values()];
    for (const p of all) {
      p.reject(error instanceof DisconnectedError && p.traceId ? new DisconnectedError(error.code, error.reason, p.traceId) : error);
    }
  }

  private setState(state: ConnectionState): void {
    this.currentState = state;
  }

  // -------------------------------------------------------------------------------------
  // Frames

  private call(
    kind: "request" | "command",
    service: string,
    method: string,
    params: Record<string, unknown>,
    options: RequestOptions,
  ): Promise<Record<string, unknown>> {
    if (typeof service !== "string" || service === "" || typeof method !== "string" || method === "") {
      return Promise.reject(new TypeError(`${kind}: service and method must be non-empty strings`));
    }
    if (!isObject(params)) return Promise.reject(new TypeError(`${kind}: params must be an object`));
    const traceId = options.traceId ?? randomHex(16);
    if (options.signal?.aborted) return Promise.reject(new RequestAbortedError(options.signal.reason, traceId));
    if (this.currentState === "closed") return Promise.reject(this.closedError());
    if (this.currentState !== "connected") return Promise.reject(new DisconnectedError(0, "not connected", traceId));
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
  private send(
    kind: Pending["kind"],
    payload: Record<string, unknown> | undefined,
    timeout: number,
    extra: { traceId?: string; signal?: AbortSignal | undefined } = {},
  ): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      const id = String(++this.nextId);
      const { traceId, signal } = extra;
      let timer: unknown = null;
      const onAbort = (): void => done(new RequestAbortedError(signal?.reason, traceId), null);
      const done = (error: Error | null, frame: Record<string, unknown> | null): void => {
        if (!this.pending.delete(id)) return;
        if (timer !== null) this.stopTimer(timer);
        signal?.removeEventListener("abort", onAbort);
        if (error) reject(error);
        else resolve(frame as Record<string, unknown>);
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
      const frame: Record<string, unknown> = { type: kind, id };
      if (payload !== undefined) frame.payload = payload;
      try {
        this.sendRaw(frame);
      } catch (e) {
        done(e instanceof Error ? e : new GatewayClientError(String(e)), null);
      }
    });
  }

  private sendRaw(frame: Record<string, unknown>): void {
    const ws = this.ws;
    if (!ws || ws.readyState !== OPEN) throw new DisconnectedError(0, "not connected");
    ws.send(JSON.stringify(frame));
  }

  // -------------------------------------------------------------------------------------
  // Timers and events

  /** setTimeout that tracks its handle (all are cleared on close) and chains delays
   * beyond setTimeout's 2^31 − 1 ms limit. Returns a token for `stopTimer`. */
  private startTimer(fn: () => void, ms: number): unknown {
    const token = {};
    const due = this.timers.now() + ms;
    const arm = (delay: number): void => {
      const handle = this.timers.setTimeout(
        () => {
          this.liveTimers.delete(handle);
          this.timerHandles.delete(token);
          const left = due - this.timers.now();
          if (left > 0 && delay === MAX_TIMER_MS) arm(Math.min(left, MAX_TIMER_MS));
          else fn();
        },
        Math.min(Math.max(0, delay), MAX_TIMER_MS),
      );
      this.liveTimers.add(handle);
      this.timerHandles.set(token, handle);
    };
    arm(ms);
    return token;
  }

  private stopTimer(token: unknown): void {
    const handle = this.timerHandles.get(token);
    if (handle === undefined) return;
    this.timerHandles.delete(token);
    this.liveTimers.delete(handle);
    this.timers.clearTimeout(handle);
  }

  private clearTimer(field: "connectTimer" | "reconnectTimer" | "refreshTimer" | "pingTimer"): void {
    const token = this[field];
    if (token !== null) this.stopTimer(token);
    this[field] = null;
  }

  private emit<K extends keyof ClientEvents>(event: K, value: ClientEvents[K]): void {
    const set = this.listeners.get(event);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        (listener as Listener<K>)(value);
      } catch (e) {
        rethrowLater(e);
      }
    }
  }
}

/** A throwing handler must not break the client's dispatch: its error is rethrown from a
 * fresh task, where the host reports it as uncaught (the browser console, Node's
 * `uncaughtException`). */
function rethrowLater(e: unknown): void {
  globalThis.setTimeout(() => {
    throw e;
  }, 0);
}

/** Connects to the gateway; resolves after the hello with a client that reconnects by
 * itself. Rejects with `ConnectError` when the first attempt fails (unless
 * `retryFirstConnect`). */
export function connect(options: ConnectOptions): Promise<GatewayClient> {
  let client: GatewayClient;
  try {
    client = new GatewayClient(options);
  } catch (e) {
    return Promise.reject(e);
  }
  return client.start();
}
