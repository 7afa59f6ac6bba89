//! The crate graph rules of docs/ARCHITECTURE.md, checked on the graph `cargo metadata`
//! resolves (normal dependencies only, transitively).
//!
//! `cargo metadata` fetches what it needs on a cold cache (the earlier `cargo tree` call was
//! told not to use the network, and failed on a fresh machine before anything was
//! downloaded), and its JSON graph is read here rather than matched against a tool's
//! human-readable messages.

use std::collections::{BTreeSet, HashMap};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::cmd::cargo;

/// (crate, dependency it must never have, directly or transitively, as a normal dependency).
pub const FORBIDDEN: &[(&str, &str)] = &[
    ("nuropb-wire", "tokio"),
    ("nuropb-wire", "lapin"),
    ("nuropb-wire", "tokio-tungstenite"),
    ("nuropb-wire", "handler-core"),
    ("mesh-crypto", "tokio"),
    ("mesh-crypto", "lapin"),
    ("handler-core", "lapin"),
    ("handler-core", "tokio-tungstenite"),
    ("handler-core", "tungstenite"),
    ("handler-core", "amqp-mesh"),
    ("handler-core", "ws-adapter"),
    ("ws-adapter", "lapin"),
    ("ws-adapter", "amqp-mesh"),
    ("amqp-mesh", "tokio-tungstenite"),
    ("amqp-mesh", "tungstenite"),
    ("amqp-mesh", "ws-adapter"),
    ("ops-http", "lapin"),
    ("ops-http", "tokio-tungstenite"),
    ("ops-http", "tungstenite"),
    ("ops-http", "amqp-mesh"),
    ("ops-http", "handler-core"),
    ("ops-http", "ws-adapter"),
    // Test support is for tests only: a dev-dependency, never a normal one.
    ("nuropb-wire", "nuropb-testkit"),
    ("mesh-crypto", "nuropb-testkit"),
    ("handler-core", "nuropb-testkit"),
    ("ws-adapter", "nuropb-testkit"),
    ("amqp-mesh", "nuropb-testkit"),
    ("ops-http", "nuropb-testkit"),
    ("nuropb-gateway", "nuropb-testkit"),
    // The examples use the library crates as a project outside the workspace would: only
    // their public APIs, never test support or the binary; and nothing depends on them.
    ("nuropb-gateway-examples", "nuropb-testkit"),
    ("nuropb-gateway-examples", "nuropb-gateway"),
    ("nuropb-gateway-examples", "e2e-tests"),
    ("nuropb-wire", "nuropb-gateway-examples"),
    ("mesh-crypto", "nuropb-gateway-examples"),
    ("handler-core", "nuropb-gateway-examples"),
    ("ws-adapter", "nuropb-gateway-examples"),
    ("amqp-mesh", "nuropb-gateway-examples"),
    ("ops-http", "nuropb-gateway-examples"),
    ("nuropb-gateway", "nuropb-gateway-examples"),
];

/// (crate, tokio feature it must not ask for): the core reaches no sockets, files,
/// processes or signals, whatever other crates of a build switch on.
pub const FORBIDDEN_TOKIO_FEATURES: &[(&str, &str)] = &[
    ("handler-core", "net"),
    ("handler-core", "io-util"),
    ("handler-core", "fs"),
    ("handler-core", "process"),
    ("handler-core", "signal"),
    ("handler-core", "full"),
];

/// Checks the workspace's real graph against [`FORBIDDEN`] and
/// [`FORBIDDEN_TOKIO_FEATURES`].
pub fn check() -> Result<()> {
    let graph = workspace_graph()?;
    let mut found = violations(&graph, FORBIDDEN)?;
    found.extend(feature_violations(&graph, "tokio", FORBIDDEN_TOKIO_FEATURES)?);
    if !found.is_empty() {
        bail!("layering violations:\n{}", found.join("\n"));
    }
    eprintln!("layering: {} rules hold", FORBIDDEN.len() + FORBIDDEN_TOKIO_FEATURES.len());
    Ok(())
}

