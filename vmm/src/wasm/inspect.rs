//! What a component imports and exports, read with wasmparser before anything is compiled or
//! booted, so that a component wasmvisor cannot serve is refused with the interface's name.

use std::path::Path;

use std::collections::BTreeSet;

use wasmparser::{Encoding, Parser, Payload};
use wasmvisor_providers::Capability;

use super::WasmError;

/// The WASI 0.2 interfaces the guest implements (any `0.2.x` version).
pub const SUPPORTED_IMPORTS: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
    "wasi:filesystem/types",
    "wasi:filesystem/preopens",
    "wasi:sockets/network",
    "wasi:sockets/instance-network",
    "wasi:sockets/ip-name-lookup",
    "wasi:sockets/tcp",
    "wasi:sockets/tcp-create-socket",
    "wasi:sockets/udp",
    "wasi:sockets/udp-create-socket",
    "wasi:http/types",
    // Always importable (stock HTTP components import it whether they use it or not); a
    // request to a host the tenant was not granted is answered `HTTP-request-denied`.
    "wasi:http/outgoing-handler",
];

/// The export a command must have.
pub const RUN_EXPORT: &str = "wasi:cli/run";
/// The export an HTTP component must have.
pub const HTTP_EXPORT: &str = "wasi:http/incoming-handler";

/// What a component is, by its exports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// It exports `wasi:cli/run` (it may also export a handler).
    Command,
    /// It exports `wasi:http/incoming-handler` and not `wasi:cli/run`.
    Http,
}

/// The kind of a component with these interfaces, if it is one wasmvisor runs.
pub fn kind(found: &Interfaces) -> Option<Kind> {
    let has = |wanted: &str| {
        found.exports.iter().any(|e| {
            let (iface, version) = split_version(e);
            iface == wanted && is_wasi_0_2(version)
        })
    };
    if has(RUN_EXPORT) {
        Some(Kind::Command)
    } else if has(HTTP_EXPORT) {
        Some(Kind::Http)
    } else {
        None
    }
}

/// A component's top-level imports and exports.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Interfaces {
    /// Import names, e.g. `wasi:cli/environment@0.2.6`.
    pub imports: Vec<String>,
    /// Export names.
    pub exports: Vec<String>,
}

/// Splits `wasi:cli/stdout@0.2.6` into (`wasi:cli/stdout`, `0.2.6`).
fn split_version(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((iface, version)) => (iface, Some(version)),
        None => (name, None),
    }
}

fn is_wasi_0_2(version: Option<&str>) -> bool {
    version.is_some_and(|v| v == "0.2" || v.starts_with("0.2."))
}

/// Reads the top-level imports and exports of a component; refuses what is not one.
pub fn interfaces(path: &Path, bytes: &[u8]) -> Result<Interfaces, WasmError> {
    if !bytes.starts_with(b"\0asm") {
        return Err(WasmError::NotWasm { path: path.to_owned() });
    }
    let malformed =
        |e: wasmparser::BinaryReaderError| WasmError::Malformed { path: path.to_owned(), why: e.to_string() };
    let mut found = Interfaces::default();
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(malformed)? {
            Payload::Version { encoding: Encoding::Module, .. } if depth == 0 => {
                let why = match super::preview1::classify(bytes) {
                    super::preview1::CoreModule::Unsupported(why) => why,
                    super::preview1::CoreModule::Command => {
                        "a wasip1 command, given here before it was made a component".into()
                    }
                };
                return Err(WasmError::CoreModule { path: path.to_owned(), why });
            }
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    found.imports.push(import.map_err(malformed)?.name.name.to_string());
                }
            }
            Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    found.exports.push(export.map_err(malformed)?.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(found)
}

/// Checks that every import is a WASI 0.2 interface the guest provides and that the component
/// is a command.
pub fn check(path: &Path, found: &Interfaces, grants: &Grants<'_>) -> Result<BTreeSet<Capability>, WasmError> {
    let used = check_imports(path, found, grants)?;
    match kind(found) {
        Some(Kind::Command) => Ok(used),
        Some(Kind::Http) => Err(WasmError::HttpNotCommand { path: path.to_owned() }),
        None => Err(not_runnable(path, found)),
    }
}

