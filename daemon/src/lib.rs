//! The `wasmvisor serve` daemon, host side of many tenants.
//!
//! Built so far: [`store`], the desired state (components and tenants' specs) in redb, committed
//! before an answer. To come (see DESIGN.md): the API (axum on a Unix socket), the supervisor
//! of VMM children (`wasmvisor::child`) with their capabilities relayed to the tenants' brokers
//! (`wasmvisor_providers::serve_listener`), logs, metrics and reconciliation at start.

#![forbid(unsafe_code)]

pub mod store;