/// The resolved graph of the workspace, as `cargo metadata` prints it (all features, so an
/// optional dependency cannot hide a violation).
pub fn workspace_graph() -> Result<Value> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--all-features"])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("cargo metadata printed something that is not JSON")
}

/// Every rule `(krate, forbidden)` for which `forbidden` is reachable from `krate` through
/// normal (not dev, not build) dependency edges, each with the path that reaches it.
/// Fails when a rule names a crate the graph does not hold: a misspelt rule must not pass.
pub fn violations(metadata: &Value, rules: &[(&str, &str)]) -> Result<Vec<String>> {
    let packages = metadata["packages"].as_array().context("metadata without packages")?;
    let name_of: HashMap<&str, &str> =
        packages.iter().filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?))).collect();
    let nodes = metadata["resolve"]["nodes"].as_array().context("metadata without resolve")?;
    let mut edges: HashMap<&str, Vec<&str>> = HashMap::new();
    for node in nodes {
        let Some(id) = node["id"].as_str() else { continue };
        let Some(name) = name_of.get(id) else { continue };
        let normal = node["deps"].as_array().into_iter().flatten().filter(|dep| {
            dep["dep_kinds"].as_array().into_iter().flatten().any(|k| k["kind"].is_null())
        });
        let targets = edges.entry(name).or_default();
        targets.extend(normal.filter_map(|dep| name_of.get(dep["pkg"].as_str()?).copied()));
    }
    let mut found = Vec::new();
    for (krate, forbidden) in rules {
        if !edges.contains_key(krate) {
            bail!("layering rule names {krate:?}, which is not in the graph");
        }
        if let Some(path) = path_between(&edges, krate, forbidden) {
            found.push(format!("{krate} depends on {forbidden}: {}", path.join(" -> ")));
        }
    }
    Ok(found)
}

/// Every rule `(krate, feature)` for which `krate` declares a normal dependency on `dep`
/// with `feature` switched on (the declaration, workspace inheritance included, not the
/// features a whole build unifies to). Fails when a rule names a crate not in the workspace.
pub fn feature_violations(
    metadata: &Value,
    dep: &str,
    rules: &[(&str, &str)],
) -> Result<Vec<String>> {
    let packages = metadata["packages"].as_array().context("metadata without packages")?;
    let mut found = Vec::new();
    for (krate, feature) in rules {
        let package = packages
            .iter()
            .find(|p| p["name"] == *krate)
            .with_context(|| format!("feature rule names {krate:?}, which is not in the graph"))?;
        let asks = package["dependencies"].as_array().into_iter().flatten().any(|d| {
            d["name"] == dep
                && d["kind"].is_null()
                && d["features"].as_array().into_iter().flatten().any(|f| f == feature)
        });
        if asks {
            found.push(format!("{krate} asks for {dep}'s feature {feature:?}"));
        }
    }
    Ok(found)
}

