// Compiled with `tsc --noEmit` by `npm test`: what a TypeScript user writes against the
// published declarations type-checks, with the browser's WebSocket and with the `ws` package's.
import WS from "ws";
import {
  connect,
  NuropbError,
  type ConnectOptions,
  type GatewayClient,
  type WebSocketConstructor,
} from "../dist/nuropb-gateway.js";

const browserWs: WebSocketConstructor = WebSocket;
const nodeWs: WebSocketConstructor = WS;

export async function example(getToken: () => Promise<string>): Promise<number> {
  const options: ConnectOptions = { url: "ws://127.0.0.1:1/ws", getToken, WebSocket: nodeWs, auth: "first-frame" };
  const client: GatewayClient = await connect(options);
  const off = client.on("disconnected", ({ code, reason, delay }) => void [code.toFixed(), reason.trim(), delay.toFixed()]);
  off();
  client.on("closed", (e) => void e.code);
  await client.subscribe("demo.*", (event: unknown, topic: string) => void [event, topic]);
  const ac = new AbortController();
  try {
    return await client.request<number>("demo", "add", { a: 1, b: 2 }, { timeout: 1000, signal: ac.signal });
  } catch (e) {
    if (e instanceof NuropbError) return e.error.length + e.description.length + (e.traceId ?? "").length;
    throw e;
  } finally {
    client.close();
    void browserWs;
  }
}