/// Checks that every import is a WASI 0.2 interface the guest provides and that the component
/// exports `wasi:http/incoming-handler`.
pub fn check_http(path: &Path, found: &Interfaces, grants: &Grants<'_>) -> Result<BTreeSet<Capability>, WasmError> {
    let used = check_imports(path, found, grants)?;
    let handles = found.exports.iter().any(|e| {
        let (iface, version) = split_version(e);
        iface == HTTP_EXPORT && is_wasi_0_2(version)
    });
    if !handles {
        let exports = if found.exports.is_empty() { "none".to_string() } else { found.exports.join(", ") };
        return Err(WasmError::NotHttp { path: path.to_owned(), exports });
    }
    Ok(used)
}

/// Checks that every import is one the guest provides (any capability may be granted) and that
/// the component is a command or an HTTP handler: what `wasmvisor compile` accepts.
pub fn check_any(path: &Path, found: &Interfaces) -> Result<Kind, WasmError> {
    let every = Capability::ALL.into_iter().collect();
    check_imports(path, found, &Grants { tenant: "any", granted: &every })?;
    kind(found).ok_or_else(|| not_runnable(path, found))
}

fn not_runnable(path: &Path, found: &Interfaces) -> WasmError {
    let exports = if found.exports.is_empty() { "none".to_string() } else { found.exports.join(", ") };
    WasmError::NotACommand { path: path.to_owned(), exports }
}

fn check_imports(path: &Path, found: &Interfaces, grants: &Grants<'_>) -> Result<BTreeSet<Capability>, WasmError> {
    let mut used = BTreeSet::new();
    for import in &found.imports {
        let (iface, version) = split_version(import);
        if let Some(&(_, wanted)) = CAPABILITY_IMPORTS.iter().find(|(name, _)| *name == iface) {
            let capability = Capability::of_import(iface).expect("every capability import belongs to a capability");
            if version != Some(wanted) {
                return Err(WasmError::UnsupportedImport {
                    path: path.to_owned(),
                    import: import.clone(),
                    why: capability_version(capability),
                });
            }
            if !grants.granted.contains(&capability) {
                return Err(WasmError::NotGranted {
                    path: path.to_owned(),
                    import: import.clone(),
                    tenant: grants.tenant.to_owned(),
                    capability: capability.name(),
                });
            }
            used.insert(capability);
            continue;
        }
        if iface == "wasi:http/outgoing-handler" && grants.granted.contains(&Capability::HttpOutgoing) {
            // Its requests go to the host's client through the broker: the VM needs vsock.
            used.insert(Capability::HttpOutgoing);
        }
        let why = if !SUPPORTED_IMPORTS.contains(&iface) {
            "only WASI 0.2 cli, io, clocks, random, filesystem, sockets and http, and the capabilities \
             wasi:logging@0.1.0-draft, wasi:config@0.2.0-rc.1 and wasi:keyvalue@0.2.0-draft are available"
        } else if !is_wasi_0_2(version) {
            "only WASI 0.2.x versions are available"
        } else {
            continue;
        };
        return Err(WasmError::UnsupportedImport { path: path.to_owned(), import: import.clone(), why });
    }
    Ok(used)
}

/// What a tenant was granted, for [`check`].
#[derive(Clone, Copy, Debug)]
pub struct Grants<'a> {
    /// The tenant's name, for the error message.
    pub tenant: &'a str,
    /// The capabilities it may use.
    pub granted: &'a BTreeSet<Capability>,
}

/// The capability interfaces the broker serves, with the one version of each it speaks.
pub const CAPABILITY_IMPORTS: &[(&str, &str)] = &[
    ("wasi:logging/logging", "0.1.0-draft"),
    ("wasi:config/store", "0.2.0-rc.1"),
    ("wasi:keyvalue/store", "0.2.0-draft"),
    ("wasi:keyvalue/atomics", "0.2.0-draft"),
    ("wasi:keyvalue/batch", "0.2.0-draft"),
];

