//! Who a tenant is and what it was given: the validated [`TenantName`] (which becomes a directory
//! name, so it can never name another path), the [`TenantSpec`] the VMM builds from its command
//! line, and where tenant data lives by default.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::broker::BrokerError;
use crate::capability::Capability;

/// Longest tenant name, in bytes.
const MAX_TENANT_NAME_LEN: usize = 64;

/// A tenant's name: 1 to 64 characters of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
///
/// These rules make it a safe single path component (no separators, never `.` or `..`, never
/// hidden) and a safe command-line argument (never an option).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TenantName(String);

impl TryFrom<String> for TenantName {
    type Error = InvalidTenantName;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<TenantName> for String {
    fn from(name: TenantName) -> String {
        name.0
    }
}

impl TenantName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TenantName {
    type Err = InvalidTenantName;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| Err(InvalidTenantName { name: s.to_owned(), reason });
        if s.is_empty() {
            return invalid("it is empty");
        }
        if s.len() > MAX_TENANT_NAME_LEN {
            return invalid("it is longer than 64 characters");
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
            return invalid("only letters, digits, '_', '.' and '-' are allowed");
        }
        if s.starts_with(['.', '-']) {
            return invalid("it must not start with '.' or '-'");
        }
        Ok(Self(s.to_owned()))
    }
}

/// A string that is not a valid [`TenantName`], and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid tenant name {name:?}: {reason}")]
pub struct InvalidTenantName {
    name: String,
    reason: &'static str,
}

/// Everything the host knows about one tenant: plain data, turned into live providers by
/// [`Broker::open`](crate::Broker::open).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TenantSpec {
    /// The tenant's name; its files live in `data_dir/tenants/<name>/`.
    pub name: TenantName,
    /// The capabilities granted (`--grant`); everything else is refused.
    pub grants: BTreeSet<Capability>,
    /// The `wasi:config` pairs (`--config key=value`).
    pub config: BTreeMap<String, String>,
    /// The root of wasmvisor's data (see [`default_data_dir`]).
    pub data_dir: PathBuf,
    /// Also show each `wasi:logging` record on this process's stderr (`LEVEL [context]
    /// message`, escaped as in the log file), as `wasmvisor run` does for a user at a terminal.
    pub echo_log: bool,
    /// The hosts `http-outgoing` may reach: `host` (the scheme's default port) or `host:port`.
    #[serde(default)]
    pub http_allow: Vec<String>,
    /// Most bytes of keys and values its key-value store may hold; `None`: no limit.
    #[serde(default)]
    pub kv_quota: Option<u64>,
    /// The directories its components see through `wasi:filesystem` (with the `filesystem`
    /// grant; without it, none).
    #[serde(default)]
    pub dirs: Vec<crate::Preopen>,
}

impl TenantSpec {
    /// Whether `capability` was granted.
    pub fn is_granted(&self, capability: Capability) -> bool {
        self.grants.contains(&capability)
    }

    /// The directories the tenant's components see: its `dirs` if `filesystem` is granted.
    pub fn preopens(&self) -> &[crate::Preopen] {
        if self.is_granted(Capability::Filesystem) { &self.dirs } else { &[] }
    }

    /// The tenant's directory: `data_dir/tenants/<name>`.
    pub fn tenant_dir(&self) -> PathBuf {
        self.data_dir.join("tenants").join(self.name.as_str())
    }

    /// The tenant's `wasi:logging` file.
    pub fn log_path(&self) -> PathBuf {
        self.tenant_dir().join("tenant.log")
    }

    /// The tenant's `wasi:keyvalue` database.
    pub fn keyvalue_path(&self) -> PathBuf {
        self.tenant_dir().join("keyvalue.redb")
    }
}

/// Where wasmvisor keeps tenant data unless told otherwise: `$WASMVISOR_DATA_DIR`, else
/// `$XDG_DATA_HOME/wasmvisor` (when absolute, as the XDG spec requires), else
/// `$HOME/.local/share/wasmvisor`. Empty variables count as unset.
pub fn default_data_dir() -> Result<PathBuf, BrokerError> {
    data_dir_from(|name| std::env::var_os(name))
}

fn data_dir_from(var: impl Fn(&str) -> Option<OsString>) -> Result<PathBuf, BrokerError> {
    let path = |name| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = path("WASMVISOR_DATA_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = path("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
        return Ok(dir.join("wasmvisor"));
    }
    if let Some(home) = path("HOME") {
        return Ok(home.join(".local/share/wasmvisor"));
    }
    Err(BrokerError::NoDataDir)
}

/// Parses one `--config` value, `key=value`: the key is everything before the first `=` and must
/// not be empty; the value is the rest and may be empty or contain `=`.
pub fn parse_config_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        None => Err(format!("invalid config pair {s:?}: expected KEY=VALUE")),
        Some(("", _)) => Err(format!("invalid config pair {s:?}: the key before '=' is empty")),
        Some((key, value)) => Ok((key.to_owned(), value.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_names_are_single_safe_path_components() {
        for good in ["a", "tenant-1", "A.b_c", "0", "x".repeat(64).as_str(), "a..b"] {
            let name: TenantName = good.parse().unwrap();
            assert_eq!(name.as_str(), good);
            assert_eq!(name.to_string(), good);
        }
        for bad in ["", "../x", ".hidden", "-rf", "a/b", "a\\b", ".", "..", "a b", "é", "a\0", &"x".repeat(65)] {
            assert!(bad.parse::<TenantName>().is_err(), "{bad:?} accepted");
        }
        let err = "a/b".parse::<TenantName>().unwrap_err().to_string();
        assert!(err.contains("\"a/b\"") && err.contains("only letters"), "{err}");
    }

    #[test]
    fn config_pairs_split_at_the_first_equals_sign() {
        assert_eq!(parse_config_pair("k=v"), Ok(("k".into(), "v".into())));
        assert_eq!(parse_config_pair("k="), Ok(("k".into(), "".into())));
        assert_eq!(parse_config_pair("url=a=b"), Ok(("url".into(), "a=b".into())));
        assert!(parse_config_pair("=v").unwrap_err().contains("key before '=' is empty"));
        assert!(parse_config_pair("kv").unwrap_err().contains("expected KEY=VALUE"));
    }

    #[test]
    fn data_dir_precedence() {
        fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
            move |name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| OsString::from(v))
        }
        let all: [(&str, &str); 3] = [("WASMVISOR_DATA_DIR", "/w"), ("XDG_DATA_HOME", "/x"), ("HOME", "/h")];
        assert_eq!(data_dir_from(env(&all)).unwrap(), PathBuf::from("/w"));
        assert_eq!(data_dir_from(env(&all[1..])).unwrap(), PathBuf::from("/x/wasmvisor"));
        assert_eq!(data_dir_from(env(&all[2..])).unwrap(), PathBuf::from("/h/.local/share/wasmvisor"));
        let relative_xdg: [(&str, &str); 3] = [("WASMVISOR_DATA_DIR", ""), ("XDG_DATA_HOME", "rel"), ("HOME", "/h")];
        assert_eq!(data_dir_from(env(&relative_xdg)).unwrap(), PathBuf::from("/h/.local/share/wasmvisor"));
        assert!(matches!(data_dir_from(env(&[])), Err(BrokerError::NoDataDir)));
    }
}
