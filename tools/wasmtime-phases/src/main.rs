//! `wasmtime-phases APP.cwasm [ARGS...]`: runs a component precompiled by `wasmtime compile`
//! as `wasmtime run --allow-precompiled` does (the default engine, WASI 0.2 with the process's
//! stdio, the file name as argv[0]) and reports on stderr how long each phase took, in the
//! words of the guest's own report (`guest phases (us): ...`), so that `cargo bench --bench
//! run` can set wasmvisor's phases beside wasmtime's: engine, deserialize (mapping the file and
//! loading its metadata), link (WASI into the linker and the pre-instantiation), instantiate
//! (memories initialised copy-on-write from the file), run (`wasi:cli/run`).
//!
//! Exits with the component's code, as `wasmtime run` does (0, or 1 for an error result).

use std::time::Instant;

use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::p2::bindings::sync::CommandPre;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

struct State {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.ctx, table: &mut self.table }
    }
}

fn main() -> wasmtime::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: wasmtime-phases APP.cwasm [ARGS...]");
        std::process::exit(2);
    };
    let mut last = Instant::now();
    let mut laps = Vec::new();
    let mut lap = |name: &'static str| {
        let now = Instant::now();
        laps.push((name, (now - last).as_micros()));
        last = now;
    };
    let engine = Engine::default();
    lap("engine");
    // SAFETY: the file is what `wasmtime compile` wrote for this wasmtime; wasmtime checks its
    // header, and nothing modifies it while it is mapped.
    let component = unsafe { Component::deserialize_file(&engine, path)? };
    lap("deserialize");
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    let pre = CommandPre::new(linker.instantiate_pre(&component)?)?;
    lap("link");
    let name = std::path::Path::new(path).file_name().map_or(path.clone(), |n| n.to_string_lossy().into_owned());
    let mut argv = vec![name];
    argv.extend(args[1..].iter().cloned());
    let ctx = WasiCtx::builder().inherit_stdio().inherit_env().args(&argv).build();
    let mut store = Store::new(&engine, State { ctx, table: ResourceTable::new() });
    let command = pre.instantiate(&mut store)?;
    lap("instantiate");
    let result = command.wasi_cli_run().call_run(&mut store);
    lap("run");
    let phases: String = laps.iter().map(|(name, us)| format!(" {name} {us}")).collect();
    eprintln!("wasmtime phases (us):{phases}");
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(())) => std::process::exit(1),
        Err(e) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
            Some(exit) => std::process::exit(exit.0),
            None => Err(e),
        },
    }
}
