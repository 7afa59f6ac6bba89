//! `cargo xtask interop`: real Python nuropb 0.1.8 services against the gateway binary.
//!
//! Steps, each bounded in time: make sure RabbitMQ runs; create (or reuse) a Python venv
//! with the pinned packages of `tests/python/requirements.txt` under
//! `<target>/interop-venv`; build the gateway (debug); create a throwaway vhost; run pytest
//! on `tests/python/`. The pytest session starts and stops the gateway and the Python
//! service itself (see `tests/python/conftest.py`), so each test reports its own logs.
//!
//! Knobs (environment):
//! - `NUROPB_INTEROP_GATEWAY_BIN`: test this binary instead of building `nuropb-gateway`;
//! - `NUROPB_INTEROP_PYTHON`: the interpreter for the venv (default: the first of
//!   `python3.11`, `python3.10`, `python3` that nuropb 0.1.8 supports, i.e. 3.9–3.11);
//! - `NUROPB_INTEROP_PYTEST_ARGS`: extra pytest arguments, split on whitespace
//!   (e.g. `-k encrypted -x`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::broker::{self, TempVhost};

/// Creating the venv and installing the pinned packages (a cold pip cache downloads ~20 MB).
const VENV_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The whole pytest session (it takes well under a minute when the gateway behaves).
const PYTEST_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// After the session deadline, how long pytest gets to stop its processes after SIGINT.
const PYTEST_GRACE: Duration = Duration::from_secs(20);

/// Python versions nuropb 0.1.8 declares support for (`>=3.9,<3.12`).
const PYTHON_CANDIDATES: &[&str] = &["python3.11", "python3.10", "python3.9", "python3"];
const PYTHON_VERSION_CHECK: &str =
    "import sys; sys.exit(0 if (3, 9) <= sys.version_info[:2] < (3, 12) else 1)";

pub fn run(root: &Path) -> Result<()> {
    broker::ensure_running()?;
    let target = crate::suite::target_dir(root);
    let suite = root.join("tests").join("python");
    let python = ensure_venv(&target.join("interop-venv"), &suite.join("requirements.txt"))?;
    let gateway = match std::env::var_os("NUROPB_INTEROP_GATEWAY_BIN") {
        Some(bin) => {
            let bin = root.join(bin);
            eprintln!("interop: testing {} (NUROPB_INTEROP_GATEWAY_BIN)", bin.display());
            bin
        }
        None => crate::suite::build_gateway(root, false)?,
    };
    if !gateway.is_file() {
        bail!("gateway binary {} does not exist", gateway.display());
    }

    let vhost = TempVhost::create("interop")?;
    let log_dir = target.join("interop-logs");
    if log_dir.exists() {
        fs::remove_dir_all(&log_dir)
            .with_context(|| format!("cannot clear {}", log_dir.display()))?;
    }
    fs::create_dir_all(&log_dir).with_context(|| format!("cannot create {}", log_dir.display()))?;

    let mut pytest = Command::new(&python);
    pytest
        .current_dir(root)
        .args(["-m", "pytest"])
        .arg(&suite)
        .env("NUROPB_INTEROP_AMQP_URL", vhost.amqp_url())
        .env("NUROPB_INTEROP_GATEWAY_BIN", &gateway)
        .env("NUROPB_INTEROP_JWT_SECRET", broker::random_hex(32)?)
        .env("NUROPB_INTEROP_LOG_DIR", &log_dir)
        // Keep the source tree free of __pycache__ and make child logs appear promptly.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1");
    // The gateway reads NUROPB_* variables for every option the suite does not pass as a
    // flag; settings from the caller's shell must not change what is being tested.
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        if key_str.starts_with("NUROPB_") && !key_str.starts_with("NUROPB_INTEROP_") {
            pytest.env_remove(&key);
        }
    }
    if let Ok(extra) = std::env::var("NUROPB_INTEROP_PYTEST_ARGS") {
        pytest.args(extra.split_whitespace());
    }
    let status = broker::status_bounded(&mut pytest, PYTEST_TIMEOUT, Some(PYTEST_GRACE))?;
    match status.code() {
        Some(0) => {
            eprintln!("interop: all tests passed (vhost {})", vhost.name());
            Ok(())
        }
        // Exit code 5: nothing was collected, which must not pass for a green run.
        Some(5) => bail!("interop: pytest collected no tests in {}", suite.display()),
        _ => bail!("interop: pytest failed ({status}); process logs in {}", log_dir.display()),
    }
}

/// Returns the venv's python, (re)creating the venv unless it was made from exactly this
/// requirements file and still imports nuropb.
fn ensure_venv(venv: &Path, requirements: &Path) -> Result<PathBuf> {
    let wanted = fs::read_to_string(requirements)
        .with_context(|| format!("cannot read {}", requirements.display()))?;
    let python = venv.join("bin").join("python");
    let stamp = venv.join("interop-requirements.txt");
    let stamp_matches = fs::read_to_string(&stamp).is_ok_and(|s| s == wanted);
    if stamp_matches && imports_nuropb(&python) {
        return Ok(python);
    }

    eprintln!("interop: creating the Python venv {}", venv.display());
    if venv.exists() {
        fs::remove_dir_all(venv).with_context(|| format!("cannot remove {}", venv.display()))?;
    }
    let base = base_python()?;
    let status = broker::status_bounded(
        Command::new(&base).args(["-m", "venv"]).arg(venv),
        VENV_TIMEOUT,
        None,
    )?;
    if !status.success() {
        bail!("`{base} -m venv` failed with {status} (on Debian: apt-get install python3-venv)");
    }
    let status = broker::status_bounded(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
                "-r",
            ])
            .arg(requirements),
        VENV_TIMEOUT,
        None,
    )?;
    if !status.success() {
        bail!("installing {} failed with {status}", requirements.display());
    }
    // Written last: an interrupted install is retried from scratch next time.
    fs::write(&stamp, wanted).with_context(|| format!("cannot write {}", stamp.display()))?;
    Ok(python)
}

fn imports_nuropb(python: &Path) -> bool {
    broker::output_bounded(
        Command::new(python).args(["-c", "import nuropb.rmq_api, websockets, jwt, pytest"]),
        Duration::from_secs(60),
    )
    .is_ok_and(|out| out.status.success())
}

/// The interpreter to build the venv from: `NUROPB_INTEROP_PYTHON`, or the first candidate
/// whose version nuropb 0.1.8 accepts.
fn base_python() -> Result<String> {
    if let Ok(python) = std::env::var("NUROPB_INTEROP_PYTHON") {
        return Ok(python);
    }
    for candidate in PYTHON_CANDIDATES {
        let ok = broker::output_bounded(
            Command::new(candidate).args(["-c", PYTHON_VERSION_CHECK]),
            Duration::from_secs(30),
        )
        .is_ok_and(|out| out.status.success());
        if ok {
            return Ok((*candidate).to_owned());
        }
    }
    bail!(
        "no Python 3.9–3.11 found (tried {}); nuropb 0.1.8 needs one. Install one or set \
         NUROPB_INTEROP_PYTHON",
        PYTHON_CANDIDATES.join(", ")
    )
}
