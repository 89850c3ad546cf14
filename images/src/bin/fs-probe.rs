//! Exercises `wasi:filesystem` through Rust's std, printing one line per check with the
//! outcome (values, or the error's errno), so that its output under `wasmvisor run --dir` can
//! be compared byte for byte with `wasmtime run --dir`.
//!
//! Usage: `fs-probe read PATH...` prints each file (or its error); `fs-probe sum PATH...` each
//! file's length and FNV-1a hash, read in 64 KiB reads; `fs-probe write PATH TEXT`
//! writes one; `fs-probe DATA [RO]`: DATA is a preopened read-write directory, empty; RO, if given,
//! a read-only one holding `file` ("read-only\n"). Nothing here prints timestamps or inode
//! numbers, which differ between runs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::time::{Duration, SystemTime};

fn show<T: std::fmt::Debug>(what: &str, r: io::Result<T>) {
    match r {
        Ok(v) => println!("{what}: ok {v:?}"),
        Err(e) => println!("{what}: err {:?} {:?}", e.raw_os_error(), e.kind()),
    }
}

/// `symlink(2)` from the C library every wasm32-wasi Rust program links (std's wrapper is
/// unstable on WASI).
fn symlink(target: &str, path: String) -> io::Result<()> {
    unsafe extern "C" {
        fn symlink(target: *const std::ffi::c_char, path: *const std::ffi::c_char) -> std::ffi::c_int;
    }
    let (t, p) = (std::ffi::CString::new(target)?, std::ffi::CString::new(path)?);
    // SAFETY: both are NUL-terminated strings that live across the call.
    if unsafe { symlink(t.as_ptr(), p.as_ptr()) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn kind(m: &fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        "dir"
    } else if t.is_file() {
        "file"
    } else if t.is_symlink() {
        "symlink"
    } else {
        "other"
    }
}

/// A file's length and FNV-1a 64 hash, read 64 KiB at a time.
fn sum(path: &str) -> io::Result<(u64, u64)> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut len, mut hash) = (0u64, 0xcbf2_9ce4_8422_2325u64);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((len, hash));
        }
        len += n as u64;
        for &b in &buf[..n] {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("read") {
        for path in &args[2..] {
            show(path, fs::read_to_string(path));
        }
        return;
    }
    if args.get(1).map(String::as_str) == Some("sum") {
        for path in &args[2..] {
            show(path, sum(path));
        }
        return;
    }
    if args.get(1).map(String::as_str) == Some("write") && args.len() == 4 {
        show(&args[2], fs::write(&args[2], &args[3]));
        return;
    }
    let d = args.get(1).expect("usage: fs-probe DATA [RO]").clone();
    let p = |name: &str| format!("{d}/{name}");

    // Create, write, read back.
    show("create", fs::write(p("a.txt"), b"hello, world\n"));
    show("read", fs::read_to_string(p("a.txt")));
    show("size", fs::metadata(p("a.txt")).map(|m| (m.len(), kind(&m))));
    show("create_new existing", OpenOptions::new().write(true).create_new(true).open(p("a.txt")).map(drop));
    show("open missing", File::open(p("missing")).map(drop));
    show("read dir as file", fs::read(&d).map(|v| v.len()));

    // Append, seek, positional writes, truncate, sparse extension.
    show("append", OpenOptions::new().append(true).open(p("a.txt")).and_then(|mut f| f.write_all(b"more\n")));
    show("after append", fs::read_to_string(p("a.txt")));
    show(
        "seek+write",
        OpenOptions::new().read(true).write(true).open(p("a.txt")).and_then(|mut f| {
            f.seek(SeekFrom::Start(7))?;
            f.write_all(b"WORLD")?;
            f.seek(SeekFrom::Start(0))?;
            let mut s = String::new();
            f.read_to_string(&mut s)?;
            Ok(s)
        }),
    );
    show(
        "seek end",
        File::open(p("a.txt")).and_then(|mut f| {
            let end = f.seek(SeekFrom::End(-5))?;
            let mut s = String::new();
            f.read_to_string(&mut s)?;
            Ok((end, s))
        }),
    );
    show("truncate", OpenOptions::new().write(true).open(p("a.txt")).and_then(|f| f.set_len(5)));
    show("after truncate", fs::read_to_string(p("a.txt")));
    show(
        "extend sparse",
        OpenOptions::new().write(true).open(p("a.txt")).and_then(|mut f| {
            f.seek(SeekFrom::Start(1000))?;
            f.write_all(b"x")?;
            Ok(f.metadata()?.len())
        }),
    );
    show("sparse reads zero", fs::read(p("a.txt")).map(|v| (v.len(), v[5..1000].iter().all(|b| *b == 0))));
    show("open truncate", OpenOptions::new().write(true).truncate(true).open(p("a.txt")).map(drop));
    show("after open truncate", fs::metadata(p("a.txt")).map(|m| m.len()));
    show("write to read-only fd", File::open(p("a.txt")).and_then(|mut f| f.write_all(b"no")));
    show(
        "read from write-only fd",
        OpenOptions::new().write(true).open(p("a.txt")).and_then(|mut f| f.read(&mut [0; 4])),
    );

    // A larger file, written in pieces and read back whole.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    show(
        "big write",
        File::create(p("big")).and_then(|mut f| {
            for chunk in big.chunks(4096 + 17) {
                f.write_all(chunk)?;
            }
            f.sync_all()
        }),
    );
    show("big read", fs::read(p("big")).map(|v| (v.len(), v == big)));

    // Directories: create, list, remove.
    show("mkdir", fs::create_dir(p("sub")));
    show("mkdir again", fs::create_dir(p("sub")));
    show("mkdir nested missing", fs::create_dir(p("no/such")));
    for i in 0..5 {
        let _ = fs::write(p(&format!("sub/f{i}")), [b'0' + i as u8]);
    }
    show("mkdir inner", fs::create_dir(p("sub/inner")));
    show(
        "readdir",
        fs::read_dir(p("sub")).and_then(|it| {
            let mut v = it
                .map(|e| e.and_then(|e| Ok((e.file_name().into_string().unwrap(), kind(&e.metadata()?)))))
                .collect::<io::Result<Vec<_>>>()?;
            v.sort();
            Ok(v)
        }),
    );
    show("rmdir not empty", fs::remove_dir(p("sub")));
    show("unlink dir", fs::remove_file(p("sub/inner")));
    show("rmdir file", fs::remove_dir(p("sub/f0")));
    show("rmdir", fs::remove_dir(p("sub/inner")));

    // Rename and hard links.
    show("rename", fs::rename(p("sub/f1"), p("renamed")));
    show("renamed", fs::read_to_string(p("renamed")));
    show("rename missing", fs::rename(p("sub/f1"), p("x")));
    show("rename over", fs::rename(p("renamed"), p("sub/f2")));
    show("rename dir over file", fs::rename(p("sub"), p("big")));
    show("hard link", fs::hard_link(p("sub/f2"), p("linked")));
    show("linked", fs::read_to_string(p("linked")));
    show("hard link exists", fs::hard_link(p("sub/f2"), p("linked")));

    // Symbolic links: inside works, outward ones do not.
    show("symlink", symlink("sub/f3", p("sym")));
    show("readlink", fs::read_link(p("sym")));
    show("through symlink", fs::read_to_string(p("sym")));
    show("symlink_metadata", fs::symlink_metadata(p("sym")).map(|m| kind(&m)));
    show("dangling", symlink("nowhere", p("dangling")));
    show("read dangling", fs::read(p("dangling")));
    show("symlink out", symlink("../..", p("up")));
    show("read through up", fs::read_dir(p("up")).map(|it| it.count()));
    show("absolute symlink", symlink("/etc/passwd", p("abs")));
    show("unlink symlink", fs::remove_file(p("sym")));

    // Escapes by path.
    show("dotdot", fs::read_dir(format!("{d}/..")).map(|it| it.count()));
    show("dotdot file", fs::read(format!("{d}/../../etc/passwd")).map(|v| v.len()));
    show("absolute outside", fs::read("/etc/passwd").map(|v| v.len()));
    show("dotdot create", fs::write(format!("{d}/sub/../../escaped"), b"x"));

    // Timestamps: set, then read back exactly.
    let t = SystemTime::UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
    show("set mtime", OpenOptions::new().write(true).open(p("linked")).and_then(|f| f.set_modified(t)));
    show(
        "mtime",
        fs::metadata(p("linked")).and_then(|m| m.modified()).map(|m| m.duration_since(SystemTime::UNIX_EPOCH).unwrap()),
    );

    // The read-only preopen.
    if let Some(ro) = args.get(2) {
        show("ro read", fs::read_to_string(format!("{ro}/file")));
        show("ro write", fs::write(format!("{ro}/file"), b"changed"));
        show("ro create", fs::write(format!("{ro}/new"), b"x"));
        show("ro mkdir", fs::create_dir(format!("{ro}/d")));
        show("ro unlink", fs::remove_file(format!("{ro}/file")));
        show("ro rename", fs::rename(format!("{ro}/file"), p("stolen")));
        show("ro append", OpenOptions::new().append(true).open(format!("{ro}/file")).map(drop));
        show("ro still", fs::read_to_string(format!("{ro}/file")));
    }

    // Remove what is left, and list the preopen at the end.
    show("unlink", fs::remove_file(p("linked")));
    show("unlink missing", fs::remove_file(p("linked")));
    show(
        "final listing",
        fs::read_dir(&d).and_then(|it| {
            let mut v = it.map(|e| e.map(|e| e.file_name().into_string().unwrap())).collect::<io::Result<Vec<_>>>()?;
            v.sort();
            Ok(v)
        }),
    );
}
