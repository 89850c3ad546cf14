//! Shared by the example components: where their WIT lives.
//!
//! The capability interfaces (wasi:keyvalue, wasi:config, wasi:logging) are defined once in the
//! repository, in `guest/wit/deps/`, next to the WASI 0.2 definitions the guest implements; the
//! per-example worlds are in `images/wit/world.wit`. Each binary names its own world, so its
//! component imports only the capabilities it uses.

/// Generates the bindings for one world of `images/wit/world.wit`, e.g.
/// `wasmvisor_examples::bindings!("wasmvisor:examples/kv-counter");` (the name is qualified because
/// every package listed below is a candidate).
///
/// Paths are relative to `images/`. Packages must come before the packages that use them.
#[macro_export]
macro_rules! bindings {
    ($world:tt) => {
        ::wit_bindgen::generate!({
            world: $world,
            path: [
                "../guest/wit/deps/keyvalue.wit",
                "../guest/wit/deps/config.wit",
                "../guest/wit/deps/logging.wit",
                "wit",
            ],
            // Interfaces from other packages are generated too, as modules named after their
            // package (`wasi::keyvalue::store`, ...); nothing here maps them to existing crates.
            generate_all,
        });
    };
}
