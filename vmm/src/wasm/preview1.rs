//! WASI preview 1 command modules (`wasm32-wasip1`: C and C++ with wasi-sdk, Zig, TinyGo,
//! AssemblyScript, older Rust), made components on the host the way `wasm-tools component new
//! --adapt` makes them: wit-component wraps the module with the preview 1 adapter of the
//! wasmtime release wasmvisor embeds (`wasi-preview1-component-adapter-provider`), which turns
//! each `wasi_snapshot_preview1` import into WASI 0.2 calls. The result behaves as the adapter
//! does under wasmtime (which differs from wasmtime's own preview 1 in places: an exit code
//! other than 0 becomes 1, as `exit(err)`).
//!
//! Only commands qualify: a module whose imports all come from `wasi_snapshot_preview1` and
//! which exports `_start` and its memory. Anything else is named with what it lacks.

use std::path::Path;

use wasmparser::{Parser, Payload, TypeRef};

use super::WasmError;

/// The module preview 1 imports come from.
const PREVIEW1: &str = "wasi_snapshot_preview1";

/// What a core module is, as far as running it goes.
#[derive(Debug, PartialEq, Eq)]
pub enum CoreModule {
    /// A preview 1 command: componentize it.
    Command,
    /// Anything else: why it cannot run.
    Unsupported(String),
}

/// Whether `bytes` (a core module) is a preview 1 command, and if not, why not.
pub fn classify(bytes: &[u8]) -> CoreModule {
    let mut foreign = std::collections::BTreeSet::new();
    let mut exports = std::collections::BTreeSet::new();
    let mut memory_import = false;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload {
            Ok(Payload::ImportSection(section)) => {
                for import in section.into_imports().flatten() {
                    if import.module != PREVIEW1 {
                        foreign.insert(import.module.to_owned());
                    }
                    memory_import |= matches!(import.ty, TypeRef::Memory(_));
                }
            }
            Ok(Payload::ExportSection(section)) => {
                exports.extend(section.into_iter().flatten().map(|e| e.name.to_owned()));
            }
            Ok(_) => {}
            Err(e) => return CoreModule::Unsupported(format!("it does not parse ({e})")),
        }
    }
    if !foreign.is_empty() {
        let names: Vec<String> = foreign.into_iter().map(|m| format!("`{m}`")).collect();
        return CoreModule::Unsupported(format!(
            "it imports from {}, not only from `{PREVIEW1}`: it needs a host that provides those",
            names.join(", ")
        ));
    }
    if memory_import {
        return CoreModule::Unsupported("it imports its memory rather than exporting it".into());
    }
    if !exports.contains("_start") {
        let what =
            if exports.contains("_initialize") { "a WASI reactor (it exports `_initialize`)" } else { "no command" };
        return CoreModule::Unsupported(format!(
            "it is {what}, without a `_start` export: wasmvisor runs commands and HTTP components"
        ));
    }
    if !exports.contains("memory") {
        return CoreModule::Unsupported("it exports no `memory`, which the preview 1 adapter needs".into());
    }
    CoreModule::Command
}

/// Whether `bytes` is a core module (rather than a component).
pub fn is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes.starts_with(b"\0asm") && bytes[4..8] == [1, 0, 0, 0]
}

/// `bytes` as a component: a component as it is; a preview 1 command module componentized
/// (`true`: it was); any other core module refused with what it lacks.
pub fn component<'b>(path: &Path, bytes: &'b [u8]) -> Result<(std::borrow::Cow<'b, [u8]>, bool), WasmError> {
    if !is_core_module(bytes) {
        return Ok((std::borrow::Cow::Borrowed(bytes), false));
    }
    match classify(bytes) {
        CoreModule::Command => Ok((std::borrow::Cow::Owned(componentize(path, bytes)?), true)),
        CoreModule::Unsupported(why) => Err(WasmError::CoreModule { path: path.to_owned(), why }),
    }
}

/// The component of preview 1 command module `bytes` (from `path`, for messages), with the
/// command adapter.
pub fn componentize(path: &Path, bytes: &[u8]) -> Result<Vec<u8>, WasmError> {
    let adapter = wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER;
    wit_component::ComponentEncoder::default()
        .validate(true)
        .module(bytes)
        .and_then(|e| e.adapter(PREVIEW1, adapter))
        .and_then(|mut e| e.encode())
        .map_err(|e| WasmError::Malformed {
            path: path.to_owned(),
            why: format!("as a wasip1 command module, it could not be made a component: {e:#}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal module: functions `(i32) -> ()` imported as given, one memory, one function
    /// exported under each name given (`memory` exports the memory).
    fn module(imports: &[(&str, &str)], exports: &[&str]) -> Vec<u8> {
        use wasm_encoder::{
            CodeSection, EntityType, ExportKind, ExportSection, Function, FunctionSection, ImportSection, Instruction,
            MemorySection, MemoryType, Module, TypeSection, ValType,
        };
        let mut types = TypeSection::new();
        types.ty().function([ValType::I32], []);
        types.ty().function([], []);
        let mut imported = ImportSection::new();
        for (m, name) in imports {
            imported.import(m, name, EntityType::Function(0));
        }
        let mut functions = FunctionSection::new();
        functions.function(1);
        let mut memories = MemorySection::new();
        memories.memory(MemoryType { minimum: 1, maximum: None, memory64: false, shared: false, page_size_log2: None });
        let mut exported = ExportSection::new();
        for e in exports {
            match *e {
                "memory" => exported.export("memory", ExportKind::Memory, 0),
                name => exported.export(name, ExportKind::Func, imports.len() as u32),
            };
        }
        let mut code = CodeSection::new();
        let mut body = Function::new([]);
        body.instruction(&Instruction::End);
        code.function(&body);
        let mut module = Module::new();
        module
            .section(&types)
            .section(&imported)
            .section(&functions)
            .section(&memories)
            .section(&exported)
            .section(&code);
        module.finish()
    }

    #[test]
    fn commands_qualify_and_everything_else_says_why_not() {
        let command = module(&[(PREVIEW1, "proc_exit")], &["_start", "memory"]);
        assert_eq!(classify(&command), CoreModule::Command);
        let why = |b: &[u8]| match classify(b) {
            CoreModule::Unsupported(why) => why,
            CoreModule::Command => panic!("not a command"),
        };
        assert!(why(&module(&[("env", "f")], &["_start", "memory"])).contains("imports from `env`"));
        assert!(why(&module(&[], &["_initialize", "memory"])).contains("a WASI reactor"));
        assert!(why(&module(&[], &["memory"])).contains("without a `_start` export"));
        assert!(why(&module(&[], &["_start"])).contains("exports no `memory`"));
        assert!(why(b"\0asm\x01\0\0\0\xff").contains("does not parse"));
    }
}
