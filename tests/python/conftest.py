"""Fixtures for the interop suite.

The session starts one gateway (the binary under test) and then one real nuropb service,
both on the AMQP vhost given by the environment (`cargo xtask interop` creates a fresh one).
After every test, a health check asserts both processes are alive and that an echo
round trip through the gateway to the Python service still works; a dead process is
restarted before the next test, so one failure does not cascade. When a test fails, the
part of each process log written during that test is attached to its report.

Environment:
- NUROPB_INTEROP_AMQP_URL      amqp://guest:guest@127.0.0.1:5672/<vhost>
- NUROPB_INTEROP_GATEWAY_BIN   path of the nuropb-gateway binary
- NUROPB_INTEROP_JWT_SECRET    HS256 secret shared by the gateway, the service and the tests
- NUROPB_INTEROP_LOG_DIR       where process logs go (default: a temporary directory)
"""

import logging
import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from interop_helpers import ManagedProcess, MeshClient, WsClient, env_required, make_token, run, unique

HERE = Path(__file__).resolve().parent

SERVICE = "interop-svc"
GATEWAY = "interop-gw"
# Events on these topics reach the gateway's queue; the service binds interop.to-service.#.
GATEWAY_EVENT_BINDINGS = "interop.#"
BROADCAST_TOPICS = "interop.broadcast.#"
SUBSCRIBABLE_TOPICS = "interop.sub.#,interop.users.{user_id}.#"
ALLOWED_ORIGIN = "https://app.example.com"
REQUEST_TIMEOUT_MS = 5000

LISTENING_RE = r"nuropb-gateway listening on ws://127\.0\.0\.1:(\d+)/"

# Every managed process, so failing tests can show their logs.
_PROCESSES: List[ManagedProcess] = []

for noisy in ("pika", "nuropb", "websockets", "asyncio"):
    logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass
class InteropConfig:
    amqp_url: str
    gateway_bin: str
    jwt_secret: str
    log_dir: Path