/// A shortest dependency path from `from` to `to`, breadth first.
fn path_between<'a>(
    edges: &HashMap<&'a str, Vec<&'a str>>,
    from: &'a str,
    to: &str,
) -> Option<Vec<&'a str>> {
    let mut parent: HashMap<&str, &str> = HashMap::new();
    let mut seen = BTreeSet::from([from]);
    let mut frontier = vec![from];
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for at in frontier {
            for &dep in edges.get(at).into_iter().flatten() {
                if !seen.insert(dep) {
                    continue;
                }
                parent.insert(dep, at);
                if dep == to {
                    let mut path = vec![dep];
                    let mut cur = dep;
                    while let Some(&p) = parent.get(cur) {
                        path.push(p);
                        cur = p;
                    }
                    path.reverse();
                    return Some(path);
                }
                next.push(dep);
            }
        }
        frontier = next;
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a failed unwrap is a failed test")]

    use serde_json::{Value, json};

    use super::*;

    /// A metadata document with `edges` as (from, to, kind) where kind is null, "dev" or
    /// "build".
    fn graph(edges: &[(&str, &str, Option<&str>)]) -> Value {
        let mut names = BTreeSet::new();
        for (a, b, _) in edges {
            names.insert(*a);
            names.insert(*b);
        }
        let packages: Vec<Value> =
            names.iter().map(|n| json!({"id": format!("id#{n}"), "name": n})).collect();
        let nodes: Vec<Value> = names
            .iter()
            .map(|n| {
                let deps: Vec<Value> = edges
                    .iter()
                    .filter(|(a, _, _)| a == n)
                    .map(|(_, b, kind)| {
                        json!({"name": b, "pkg": format!("id#{b}"),
                               "dep_kinds": [{"kind": kind, "target": null}]})
                    })
                    .collect();
                json!({"id": format!("id#{n}"), "deps": deps})
            })
            .collect();
        json!({"packages": packages, "resolve": {"nodes": nodes}})
    }

    #[test]
    fn a_transitive_normal_dependency_is_a_violation_with_its_path() {
        let g = graph(&[("core", "helper", None), ("helper", "lapin", None)]);
        let found = violations(&g, &[("core", "lapin")]).unwrap();
        assert_eq!(found, ["core depends on lapin: core -> helper -> lapin"]);
    }

    #[test]
    fn dev_and_build_dependencies_are_not_violations() {
        let g = graph(&[("core", "lapin", Some("dev")), ("core", "cc", Some("build"))]);
        assert!(violations(&g, &[("core", "lapin"), ("core", "cc")]).unwrap().is_empty());
        // A dev-dependency's own normal dependencies do not count either.
        let g = graph(&[("core", "testkit", Some("dev")), ("testkit", "lapin", None)]);
        assert!(violations(&g, &[("core", "lapin")]).unwrap().is_empty());
    }

    #[test]
    fn a_rule_naming_an_unknown_crate_fails() {
        let g = graph(&[("core", "helper", None)]);
        assert!(violations(&g, &[("kore", "lapin")]).is_err());
    }

    #[test]
    fn a_forbidden_feature_of_a_normal_dependency_is_a_violation() {
        let g = json!({"packages": [{"name": "core", "dependencies": [
            {"name": "tokio", "kind": null, "features": ["sync", "net"]},
            {"name": "tokio", "kind": "dev", "features": ["process"]},
        ]}]});
        let rules = [("core", "net"), ("core", "process"), ("core", "fs")];
        assert_eq!(
            feature_violations(&g, "tokio", &rules).unwrap(),
            ["core asks for tokio's feature \"net\""]
        );
        assert!(feature_violations(&g, "tokio", &[("kore", "net")]).is_err());
    }

    /// The gate on the real workspace: every rule holds, and a rule the workspace breaks
    /// on purpose (ws-adapter is built on tokio-tungstenite) is caught.
    #[test]
    fn the_real_graph_keeps_every_rule_and_a_broken_rule_is_caught() {
        let g = workspace_graph().unwrap();
        assert_eq!(violations(&g, FORBIDDEN).unwrap(), Vec::<String>::new());
        let found = violations(&g, &[("ws-adapter", "tokio-tungstenite")]).unwrap();
        assert_eq!(
            found,
            ["ws-adapter depends on tokio-tungstenite: ws-adapter -> tokio-tungstenite"]
        );
        let found = violations(&g, &[("nuropb-gateway", "lapin")]).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            feature_violations(&g, "tokio", FORBIDDEN_TOKIO_FEATURES).unwrap(),
            Vec::<String>::new()
        );
        // ws-adapter asks for `net` on purpose: a rule against it is caught.
        let found = feature_violations(&g, "tokio", &[("ws-adapter", "net")]).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        // The benchmark crate uses the testkit as a normal dependency, so the rule form is
        // seen to catch it.
        let found = violations(&g, &[("e2e-tests", "nuropb-testkit")]).unwrap();
        assert_eq!(found, ["e2e-tests depends on nuropb-testkit: e2e-tests -> nuropb-testkit"]);
    }
}
