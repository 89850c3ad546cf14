//! The capabilities a tenant can be granted, their `--grant` names and the WIT packages they
//! cover. A capability is granted or not as a whole package: granting `keyvalue` grants
//! `wasi:keyvalue/store`, `/atomics` and `/batch`.

use std::fmt;
use std::str::FromStr;

/// A capability a tenant can be granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    /// `wasi:logging`: records appended to the tenant's log.
    Logging,
    /// `wasi:config`: the tenant's `--config` pairs, read-only.
    Config,
    /// `wasi:keyvalue`: the tenant's persistent buckets.
    KeyValue,
    /// `wasi:http/outgoing-handler`: requests to the hosts of the tenant's allow-list, made by
    /// the host (a component may import the interface without it; its requests are denied).
    #[serde(rename = "http-outgoing")]
    HttpOutgoing,
    /// `wasi:filesystem` preopens: the tenant's directories (`--dir`, the spec's `dirs`). Every
    /// component may import `wasi:filesystem`; without this grant it sees no directory.
    Filesystem,
}

impl Capability {
    /// Every capability, in `--grant` order.
    pub const ALL: [Capability; 5] = [
        Capability::Logging,
        Capability::Config,
        Capability::KeyValue,
        Capability::HttpOutgoing,
        Capability::Filesystem,
    ];

    /// The name used with `--grant`: `logging`, `config`, `keyvalue` or `http-outgoing`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Logging => "logging",
            Self::Config => "config",
            Self::KeyValue => "keyvalue",
            Self::HttpOutgoing => "http-outgoing",
            Self::Filesystem => "filesystem",
        }
    }

    /// The WIT package, without version: `wasi:logging`, `wasi:config` or `wasi:keyvalue`; for
    /// `http-outgoing`, its one interface `wasi:http/outgoing-handler` (which no import maps
    /// to: the grant is checked per request); for `filesystem`, `wasi:filesystem/preopens`
    /// (likewise: WASI's filesystem is linked for every component, the grant decides what it
    /// sees).
    pub fn package(self) -> &'static str {
        match self {
            Self::Logging => "wasi:logging",
            Self::Config => "wasi:config",
            Self::KeyValue => "wasi:keyvalue",
            Self::HttpOutgoing => "wasi:http/outgoing-handler",
            Self::Filesystem => "wasi:filesystem/preopens",
        }
    }

    /// The capability whose WIT package an import like `wasi:keyvalue/store@0.2.0-draft` belongs
    /// to (any version), or `None` for an import no capability covers.
    pub fn of_import(import: &str) -> Option<Capability> {
        let end = import.find(['/', '@']).unwrap_or(import.len());
        let package = &import[..end];
        Self::ALL.into_iter().find(|c| c.package() == package)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Capability {
    type Err = UnknownCapability;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| UnknownCapability { given: s.to_owned() })
    }
}

/// A `--grant` value that names no capability.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown capability {given:?}: expected one of {}", valid_names())]
pub struct UnknownCapability {
    given: String,
}

fn valid_names() -> String {
    Capability::ALL.map(Capability::name).join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_valid_ones() {
        for c in Capability::ALL {
            assert_eq!(c.name().parse::<Capability>(), Ok(c));
            assert_eq!(c.to_string(), c.name());
        }
        let err = "kv".parse::<Capability>().unwrap_err().to_string();
        assert_eq!(
            err,
            r#"unknown capability "kv": expected one of logging, config, keyvalue, http-outgoing, filesystem"#
        );
        assert!("".parse::<Capability>().is_err());
        assert!("Logging".parse::<Capability>().is_err());
    }

    #[test]
    fn imports_map_to_their_package() {
        assert_eq!(Capability::of_import("wasi:keyvalue/store@0.2.0-draft"), Some(Capability::KeyValue));
        assert_eq!(Capability::of_import("wasi:keyvalue/atomics@0.2.0-draft"), Some(Capability::KeyValue));
        assert_eq!(Capability::of_import("wasi:keyvalue/batch"), Some(Capability::KeyValue));
        assert_eq!(Capability::of_import("wasi:config/store@0.2.0-rc.1"), Some(Capability::Config));
        assert_eq!(Capability::of_import("wasi:logging/logging@0.1.0-draft"), Some(Capability::Logging));
        assert_eq!(Capability::of_import("wasi:logging@0.1.0-draft"), Some(Capability::Logging));
        assert_eq!(Capability::of_import("wasi:cli/run@0.2.12"), None);
        assert_eq!(Capability::of_import("wasi:http/outgoing-handler@0.2.0"), None);
        assert_eq!(Capability::of_import("wasi:keyvaluex/store"), None);
        assert_eq!(Capability::of_import("wasi:filesystem/preopens@0.2.0"), None);
        assert_eq!(Capability::of_import("wasi:filesystem/types@0.2.6"), None);
        assert_eq!(Capability::of_import("wasi:key"), None);
        assert_eq!(Capability::of_import(""), None);
    }
}