@pytest.fixture(scope="session")
def config() -> InteropConfig:
    log_dir_env = os.environ.get("NUROPB_INTEROP_LOG_DIR")
    log_dir = Path(log_dir_env) if log_dir_env else Path(tempfile.mkdtemp(prefix="nuropb-interop-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    return InteropConfig(
        amqp_url=env_required("NUROPB_INTEROP_AMQP_URL"),
        gateway_bin=env_required("NUROPB_INTEROP_GATEWAY_BIN"),
        jwt_secret=env_required("NUROPB_INTEROP_JWT_SECRET"),
        log_dir=log_dir,
    )


class Gateway:
    """A running gateway process and how to reach it."""

    def __init__(self, process: ManagedProcess, service_name: str) -> None:
        self.process = process
        self.service_name = service_name
        argv = process.argv
        # Names the gateway's AMQP connection (`<service_name>/<instance_id>`) and queues.
        self.instance_id: Optional[str] = argv[argv.index("--instance-id") + 1] if "--instance-id" in argv else None

    @property
    def port(self) -> int:
        assert self.process.ready_match is not None
        return int(self.process.ready_match.group(1))

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def ensure_running(self) -> None:
        if not self.process.alive():
            self.process.start()


def gateway_argv(cfg: InteropConfig, service_name: str, **overrides: str) -> List[str]:
    flags: Dict[str, str] = {
        "--listen": "127.0.0.1:0",
        "--amqp-url": cfg.amqp_url,
        "--jwt-secret": cfg.jwt_secret,
        "--service-name": service_name,
        "--instance-id": uuid.uuid4().hex,
        "--event-bindings": GATEWAY_EVENT_BINDINGS,
        "--broadcast-topics": BROADCAST_TOPICS,
        "--subscribable-topics": SUBSCRIBABLE_TOPICS,
        "--request-timeout-ms": str(REQUEST_TIMEOUT_MS),
        "--allowed-origins": ALLOWED_ORIGIN,
    }
    flags.update(overrides)
    argv = [cfg.gateway_bin]
    for flag, value in flags.items():
        argv += [flag, value]
    return argv


def start_gateway(cfg: InteropConfig, name: str, argv: List[str], env: Optional[Dict[str, str]] = None) -> ManagedProcess:
    # Plain-text logs: they end up in files and test reports.
    env = {**(os.environ if env is None else env), "NO_COLOR": "1"}
    process = ManagedProcess(name, argv, cfg.log_dir / f"{name}.log", LISTENING_RE, env=env)
    _PROCESSES.append(process)
    return process.start()


def start_extra_gateway(cfg: InteropConfig, name: str, service_name: str, **flags: str) -> Gateway:
    """Another gateway process on the suite's vhost (logged as `<name>.log`). `flags` override
    or add command-line flags, keyed by the flag itself: `**{"--reconnect-max-ms": "1000"}`.
    The caller stops it (`gateway.process.stop()`)."""
    process = start_gateway(cfg, name, gateway_argv(cfg, service_name, **flags))
    return Gateway(process, service_name)


@pytest.fixture(scope="session")
def gateway(config: InteropConfig):
    # Started first: it declares the nuropb exchanges the service binds to.
    process = start_gateway(config, "gateway", gateway_argv(config, GATEWAY))
    gw = Gateway(process, GATEWAY)
    yield gw
    process.stop()


def service_process(cfg: InteropConfig, name: str, service_name: str, *extra_args: str) -> ManagedProcess:
    """An interop service process (not started yet), logged as `<name>.log`."""
    process = ManagedProcess(
        name,
        [
            sys.executable,
            str(HERE / "interop_service.py"),
            "--amqp-url",
            cfg.amqp_url,
            "--service-name",
            service_name,
            "--jwt-secret",
            cfg.jwt_secret,
            *extra_args,
        ],
        cfg.log_dir / f"{name}.log",
        r"interop-service ready",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    _PROCESSES.append(process)
    return process


def start_extra_service(cfg: InteropConfig, name: str, service_name: str) -> ManagedProcess:
    """Another interop service process under its own service name, without event bindings
    (logged as `<name>.log`). Each start generates a new RSA key, as the suite's service does.
    The caller stops it (`process.stop()`)."""
    return service_process(cfg, name, service_name, "--event-bindings", "").start()


def gateway_has_flag(cfg: InteropConfig, flag: str) -> bool:
    """Whether the gateway binary under test knows `flag` (from its `--help`)."""
    done = subprocess.run([cfg.gateway_bin, "--help"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    return flag in done.stdout


@pytest.fixture(scope="session")
def service(config: InteropConfig, gateway: Gateway):
    process = service_process(config, "service", SERVICE)
    process.start()
    yield process
    process.stop()


class Tokens:
    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __call__(self, user_id: str, **kw) -> str:
        return make_token(self.secret, user_id, **kw)


@pytest.fixture(scope="session")
def tokens(config: InteropConfig) -> Tokens:
    return Tokens(config.jwt_secret)


class Mesh:
    """What a test needs: the gateway, the service name, tokens and the AMQP URL."""

    def __init__(self, cfg: InteropConfig, gw: Gateway, tokens: Tokens) -> None:
        self.cfg = cfg
        self.gateway = gw
        self.tokens = tokens
        self.service = SERVICE

    async def connect(self, user_id: str, label: Optional[str] = None, gateway: Optional[Gateway] = None, **kw) -> WsClient:
        """A session of `user_id` on `gateway` (default: the suite's gateway)."""
        gw = gateway or self.gateway
        return await WsClient.open(gw.url, self.tokens(user_id), label=label or user_id, **kw)

    async def three_sessions(self, gateway: Optional[Gateway] = None):
        """Two sessions of one user (alice) and one of another (bob), on `gateway`:
        (alice_id, bob_id, alice1, alice2, bob)."""
        alice_id, bob_id = unique("alice"), unique("bob")
        alice1 = await self.connect(alice_id, label="alice#1", gateway=gateway)
        alice2 = await self.connect(alice_id, label="alice#2", gateway=gateway)
        bob = await self.connect(bob_id, label="bob", gateway=gateway)
        assert alice1.hello.session_id != alice2.hello.session_id
        assert alice1.hello.user_id == alice_id and bob.hello.user_id == bob_id
        return alice_id, bob_id, alice1, alice2, bob

    def mesh_client(self) -> MeshClient:
        return MeshClient(self.cfg.amqp_url)


@pytest.fixture
def mesh(config: InteropConfig, gateway: Gateway, service: ManagedProcess, tokens: Tokens):
    """The running gateway + service. After the test, both must still be alive and the
    service must answer an echo through the gateway."""
    gateway.ensure_running()
    if not service.alive():
        service.start()
    yield Mesh(config, gateway, tokens)
    problems = []
    if not gateway.process.alive():
        problems.append(f"the gateway exited with {gateway.process.proc.returncode}")
    if not service.alive():
        problems.append(f"the Python service exited with {service.proc.returncode}")
    if not problems:
        problems.extend(echo_problems(gateway, tokens, "echo round trip after the test"))
    if problems:
        pytest.fail("health check after the test: " + "; ".join(problems), pytrace=False)


def echo_problems(gateway: Gateway, tokens: Tokens, what: str) -> List[str]:
    """The after-test health check of one gateway: empty when an echo through it works,
    else why `what` failed."""
    try:
        run(echo_round_trip(gateway, tokens), timeout=15)
    except Exception as err:
        return [f"{what} failed: {err}"]
    return []


async def echo_round_trip(gateway: Gateway, tokens: Tokens) -> None:
    """One session on `gateway`, one echo through it to the Python service."""
    client = await WsClient.open(gateway.url, tokens(unique("health")), label="health")
    try:
        marker = unique("alive")
        result = await client.call_ok(SERVICE, "echo", {"marker": marker})
        assert result == {"marker": marker}, result
    finally:
        await client.close()


# --- reporting -----------------------------------------------------------------------------


def pytest_runtest_setup(item: pytest.Item) -> None:
    item._log_offsets = {id(p): p.log_size() for p in _PROCESSES}  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        offsets = getattr(item, "_log_offsets", {})
        for p in _PROCESSES:
            text = p.tail(offsets.get(id(p), 0), lines=80)
            if text.strip():
                report.sections.append((f"{p.name} log ({p.log_path})", text))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _PROCESSES:
        terminalreporter.write_line(f"interop process logs: {_PROCESSES[0].log_path.parent}")