fn capability_version(c: Capability) -> &'static str {
    match c {
        Capability::Logging => "only wasi:logging@0.1.0-draft is available",
        Capability::Config => "only wasi:config@0.2.0-rc.1 is available",
        Capability::KeyValue => "only wasi:keyvalue@0.2.0-draft is available",
        Capability::HttpOutgoing => "only wasi:http@0.2.x is available",
        Capability::Filesystem => "only wasi:filesystem@0.2.x is available",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn refuses_what_is_not_a_component() {
        let p = Path::new("x.wasm");
        assert!(matches!(interfaces(p, b"hello"), Err(WasmError::NotWasm { .. })));
        // The smallest core module: magic + version 1.
        let core = b"\0asm\x01\0\0\0";
        let err = interfaces(p, core).unwrap_err();
        assert!(matches!(err, WasmError::CoreModule { .. }));
        assert!(err.to_string().contains("--target wasm32-wasip2"), "{err}");
        // A component header followed by garbage.
        let bad = b"\0asm\x0d\0\x01\0\xff\xff";
        assert!(matches!(interfaces(p, bad), Err(WasmError::Malformed { .. })));
    }

    #[test]
    fn checks_imports_and_the_run_export() {
        let p = Path::new("app.wasm");
        let ok = Interfaces {
            imports: names(&["wasi:cli/environment@0.2.6", "wasi:io/streams@0.2.0", "wasi:sockets/tcp@0.2.12"]),
            exports: names(&["wasi:cli/run@0.2.0"]),
        };
        let none = BTreeSet::new();
        let deny = Grants { tenant: "t1", granted: &none };
        assert!(check(p, &ok, &deny).unwrap().is_empty());
        let mut kv = ok.clone();
        kv.imports.push("wasi:keyvalue/store@0.2.0-draft".into());
        let err = check(p, &kv, &deny).unwrap_err().to_string();
        assert_eq!(
            err,
            "app.wasm imports `wasi:keyvalue/store@0.2.0-draft`, but tenant `t1` was not granted the keyvalue \
             capability: pass `--grant keyvalue` to grant it"
        );
        let all: BTreeSet<Capability> = Capability::ALL.into_iter().collect();
        let allow = Grants { tenant: "t1", granted: &all };
        assert_eq!(check(p, &kv, &allow).unwrap(), [Capability::KeyValue].into_iter().collect());
        let mut old = ok.clone();
        old.imports.push("wasi:keyvalue/store@0.1.0".into());
        assert!(check(p, &old, &allow).unwrap_err().to_string().contains("only wasi:keyvalue@0.2.0-draft"));
        let mut other = ok.clone();
        other.imports.push("wasi:nn/inference@0.2.0".into());
        assert!(check(p, &other, &allow).unwrap_err().to_string().contains("does not provide"));
        let mut fetches = ok.clone();
        fetches.imports.push("wasi:http/outgoing-handler@0.2.0".into());
        assert!(check(p, &fetches, &deny).is_ok(), "importable without a grant; calls are denied");
        let mut p3 = ok.clone();
        p3.imports.push("wasi:cli/stdout@0.3.0".into());
        assert!(check(p, &p3, &deny).unwrap_err().to_string().contains("only WASI 0.2.x"));
        let reactor = Interfaces { imports: vec![], exports: names(&["my:pkg/api@1.0.0"]) };
        let err = check(p, &reactor, &deny).unwrap_err().to_string();
        assert!(err.contains("not a command component (exports: my:pkg/api@1.0.0)"), "{err}");
        assert_eq!(kind(&reactor), None);
        let http = Interfaces {
            imports: names(&["wasi:http/types@0.2.4", "wasi:io/streams@0.2.4"]),
            exports: names(&["wasi:http/incoming-handler@0.2.4"]),
        };
        assert_eq!(kind(&http), Some(Kind::Http));
        assert!(check_http(p, &http, &deny).unwrap().is_empty());
        let err = check(p, &http, &deny).unwrap_err().to_string();
        assert!(err.contains("wasmvisor serve"), "{err}");
        let err = check_http(p, &ok, &deny).unwrap_err().to_string();
        assert!(err.contains("not an HTTP component (exports: wasi:cli/run@0.2.0)"), "{err}");
    }
}
