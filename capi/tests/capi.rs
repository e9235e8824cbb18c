//! The C ABI (`include/p2pcheck.h`, `capi/src/lib.rs`) from C, C++ and Python, on the simulated
//! driver (no GPU):
//!
//! * the header's constants, enum sizes and `p2pcheck_pair_result`'s size, alignment, offsets
//!   and field types, compiled as C and as C++, equal the library's;
//! * every function the shared and the static library export is declared and documented in
//!   the header (and the other way round), and called by `capi/tests/c/capi_test.c`;
//! * the static library defines no global C name without the `p2pcheck_` prefix but the Rust
//!   runtime's own (`nm`), so a host defining the shim's old names links;
//! * the shared library has its soname `libp2pcheck.so.0`; the header's shared-link lines work from a tree laid out
//!   as cargo leaves it; `scripts/install.sh` lays out what the header documents, where
//!   `pkg-config --static` gives a link with no dynamic dependency on libp2pcheck (`readelf`,
//!   `ldd`); the pkg-config file, the CMake snippet and the header name the same system
//!   libraries;
//! * `capi/tests/c/capi_test.c`, linked statically and dynamically, calls every function and its
//!   output is asserted line by line: verdicts and diagnoses of a 4-GPU machine with 0->1
//!   broken, NULL and out-of-range arguments, message truncation, vLLM's cache file, the
//!   background check and its kept result, the policy; `capi/tests/c/capi_test.cpp` from C++; the
//!   CMake example's program; `examples/python/access_check.py` through ctypes;
//! * `capi/tests/c/capi_process.c`, inside a host's process: a wait cancelled from another thread,
//!   a child of `fork` using inherited handles, a child of the host living through checks with
//!   hangs and crashes, a failed libcuda load retried after the environment is fixed, a host
//!   called `p2pcheck` never run as a worker (and the CLI, alone, run as its own).
//!
//! The libraries are the ones cargo built for this test run: `target/<profile>/deps/` holds the
//! staticlib and cdylib built with the rlib this test links (cargo copies them up to
//! `target/<profile>/` only for `cargo build`, so the copies there may be stale).

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use p2pcheck::policy::{self, ComputeCapability, PolicyConfig};
use p2pcheck::Class;
use p2pcheck_capi::{
    BandwidthResult, ClassCode, EngineCode, LevelCode, PairResult, Status, TierCode, TransportCode,
    TransportsCode, VerdictCode, VisibilityCode,
};

#[path = "../../tests/common/mod.rs"]
mod common;
use common::TempDir;

/// The system libraries `libp2pcheck.a` needs: rustc's `native-static-libs` (`cargo rustc
/// --release --lib --crate-type staticlib -- --print native-static-libs`), as the header, the
/// pkg-config script and the CMake snippet state them.
const NATIVE_STATIC_LIBS: [&str; 7] = [
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

const C_FLAGS: [&str; 5] = ["-std=c11", "-Wall", "-Wextra", "-Wpedantic", "-Werror"];
const CXX_FLAGS: [&str; 7] = [
    "-std=c++11",
    "-Wall",
    "-Wextra",
    "-Wpedantic",
    "-Werror",
    "-Wold-style-cast",
    "-Wzero-as-null-pointer-constant",
];

/// `rel` in the workspace (the folder above this crate's).
fn root(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join(rel)
}

/// The folder cargo builds into for this test run (`target/<profile>/`): this test's
/// executable is in its `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The worker, `p2pcheck-worker`: a binary of the p2pcheck package, which cargo builds with
/// that package's tests (a plain `cargo test` in the workspace builds both), checked fresh.
fn worker() -> &'static Path {
    static WORKER: OnceLock<PathBuf> = OnceLock::new();
    WORKER.get_or_init(|| fresh(profile_dir().join("p2pcheck-worker"), LIBRARY_SOURCES))
}

/// The CLI, `p2pcheck`, built and checked as [`worker`].
fn cli_exe() -> PathBuf {
    fresh(profile_dir().join("p2pcheck"), LIBRARY_SOURCES)
}

fn header_text() -> String {
    fs::read_to_string(root("include/p2pcheck.h")).unwrap()
}

// ---- The built libraries ------------------------------------------------------------------

fn mtime(p: &Path) -> SystemTime {
    fs::metadata(p).unwrap().modified().unwrap()
}

/// The folders of the p2pcheck package's sources (the binaries are built from them alone).
const LIBRARY_SOURCES: &[&str] = &["src", "csrc"];
/// The folders of the C libraries' sources: the library's and this crate's.
const CAPI_SOURCES: &[&str] = &["src", "csrc", "capi/src"];

/// The newest file in `dirs` and the build script.
fn newest_source(dirs: &[&str]) -> (SystemTime, PathBuf) {
    fn walk(dir: &Path, best: &mut (SystemTime, PathBuf)) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, best);
            } else if mtime(&p) > best.0 {
                *best = (mtime(&p), p);
            }
        }
    }
    let mut best = (mtime(&root("build.rs")), root("build.rs"));
    for dir in dirs {
        walk(&root(dir), &mut best);
    }
    best
}

/// A library cargo built with this test's dependencies, checked to be newer than every source.
fn built(name: &str) -> PathBuf {
    fresh(profile_dir().join("deps").join(name), CAPI_SOURCES)
}

/// `p`, asserted to exist and to be newer than every file of `sources`.
fn fresh(p: PathBuf, sources: &[&str]) -> PathBuf {
    assert!(
        p.is_file(),
        "{} is missing: a plain `cargo test` (or `cargo build`) in the workspace builds it",
        p.display()
    );
    let (newest, source) = newest_source(sources);
    assert!(
        mtime(&p) >= newest,
        "{} is older than {}: stale (a plain `cargo test` rebuilds it)",
        p.display(),
        source.display()
    );
    p
}

fn static_lib() -> PathBuf {
    built("libp2pcheck_capi.a")
}

fn shared_lib() -> PathBuf {
    built("libp2pcheck_capi.so")
}

// ---- Processes ----------------------------------------------------------------------------

/// A token no other run shares, put in a program's environment (and so its workers').
fn token() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "capi-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Pids of live processes whose environment holds `P2PCHECK_TEST_TOKEN=token`.
fn processes_with(token: &str) -> Vec<u32> {
    let needle = format!("P2PCHECK_TEST_TOKEN={token}");
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let env = fs::read(e.path().join("environ")).ok()?;
            env.split(|&b| b == 0)
                .any(|v| v == needle.as_bytes())
                .then_some(pid)
        })
        .collect()
}

/// Runs `cmd` to its end (killed after `limit`), with a token in its environment; asserts that
/// no process of it (its workers) outlives it by more than a few seconds.
fn run(cmd: &mut Command, limit: Duration) -> Output {
    let token = token();
    cmd.env("P2PCHECK_TEST_TOKEN", &token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A program this test process just wrote can be "busy" (ETXTBSY) while another test's
    // fork still holds the writer's descriptor: try again until that child has exec'd.
    let mut tries = 0;
    let mut child = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            r => break r.unwrap_or_else(|e| panic!("{cmd:?}: {e}")),
        }
    };
    let pipe = |mut p: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            buf
        })
    };
    let out = pipe(Box::new(child.stdout.take().unwrap()));
    let err = pipe(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} ran past {limit:?}; stderr: {}",
                String::from_utf8_lossy(&err.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_with(&token).is_empty() {
        assert!(
            Instant::now() < deadline,
            "processes of {cmd:?} left behind: {:?}",
            processes_with(&token)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    output
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Compiles and links `args` with `compiler` into `out`, failing with its messages.
fn compile(compiler: &str, args: &[String], out: &Path) {
    let output = Command::new(compiler)
        .args(args)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap_or_else(|e| panic!("{compiler}: {e}"));
    assert!(
        output.status.success(),
        "{compiler} {args:?}: {}",
        text(&output.stderr)
    );
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A program's environment: nothing from the caller's that p2pcheck reads, the simulator off.
fn program(path: &Path) -> Command {
    let mut cmd = Command::new(path);
    for var in [
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "P2PCHECK_WORKER",
        "P2PCHECK_LIBCUDA",
        "P2PCHECK_LIBCUDART",
        "P2PCHECK_SIM_GPUS",
        "P2PCHECK_SIM_FAULTS",
        "P2PCHECK_TRACE",
        "VLLM_CACHE_ROOT",
        "VLLM_BATCH_INVARIANT",
        "VLLM_USE_NCCL_SYMM_MEM",
        "P2PCHECK_LIBRARY",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// A build folder as `cargo build --release` leaves `target/release`: this test run's
/// libraries (under cargo's names) and worker, linked.
fn build_dir(dir: &Path) -> PathBuf {
    let build = dir.join("build");
    fs::create_dir_all(&build).unwrap();
    for (name, file) in [
        ("libp2pcheck_capi.a", static_lib()),
        ("libp2pcheck_capi.so", shared_lib()),
        ("p2pcheck-worker", PathBuf::from(worker())),
    ] {
        std::os::unix::fs::symlink(file, build.join(name)).unwrap();
    }
    build
}

/// Installs under `prefix` with scripts/install.sh, the layout the header documents (both
/// libraries in lib/), and returns the flags `pkg-config --cflags --static --libs p2pcheck`
/// gives there: asserted to be pkg-config's own where it is installed.
fn install(dir: &Path) -> (PathBuf, Vec<String>) {
    let prefix = dir.join("prefix");
    let out = Command::new("sh")
        .arg(root("scripts/install.sh"))
        .arg(&prefix)
        .arg(build_dir(dir))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let p = prefix.display();
    let mut flags = vec![format!("-I{p}/include"), format!("{p}/lib/libp2pcheck.a")];
    flags.extend(strings(&NATIVE_STATIC_LIBS));
    match pkg_config(&prefix, &["--cflags", "--static", "--libs"]) {
        Some(given) => assert_eq!(given, flags.join(" ")),
        None => eprintln!("pkg-config is not installed: its flags are not compared"),
    }
    (prefix, flags)
}

/// What `pkg-config ARGS p2pcheck` prints for an installation under `prefix`; `None` where
/// pkg-config is not installed.
fn pkg_config(prefix: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("pkg-config")
        .args(args)
        .arg("p2pcheck")
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .env_remove("PKG_CONFIG_LIBDIR")
        .output()
        .ok()?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    Some(text(&out.stdout).trim_end().to_string())
}

/// `readelf -d` of `exe`: its dynamic section.
fn dynamic_section(exe: &Path) -> String {
    let out = Command::new("readelf").arg("-d").arg(exe).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// A folder laid out as an installed shared library: `libp2pcheck.so.0` (the soname), the
/// linker's `libp2pcheck.so` link, and `p2pcheck-worker` beside it.
fn install_shared(lib: &Path) {
    fs::create_dir_all(lib).unwrap();
    std::os::unix::fs::symlink(shared_lib(), lib.join("libp2pcheck.so.0")).unwrap();
    std::os::unix::fs::symlink("libp2pcheck.so.0", lib.join("libp2pcheck.so")).unwrap();
    std::os::unix::fs::symlink(worker(), lib.join("p2pcheck-worker")).unwrap();
}

// ---- The header against the library -------------------------------------------------------

/// Every `P2PCHECK_*` constant of the header with the library's value for it.
fn rust_constants() -> Vec<(&'static str, i64)> {
    vec![
        ("P2PCHECK_STATUS_OK", Status::Ok as i64),
        ("P2PCHECK_STATUS_CUDA", Status::Cuda as i64),
        ("P2PCHECK_STATUS_WORKER_CUDA", Status::WorkerCuda as i64),
        ("P2PCHECK_STATUS_WORKER", Status::Worker as i64),
        ("P2PCHECK_STATUS_VERSION", Status::Version as i64),
        ("P2PCHECK_STATUS_NO_DEVICE", Status::NoDevice as i64),
        (
            "P2PCHECK_STATUS_INVALID_ARGUMENT",
            Status::InvalidArgument as i64,
        ),
        ("P2PCHECK_STATUS_CACHE", Status::Cache as i64),
        ("P2PCHECK_STATUS_CANCELLED", Status::Cancelled as i64),
        ("P2PCHECK_STATUS_NULL_ARGUMENT", Status::NullArgument as i64),
        ("P2PCHECK_STATUS_PANIC", Status::Panic as i64),
        (
            "P2PCHECK_STATUS_BUFFER_TOO_SMALL",
            Status::BufferTooSmall as i64,
        ),
        ("P2PCHECK_STATUS_NOT_READY", Status::NotReady as i64),
        ("P2PCHECK_STATUS_NOT_FOUND", Status::NotFound as i64),
        ("P2PCHECK_STATUS_OTHER", Status::Other as i64),
        ("P2PCHECK_STATUS_WRONG_PROCESS", Status::WrongProcess as i64),
        ("P2PCHECK_ENGINE_PARALLEL", EngineCode::Parallel as i64),
        ("P2PCHECK_ENGINE_VLLM", EngineCode::Vllm as i64),
        ("P2PCHECK_LEVEL_NONE", LevelCode::None as i64),
        ("P2PCHECK_LEVEL_COPY", LevelCode::Copy as i64),
        ("P2PCHECK_LEVEL_KERNEL", LevelCode::Kernel as i64),
        ("P2PCHECK_LEVEL_HANDSHAKE", LevelCode::Handshake as i64),
        ("P2PCHECK_VISIBILITY_ONE", VisibilityCode::One as i64),
        ("P2PCHECK_VISIBILITY_ALL", VisibilityCode::All as i64),
        ("P2PCHECK_TRANSPORT_IPC", TransportCode::Ipc as i64),
        ("P2PCHECK_TRANSPORT_CUMEM", TransportCode::Cumem as i64),
        ("P2PCHECK_TRANSPORTS_IPC", TransportsCode::Ipc as i64),
        ("P2PCHECK_TRANSPORTS_CUMEM", TransportsCode::Cumem as i64),
        ("P2PCHECK_TRANSPORTS_ALL", TransportsCode::All as i64),
        ("P2PCHECK_VERDICT_OK", VerdictCode::Ok as i64),
        ("P2PCHECK_VERDICT_FAILS", VerdictCode::Fails as i64),
        ("P2PCHECK_VERDICT_HANG", VerdictCode::Hang as i64),
        ("P2PCHECK_VERDICT_ERROR", VerdictCode::Error as i64),
        ("P2PCHECK_TIER_NOT_RUN", TierCode::NotRun as i64),
        ("P2PCHECK_TIER_OK", TierCode::Ok as i64),
        ("P2PCHECK_TIER_FAILED", TierCode::Failed as i64),
        ("P2PCHECK_CLASS_NONE", ClassCode::None as i64),
        (
            "P2PCHECK_CLASS_NEVER_WRITTEN",
            ClassCode::NeverWritten as i64,
        ),
        ("P2PCHECK_CLASS_PARTIAL", ClassCode::Partial as i64),
        ("P2PCHECK_CLASS_WRONG_DATA", ClassCode::WrongData as i64),
        ("P2PCHECK_CLASS_OPEN_FAILED", ClassCode::OpenFailed as i64),
        ("P2PCHECK_CLASS_TIMEOUT", ClassCode::Timeout as i64),
        ("P2PCHECK_CLASS_OTHER", ClassCode::Other as i64),
        (
            "P2PCHECK_CLASS_EXPORT_REFUSED",
            ClassCode::ExportRefused as i64,
        ),
        (
            "P2PCHECK_CLASS_FD_NOT_PASSABLE",
            ClassCode::FdNotPassable as i64,
        ),
        (
            "P2PCHECK_CLASS_IMPORT_REFUSED",
            ClassCode::ImportRefused as i64,
        ),
        ("P2PCHECK_CLASS_MAP_REFUSED", ClassCode::MapRefused as i64),
    ]
}

/// Each enum type of the header with the library's size and alignment of it.
fn rust_enums() -> Vec<(&'static str, usize, usize)> {
    use std::mem::{align_of, size_of};
    vec![
        ("p2pcheck_status", size_of::<Status>(), align_of::<Status>()),
        (
            "p2pcheck_engine",
            size_of::<EngineCode>(),
            align_of::<EngineCode>(),
        ),
        (
            "p2pcheck_level",
            size_of::<LevelCode>(),
            align_of::<LevelCode>(),
        ),
        (
            "p2pcheck_visibility",
            size_of::<VisibilityCode>(),
            align_of::<VisibilityCode>(),
        ),
        (
            "p2pcheck_transport",
            size_of::<TransportCode>(),
            align_of::<TransportCode>(),
        ),
        (
            "p2pcheck_transports",
            size_of::<TransportsCode>(),
            align_of::<TransportsCode>(),
        ),
        (
            "p2pcheck_verdict",
            size_of::<VerdictCode>(),
            align_of::<VerdictCode>(),
        ),
        (
            "p2pcheck_tier",
            size_of::<TierCode>(),
            align_of::<TierCode>(),
        ),
        (
            "p2pcheck_class",
            size_of::<ClassCode>(),
            align_of::<ClassCode>(),
        ),
    ]
}

/// Whether an integer type is signed.
trait Signed {
    const SIGNED: bool;
}
impl Signed for u32 {
    const SIGNED: bool = false;
}
impl Signed for i32 {
    const SIGNED: bool = true;
}
fn signed<T: Signed>(_: &T) -> bool {
    T::SIGNED
}

/// `p2pcheck_pair_result`'s fields in the library: name, offset, size, signedness.
fn rust_fields() -> Vec<(&'static str, usize, usize, bool)> {
    use std::mem::{offset_of, size_of_val};
    let r = PairResult::default();
    macro_rules! field {
        ($f:ident) => {
            (
                stringify!($f),
                offset_of!(PairResult, $f),
                size_of_val(&r.$f),
                signed(&r.$f),
            )
        };
    }
    vec![
        field!(src),
        field!(tgt),
        field!(ok),
        field!(verdict),
        field!(copy),
        field!(kernel),
        field!(handshake),
        field!(failed_tier),
        field!(diagnosis),
        field!(attempts),
        field!(driver_claim),
        field!(persistable),
    ]
}

/// What the header declares: enum type names, `NAME = value` constants, and the struct's
/// fields with the offsets its comments state.
struct Declared {
    enums: Vec<String>,
    constants: Vec<(String, i64)>,
    fields: Vec<(String, usize)>,
}

fn parse_header(h: &str) -> Declared {
    let mut d = Declared {
        enums: Vec::new(),
        constants: Vec::new(),
        fields: Vec::new(),
    };
    let mut in_struct = false;
    for line in h.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("typedef enum ") {
            d.enums.push(rest.trim_end_matches(" {").to_string());
        } else if t.starts_with("P2PCHECK_") && t.contains(" = ") {
            let (name, value) = t.trim_end_matches(',').split_once(" = ").unwrap();
            d.constants.push((
                name.to_string(),
                value.parse().unwrap_or_else(|_| panic!("{t}")),
            ));
        } else if t == "typedef struct p2pcheck_pair_result {" {
            in_struct = true;
        } else if t.starts_with('}') {
            in_struct = false;
        } else if in_struct {
            // "uint32_t src;         /* offset  0: ..."
            let (decl, comment) = t.split_once("/* offset").unwrap_or_else(|| panic!("{t}"));
            let name = decl
                .split_whitespace()
                .nth(1)
                .unwrap()
                .trim_end_matches(';');
            let offset = comment.split(':').next().unwrap().trim().parse().unwrap();
            d.fields.push((name.to_string(), offset));
        }
    }
    d
}

/// A C/C++ program printing what the compiler makes of every declaration of the header.
fn layout_program(d: &Declared) -> String {
    let mut c = String::from(
        "#include \"p2pcheck.h\"\n#include <stddef.h>\n#include <stdio.h>\n\
         #ifdef __cplusplus\n#define ALIGNOF(t) alignof(t)\n#else\n#define ALIGNOF(t) _Alignof(t)\n\
         #endif\nint main(void) {\n    p2pcheck_pair_result v;\n",
    );
    c += "    printf(\"struct %zu %zu\\n\", sizeof(p2pcheck_pair_result), \
          (size_t)ALIGNOF(p2pcheck_pair_result));\n";
    for e in &d.enums {
        c += &format!("    printf(\"enum {e} %zu %zu\\n\", sizeof({e}), (size_t)ALIGNOF({e}));\n");
    }
    for (name, _) in &d.constants {
        c += &format!("    printf(\"const {name} %lld\\n\", (long long){name});\n");
    }
    for (f, _) in &d.fields {
        c += &format!(
            "    v.{f} = 0;\n    v.{f}--;\n    printf(\"field {f} %zu %zu %d\\n\", \
             offsetof(p2pcheck_pair_result, {f}), sizeof v.{f}, v.{f} < 1);\n"
        );
    }
    c + "    return 0;\n}\n"
}

#[test]
fn the_headers_constants_and_layout_are_the_librarys_in_c_and_cpp() {
    let h = header_text();
    let declared = parse_header(&h);
    // The header declares exactly the library's constants, with its values, in its comments
    // the library's offsets.
    let rust: Vec<(String, i64)> = rust_constants()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    assert_eq!(declared.constants, rust);
    let enums: Vec<&str> = rust_enums().iter().map(|e| e.0).collect();
    assert_eq!(declared.enums, enums);
    let fields: Vec<(String, usize)> = rust_fields()
        .iter()
        .map(|f| (f.0.to_string(), f.1))
        .collect();
    assert_eq!(declared.fields, fields);
    let layout = format!(
        " * {} bytes, alignment {}, no padding",
        std::mem::size_of::<PairResult>(),
        std::mem::align_of::<PairResult>()
    );
    assert!(h.contains(&layout), "the header states {layout:?}");

    // And the compilers agree: C and C++.
    let mut expected = vec![format!(
        "struct {} {}",
        std::mem::size_of::<PairResult>(),
        std::mem::align_of::<PairResult>()
    )];
    expected.extend(
        rust_enums()
            .iter()
            .map(|(n, size, align)| format!("enum {n} {size} {align}")),
    );
    expected.extend(
        rust_constants()
            .iter()
            .map(|(n, v)| format!("const {n} {v}")),
    );
    expected.extend(rust_fields().iter().map(|(n, offset, size, signed)| {
        format!("field {n} {offset} {size} {}", i32::from(*signed))
    }));
    let dir = TempDir::new("p2pcheck-capi-layout");
    let source = dir.path().join("layout.c");
    fs::write(&source, layout_program(&declared)).unwrap();
    let include = format!("-I{}", root("include").display());
    for (compiler, lang, std) in [("cc", "c", "-std=c11"), ("c++", "c++", "-std=c++11")] {
        let exe = dir.path().join(format!("layout-{lang}"));
        let mut args = strings(&[std, "-Wall", "-Wextra", "-Werror", "-x", lang]);
        args.push(source.display().to_string());
        args.push(include.clone());
        compile(compiler, &args, &exe);
        let out = run(&mut Command::new(&exe), Duration::from_secs(30));
        assert!(out.status.success());
        let lines: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
        assert_eq!(lines, expected, "{compiler}");
    }
}

/// The functions a library exports (defined, global, named `p2pcheck_*`) and whether it
/// exports anything else: `nm` lines.
fn exported(args: &[&str], lib: &Path) -> (BTreeSet<String>, Vec<String>) {
    let out = Command::new("nm").args(args).arg(lib).output().unwrap();
    assert!(out.status.success(), "nm: {}", text(&out.stderr));
    let mut ours = BTreeSet::new();
    let mut others = Vec::new();
    for line in text(&out.stdout).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, kind, name] = fields[..] else {
            continue;
        };
        if name.starts_with("p2pcheck_") {
            assert_eq!(kind, "T", "{line}");
            ours.insert(name.to_string());
        } else {
            others.push(line.to_string());
        }
    }
    (ours, others)
}

/// The C shim's functions (`csrc/shim.c`): in the static library under the library's prefix,
/// never exported from the shared one.
const SHIM_FUNCTIONS: [&str; 5] = [
    "p2pcheck_shim_chase",
    "p2pcheck_shim_handshake",
    "p2pcheck_shim_pattern_check",
    "p2pcheck_shim_pattern_store",
    "p2pcheck_shim_timed_copy",
];

/// Whether a global symbol of the static library, not named `p2pcheck_*`, belongs to the Rust
/// runtime: a Rust-mangled name (`_ZN...`, `_R...`), a name C reserves to the implementation
/// (`__...`, `_` and a capital: compiler-builtins, `__rust_*`), one that is no C identifier
/// at all (`DW.ref.rust_eh_personality`), or the personality routine `rust_eh_personality`.
fn rust_runtimes(name: &str) -> bool {
    let reserved = name.starts_with("__")
        || (name.starts_with('_') && name[1..].starts_with(|c: char| c.is_ascii_uppercase()));
    let identifier = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    reserved || !identifier || name == "rust_eh_personality"
}

/// The header without its comments, each comment character replaced by a space (lines kept).
fn code_of(h: &str) -> String {
    let mut out = String::with_capacity(h.len());
    let mut rest = h;
    while let Some(start) = rest.find("/*") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("*/").expect("an unterminated comment") + start + 2;
        out.extend(
            rest[start..end]
                .chars()
                .map(|c| if c == '\n' { '\n' } else { ' ' }),
        );
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Functions the header declares (a `p2pcheck_*` name followed by `(` outside comments), each
/// with whether a comment ends on the line right before its declaration.
fn declared_functions(h: &str) -> Vec<(String, bool)> {
    let code = code_of(h);
    let original: Vec<&str> = h.lines().collect();
    let mut out = Vec::new();
    for (i, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("p2pcheck_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            if rest.starts_with('(') {
                let documented = i > 0 && original[i - 1].trim_end().ends_with("*/");
                out.push((name, documented));
            }
        }
    }
    out
}

#[test]
fn every_exported_function_is_declared_documented_and_called() {
    let h = header_text();
    let declared = declared_functions(&h);
    let undocumented: Vec<&String> = declared.iter().filter(|d| !d.1).map(|d| &d.0).collect();
    assert!(
        undocumented.is_empty(),
        "no comment right before: {undocumented:?}"
    );
    let names: BTreeSet<String> = declared.into_iter().map(|d| d.0).collect();
    assert_eq!(names.len(), 43, "{names:?}");

    let (shared, others) = exported(&["-D", "--defined-only"], &shared_lib());
    assert_eq!(shared, names, "exported by the shared library vs declared");
    assert!(
        others.is_empty(),
        "the shared library exports more: {others:?}"
    );
    let (archive, _) = exported(&["--defined-only", "-g"], &static_lib());
    let mut expected = names.clone();
    expected.extend(SHIM_FUNCTIONS.iter().map(|s| s.to_string()));
    assert_eq!(
        archive, expected,
        "defined by the static library vs declared"
    );

    let c_test = fs::read_to_string(root("capi/tests/c/capi_test.c")).unwrap();
    let uncalled: Vec<&String> = names
        .iter()
        .filter(|n| !c_test.contains(&format!("{n}(")))
        .collect();
    assert!(
        uncalled.is_empty(),
        "capi/tests/c/capi_test.c never calls {uncalled:?}"
    );
}

#[test]
fn the_static_library_exports_no_c_name_without_the_prefix() {
    // A host defining p2pc_handshake, say, links: every global the archive defines is named
    // p2pcheck_*, or belongs to the Rust runtime.
    let (ours, others) = exported(&["--defined-only", "-g"], &static_lib());
    let unprefixed: Vec<&String> = others
        .iter()
        .filter(|line| {
            let name = line.split_whitespace().last().unwrap_or_default();
            !rust_runtimes(name)
        })
        .collect();
    assert!(unprefixed.is_empty(), "{unprefixed:?}");
    for shim in SHIM_FUNCTIONS {
        assert!(ours.contains(shim), "{shim} in {ours:?}");
    }
    // The classifier itself: what it lets through and what it does not.
    for runtime in [
        "_ZN4core3fmt5write17h",
        "__udivti3",
        "_Unwind_Resume",
        "DW.ref.x",
    ] {
        assert!(rust_runtimes(runtime), "{runtime}");
    }
    for host in ["p2pc_handshake", "main", "handshake", "_x"] {
        assert!(!rust_runtimes(host), "{host}");
    }

    // And so it links: a C program that defines the shim's old names itself.
    let dir = TempDir::new("p2pcheck-capi-names");
    let source = dir.path().join("names.c");
    fs::write(
        &source,
        "#include \"p2pcheck.h\"\n#include <stdio.h>\n\
         int p2pc_handshake(void) { return 1; }\nint p2pc_pattern_check(void) { return 2; }\n\
         int p2pc_pattern_store(void) { return 3; }\n\
         int main(void) {\n    printf(\"%s %d\\n\", p2pcheck_version(), \
         p2pc_handshake() + p2pc_pattern_check() + p2pc_pattern_store());\n    return 0;\n}\n",
    )
    .unwrap();
    let mut args = strings(&C_FLAGS);
    args.push(source.display().to_string());
    args.push(format!("-I{}", root("include").display()));
    args.push(static_lib().display().to_string());
    args.extend(strings(&NATIVE_STATIC_LIBS));
    let exe = dir.path().join("names");
    compile("cc", &args, &exe);
    let out = run(&mut program(&exe), Duration::from_secs(30));
    assert_eq!(
        text(&out.stdout),
        format!("{} 6\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_shared_library_has_its_soname() {
    let out = Command::new("readelf")
        .arg("-d")
        .arg(shared_lib())
        .output()
        .unwrap();
    assert!(out.status.success());
    let dynamic = text(&out.stdout);
    let sonames: Vec<&str> = dynamic.lines().filter(|l| l.contains("(SONAME)")).collect();
    assert_eq!(sonames.len(), 1, "{dynamic}");
    assert!(
        sonames[0].ends_with("Library soname: [libp2pcheck.so.0]"),
        "{}",
        sonames[0]
    );
}

#[test]
fn pkg_config_cmake_and_the_header_name_the_same_system_libraries() {
    let dir = TempDir::new("p2pcheck-capi-pc");
    let (prefix, _) = install(dir.path());
    // The layout the header documents.
    for file in [
        "include/p2pcheck.h",
        "lib/libp2pcheck.a",
        "lib/libp2pcheck.so.0",
        "bin/p2pcheck-worker",
    ] {
        assert!(prefix.join(file).is_file(), "{file}");
    }
    assert_eq!(
        fs::read_link(prefix.join("lib/libp2pcheck.so")).unwrap(),
        Path::new("libp2pcheck.so.0")
    );
    let pc = fs::read_to_string(prefix.join("lib/pkgconfig/p2pcheck.pc")).unwrap();
    assert_eq!(
        pc,
        format!(
            "prefix={}\nexec_prefix=${{prefix}}\nlibdir=${{exec_prefix}}/lib\n\
             includedir=${{prefix}}/include\n\nName: p2pcheck\nDescription: Proves which NVIDIA \
             GPU pairs can reach each other's memory across processes (vLLM-compatible P2P \
             check)\nVersion: {}\nLibs: ${{libdir}}/libp2pcheck.a\nLibs.private: {}\n\
             Cflags: -I${{includedir}}\n",
            prefix.display(),
            env!("CARGO_PKG_VERSION"),
            NATIVE_STATIC_LIBS.join(" ")
        )
    );
    // Without --static too, the static library (and no system library beside it).
    if let Some(libs) = pkg_config(&prefix, &["--libs"]) {
        assert_eq!(libs, format!("{}/lib/libp2pcheck.a", prefix.display()));
    }
    let usage = Command::new("sh")
        .arg(root("scripts/install.sh"))
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(text(&usage.stderr).contains("usage:"));
    let usage = Command::new("sh")
        .arg(root("scripts/gen-pkgconfig.sh"))
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(text(&usage.stderr).contains("usage:"));

    // The CMake snippet links exactly these libraries.
    let cmake = fs::read_to_string(root("examples/cmake/CMakeLists.txt")).unwrap();
    let names: Vec<&str> = NATIVE_STATIC_LIBS
        .iter()
        .map(|l| l.trim_start_matches("-l"))
        .collect();
    let line = format!("INTERFACE_LINK_LIBRARIES \"{}\")", names.join(";"));
    assert_eq!(
        cmake.matches("INTERFACE_LINK_LIBRARIES").count(),
        1,
        "{cmake}"
    );
    assert!(cmake.contains(&line), "{line} in {cmake}");
    // The header and the README say so too.
    let list = NATIVE_STATIC_LIBS.join(" ");
    assert!(header_text().contains(&format!(" {list}\n")));
    assert!(fs::read_to_string(root("README.md"))
        .unwrap()
        .contains(&list));
}

// ---- The C test program ---------------------------------------------------------------------

/// What a line's value must be.
enum Expect {
    Is(String),
    Test(&'static str, Box<dyn Fn(&str) -> bool>),
}

/// The lines a program must print, in order.
#[derive(Default)]
struct Lines(Vec<(String, Expect)>);

impl Lines {
    fn is(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.push((key.into(), Expect::Is(value.into())));
    }

    fn test(
        &mut self,
        key: impl Into<String>,
        what: &'static str,
        f: impl Fn(&str) -> bool + 'static,
    ) {
        self.0.push((key.into(), Expect::Test(what, Box::new(f))));
    }

    /// A status line alone.
    fn status(&mut self, key: &str, s: Status) {
        self.is(key, (s as i32).to_string());
    }

    /// A status and the message the call wrote.
    fn msg(&mut self, key: &str, s: Status, msg: impl Into<String>) {
        self.status(key, s);
        self.is(format!("{key}.msg"), msg);
    }

    /// Success, with an empty message.
    fn ok(&mut self, key: &str) {
        self.msg(key, Status::Ok, "");
    }

    /// Asserts `output` is these lines, key by key and value by value.
    fn assert(&self, output: &str) {
        let actual: Vec<(&str, &str)> = output
            .lines()
            .map(|l| l.split_once(": ").unwrap_or((l, "")))
            .collect();
        let keys: Vec<&str> = actual.iter().map(|a| a.0).collect();
        let wanted: Vec<&str> = self.0.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(keys, wanted, "the lines printed; output:\n{output}");
        for ((key, value), (_, expect)) in actual.iter().zip(&self.0) {
            match expect {
                Expect::Is(v) => assert_eq!(value, v, "{key}"),
                Expect::Test(what, f) => assert!(f(value), "{key}: {value:?} is not {what}"),
            }
        }
    }
}

/// `output`'s value for `key`.
fn value<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
        .unwrap_or_else(|| panic!("no {key} in the output"))
}

/// Machine `n` GPUs where only `broken` (a `drop-writes` fault) fails: the lines
/// `print_report` prints, at `level`.
fn report_lines(e: &mut Lines, key: &str, n: u32, broken: (u32, u32), level: LevelCode) {
    e.status(&format!("{key}.device_count"), Status::Ok);
    e.is(format!("{key}.devices"), n.to_string());
    e.status(&format!("{key}.pair_count"), Status::Ok);
    e.is(format!("{key}.pairs"), (n * n).to_string());
    let ran = |tier: LevelCode, result: TierCode| {
        if level as i32 >= tier as i32 {
            result as i32
        } else {
            TierCode::NotRun as i32
        }
    };
    for i in 0..n * n {
        let (src, tgt) = (i / n, i % n);
        let fails = (src, tgt) == broken;
        let result = if fails {
            TierCode::Failed
        } else {
            TierCode::Ok
        };
        e.is(
            format!("{key}.pair.{i}"),
            format!(
                "{src}->{tgt} ok={} verdict={} copy={} kernel={} handshake={} failed_tier={} \
                 diagnosis={} attempts={} claim={} persistable=1",
                i32::from(!fails),
                if fails {
                    VerdictCode::Fails
                } else {
                    VerdictCode::Ok
                } as i32,
                result as i32,
                ran(LevelCode::Kernel, result),
                ran(LevelCode::Handshake, result),
                if fails {
                    LevelCode::Copy
                } else {
                    LevelCode::None
                } as i32,
                if fails {
                    ClassCode::NeverWritten
                } else {
                    ClassCode::None
                } as i32,
                // A failure is confirmed on fresh workers.
                if fails { 2 } else { 1 },
                // The driver's claim: asked where the consumer sees both GPUs, i.e. same-GPU
                // pairs with single-GPU visibility.
                if src == tgt { 1 } else { -1 },
            ),
        );
        if fails {
            let handshake = level == LevelCode::Handshake;
            e.test(
                format!("{key}.details.{i}"),
                "the copy, kernel (and handshake) tiers' failures",
                move |v| drop_writes_details(v, handshake),
            );
        } else {
            e.is(format!("{key}.details.{i}"), "");
        }
    }
}

/// The details of a `drop-writes` pair (newlines written `\n`): both sides' copy read-backs,
/// never-written; the kernel tier's; the handshake's timeout when it ran.
fn drop_writes_details(v: &str, handshake: bool) -> bool {
    let never = format!(
        "[{}: {}]",
        Class::NeverWritten.name(),
        Class::NeverWritten.hint()
    );
    let copy = |side: &str| {
        format!(
            "copy tier, {side}: copy read-back: 1024 of 1024 bytes wrong, first at byte 0 (0x01, \
             expected 0x02), 1024 of them still the old contents {never}"
        )
    };
    let lines: Vec<&str> = v.split("\\n").collect();
    // Then the first attempt, the same, and what that makes of it.
    let confirmed = [
        "first attempt: fails at the copy tier (never-written)",
        p2pcheck::Evidence::Confirmed.describe(),
    ];
    lines.len() == 5 + usize::from(handshake)
        && lines[lines.len() - 2..] == confirmed
        && lines[0] == copy("producer")
        && lines[1] == copy("consumer")
        && lines[2].starts_with("kernel tier: peer SM stores, as the owner sees them (1-byte accesses): ")
        && lines[2].ends_with(&never)
        && (!handshake
            || (lines[3].starts_with(
                "handshake tier: handshake: 0 of 16 rounds, then no flag from the other kernel within ",
            ) && lines[3].ends_with(&format!(
                "[{}: {}]",
                Class::Timeout.name(),
                Class::Timeout.hint()
            ))))
}

fn device_error(src: u32, tgt: u32) -> String {
    format!(
        "pair {src}->{tgt} names a device this process cannot see: 4 visible \
         (CUDA_VISIBLE_DEVICES=<unset>)"
    )
}

const EMPTY_DIR: &str =
    "cache_dir is empty: name a folder (\".\" for the current one), or NULL for vLLM's";

/// Every line `capi_test main DIR` prints.
fn main_lines(dir: &Path) -> Lines {
    use Status::*;
    let mut e = Lines::default();
    e.is("version", env!("CARGO_PKG_VERSION"));
    e.is("protocol", p2pcheck::PROTOCOL_VERSION.to_string());
    for s in -1..=16 {
        let text = Status::ALL
            .iter()
            .find(|x| **x as i32 == s)
            .map_or("unknown status", |x| x.text().to_str().unwrap());
        e.is(format!("status_text.{s}"), text);
    }
    for c in -1..=7 {
        let (name, hint) = match ClassCode::ALL.iter().find(|x| **x as i32 == c) {
            None => ("", ""),
            Some(code) => code.class().map_or(("none", ""), |k| (k.name(), k.hint())),
        };
        e.is(format!("class_name.{c}"), name);
        e.is(format!("class_hint.{c}"), hint);
    }
    e.is("options_new", "non-null");
    e.msg("set_engine.null", NullArgument, "opts is NULL");
    e.msg(
        "set_engine.7",
        InvalidArgument,
        "engine 7: P2PCHECK_ENGINE_PARALLEL (0) or P2PCHECK_ENGINE_VLLM (1)",
    );
    e.ok("set_engine.vllm");
    e.ok("set_engine.parallel");
    for (key, level) in [("set_level.3", 3), ("set_level.none", -1)] {
        e.msg(
            key,
            InvalidArgument,
            format!(
                "level {level}: P2PCHECK_LEVEL_COPY (0), P2PCHECK_LEVEL_KERNEL (1) or \
                 P2PCHECK_LEVEL_HANDSHAKE (2)"
            ),
        );
    }
    e.ok("set_level.handshake");
    e.msg(
        "set_visibility.2",
        InvalidArgument,
        "visibility 2: P2PCHECK_VISIBILITY_ONE (0) or P2PCHECK_VISIBILITY_ALL (1)",
    );
    e.ok("set_visibility.all");
    e.ok("set_visibility.one");
    e.msg(
        "set_transport.3",
        InvalidArgument,
        "transport 3: P2PCHECK_TRANSPORTS_IPC (0), P2PCHECK_TRANSPORTS_CUMEM (1) or \
         P2PCHECK_TRANSPORTS_ALL (2)",
    );
    e.ok("set_transport.ipc");
    e.msg(
        "set_timeouts.day_and_1ms",
        InvalidArgument,
        "the step timeout 86400.001s is outside 1 ms to 1 day",
    );
    e.ok("set_timeouts");
    e.ok("set_timeouts.keep");
    e.msg(
        "set_kernel_bytes.1000",
        InvalidArgument,
        "kernel tier bytes 1000: must be a multiple of 256 KiB from 256 KiB to 1 GiB",
    );
    e.ok("set_kernel_bytes");
    e.msg(
        "set_worker.empty",
        InvalidArgument,
        "the worker path is empty: give a path, or NULL to search",
    );
    e.msg(
        "set_simulation.no_gpus",
        InvalidArgument,
        "faults without simulated GPUs: give their number",
    );
    let kinds: Vec<&str> = p2pcheck::sim::FaultKind::ALL
        .iter()
        .map(|k| k.name())
        .collect();
    e.msg(
        "set_simulation.melt",
        InvalidArgument,
        format!(
            "fault \"0->1:melt\": unknown kind \"melt\" (one of {})",
            kinds.join(", ")
        ),
    );
    e.msg(
        "set_simulation.gpu9",
        InvalidArgument,
        "fault 9->0:hang: the simulated machine has GPUs 0..4",
    );
    e.msg(
        "set_simulation.65",
        InvalidArgument,
        "65 simulated GPUs: at most 64",
    );
    e.ok("set_simulation.off");
    let invalid = InvalidArgument as i32;
    // 14 bytes hold 13 and the NUL; the 13th is the first of the 2-byte "é": 12 are written.
    e.is("cut.utf8", format!("{invalid} 12 fault \"0->1:"));
    e.is("cut.ascii", format!("{invalid} 9 fault \"0-"));
    e.is("cut.one", format!("{invalid} 0"));
    e.is("cut.zero", format!("{invalid} X"));
    e.status("cut.null", InvalidArgument);
    e.ok("set_simulation");
    e.ok("set_worker.missing");
    e.msg(
        "check.worker_missing",
        Worker,
        "worker (from options): /nonexistent/p2pcheck-worker: No such file or directory (os \
         error 2)",
    );
    e.is("check.worker_missing.out", "null");
    e.ok("set_worker.search");

    e.ok("check");
    report_lines(&mut e, "report", 4, (0, 1), LevelCode::Handshake);
    e.status("report.answer_seconds", Ok);
    e.is("report.answer_positive", "1");
    e.status("report.restarts", Ok);
    // The failing pair's second attempt, on fresh workers.
    e.is("report.restarts.value", "1");
    e.status("report.workers_started", Ok);
    // One per GPU and a second on each, for the same-GPU pairs; then the failing pair's two.
    e.is("report.workers_started.value", "10");
    e.status("report.warning_count", Ok);
    e.is("report.warning_count.value", "0");
    e.status("report.warning.0", InvalidArgument);
    e.status("report.pair.16", InvalidArgument);
    e.status("report.pair_transport.0", Ok);
    e.is("report.pair_transport.0.value", "0");
    e.status("report.pair_transport.16", InvalidArgument);
    for key in [
        "report.pair_transport.null_out",
        "report.pair.null_out",
        "report.pair.null_report",
        "report.device_count.null",
        "report.device_count.null_out",
        "report.pair_count.null",
        "report.answer_seconds.null",
        "report.restarts.null",
        "report.workers_started.null",
        "report.warning_count.null",
        "report.warning.null",
    ] {
        e.status(key, NullArgument);
    }
    // Cross-checked with the details' length below.
    e.test("details.small", "11, 15, N, 15 bytes", |v| {
        v.starts_with("11 15 ") && v.ends_with(" copy tier, prod")
    });
    e.test("details.query", "11 N", |v| v.starts_with("11 "));
    e.test("details.exact", "0 N N", |v| v.starts_with("0 "));
    e.test("details.one_short", "11 N-1", |v| v.starts_with("11 "));
    e.status("details.null_buf", NullArgument);
    e.status("details.16", InvalidArgument);
    e.is("details.ok_pair", "0 0 ''");
    e.status("details.null_report", NullArgument);

    e.msg("check.device9", InvalidArgument, device_error(9, 0));
    e.is("check.device9.out", "null");
    e.msg("check.null_src", NullArgument, "src is NULL");
    e.msg("check.null_tgt", NullArgument, "tgt is NULL");
    e.msg("check.null_out", NullArgument, "out is NULL");
    e.msg(
        "check.too_many",
        InvalidArgument,
        "65537 pairs: at most 65536 (every ordered pair of 256 devices)",
    );
    e.ok("set_level.kernel");

    e.ok("can");
    e.is("can.results", "0 1 1");
    e.ok("can.empty");
    e.msg("can.null_results", NullArgument, "results is NULL");
    e.msg("can.null_src", NullArgument, "src is NULL");
    e.msg("can.device7", InvalidArgument, device_error(0, 7));

    e.ok("access.0_1");
    e.is("access.0_1.answer", "0");
    e.ok("access.1_0");
    e.is("access.1_0.answer", "1");
    e.msg(
        "access.9_0",
        InvalidArgument,
        "device 9->0 out of range: 4 devices are visible",
    );
    e.msg("access.empty_dir", InvalidArgument, EMPTY_DIR);
    e.msg("access.null_result", NullArgument, "result is NULL");
    let path = dir.join("gpu_p2p_access_cache_for_0,1,2,3.json");
    let path = path.display().to_string();
    e.ok("cache_path");
    e.is("cache_path.value", path.clone());
    e.is("cache_path.needed", "1");
    e.msg(
        "cache_path.small",
        BufferTooSmall,
        format!("{} bytes and a NUL do not fit in 10", path.len()),
    );
    e.is("cache_path.small.value", "9 1");
    e.msg("cache_path.0", InvalidArgument, "0 devices: from 1 to 256");
    e.msg(
        "cache_path.257",
        InvalidArgument,
        "257 devices: from 1 to 256",
    );
    e.msg("cache_path.empty_dir", InvalidArgument, EMPTY_DIR);
    e.msg(
        "cache_path.null_buf",
        NullArgument,
        "buf (with a nonzero len) is NULL",
    );

    e.ok("start");
    e.msg("try_wait.running", NotReady, "the check is still running");
    e.is("try_wait.running.out", "null");
    e.status("try_wait.null_out", NullArgument);
    e.msg("wait_ms.running", NotReady, "the check is still running");
    e.is("wait_ms.running.out", "null");
    e.ok("wait");
    report_lines(&mut e, "background", 4, (0, 1), LevelCode::Kernel);
    // The result is kept: every wait gives a new copy of it, the same report.
    e.ok("try_wait.again");
    e.ok("wait_ms.again");
    e.is("again.new", "1 1");
    report_lines(&mut e, "again", 4, (0, 1), LevelCode::Kernel);
    e.ok("wait.again");
    // A cancel after the result changes nothing.
    e.status("cancel.finished", Ok);
    e.ok("wait.after_cancel");
    e.status("wait_ms.null_out", NullArgument);
    e.is("pending_free", "done");
    e.ok("start.cancel");
    e.status("cancel", Ok);
    e.msg("wait.cancelled", Cancelled, "the check was cancelled");
    e.is("wait.cancelled.out", "null");
    e.msg("try_wait.cancelled", Cancelled, "the check was cancelled");
    e.status("cancel.again", Ok);
    // A check's error is kept too: every wait gives it again.
    e.ok("start.device9");
    e.msg("wait.device9", InvalidArgument, device_error(9, 0));
    e.msg("wait.device9.again", InvalidArgument, device_error(9, 0));
    e.msg("try_wait.device9", InvalidArgument, device_error(9, 0));
    e.ok("start.unwaited");
    e.is("pending_free.unwaited", "done");
    e.msg("start.null_src", NullArgument, "src is NULL");
    e.is("start.null_src.out", "null");
    e.msg("start.null_out", NullArgument, "out is NULL");
    e.msg("try_wait.null", NullArgument, "pending is NULL");
    e.msg("wait.null", NullArgument, "pending is NULL");
    e.msg("wait_ms.null", NullArgument, "pending is NULL");
    e.status("cancel.null", NullArgument);

    // The bandwidth measurement: 0->1 through the host is slow, 1->0 over the simulated
    // NVLink is not; both judged against the simulated link's floor.
    e.is(
        "bw.layout",
        format!(
            "{} {} {} {} {}",
            std::mem::size_of::<BandwidthResult>(),
            std::mem::align_of::<BandwidthResult>(),
            std::mem::offset_of!(BandwidthResult, floor_gbps),
            std::mem::offset_of!(BandwidthResult, cv),
            std::mem::offset_of!(BandwidthResult, latency_ns)
        ),
    );
    e.msg("set_bandwidth.null", NullArgument, "opts is NULL");
    e.msg(
        "set_bandwidth.1000",
        InvalidArgument,
        "bandwidth transfer bytes 1000: must be a multiple of 2 MiB from 2 MiB to 512 MiB",
    );
    e.ok("bw.set_simulation");
    e.ok("bw.set_timeouts");
    e.ok("set_bandwidth");
    e.ok("bw.check");
    e.status("bw.pair.0", Ok);
    e.is(
        "bw.pair.0.value",
        "state=1 slow=1 floor=270.0 ce_write=20 ce_read=20 sm_both=40 cv=1 latency=1",
    );
    e.status("bw.pair.1", Ok);
    e.is(
        "bw.pair.1.value",
        "state=1 slow=0 floor=270.0 ce_write=370 ce_read=370 sm_both=740 cv=1 latency=1",
    );
    e.status("bw.pair.2", InvalidArgument);
    e.status("bw.pair.null_out", NullArgument);
    e.status("bw.pair.null_report", NullArgument);

    let on = PolicyConfig {
        batch_invariant: false,
        symm_mem_enabled: true,
    };
    let should = |ws, bytes, config: PolicyConfig| {
        i32::from(policy::should_nccl_symm_mem_allreduce(ws, bytes, &config)).to_string()
    };
    e.is("should.8_64k", should(8, 65536, on));
    e.is("should.8_1m", should(8, 1 << 20, on));
    e.is(
        "should.8_1m_invariant",
        should(
            8,
            1 << 20,
            PolicyConfig {
                batch_invariant: true,
                symm_mem_enabled: true,
            },
        ),
    );
    e.is(
        "should.8_1m_disabled",
        should(8, 1 << 20, PolicyConfig::default()),
    );
    e.is("should.2_1m", should(2, 1 << 20, on));
    e.is("should.4_16k", should(4, 16384, on));
    e.is("should.4_32k", should(4, 32768, on));
    e.is("should.16_1k", should(16, 1024, on));
    let cc = ComputeCapability::new;
    e.status("custom.9_0_8", Ok);
    e.is(
        "custom.9_0_8.value",
        policy::custom_allreduce_max_size(cc(9, 0), 8)
            .unwrap()
            .to_string(),
    );
    e.status("custom.10_3_6", Ok);
    e.is(
        "custom.10_3_6.value",
        policy::custom_allreduce_max_size(cc(10, 3), 6)
            .unwrap()
            .to_string(),
    );
    assert_eq!(policy::custom_allreduce_max_size(cc(9, 0), 3), None);
    e.status("custom.9_0_3", NotFound);
    e.status("custom.null", NullArgument);
    e.status("symm.10_0_6", Ok);
    e.is(
        "symm.10_0_6.value",
        policy::symm_mem_max_size(cc(10, 0), 6).unwrap().to_string(),
    );
    assert_eq!(policy::symm_mem_max_size(cc(7, 5), 8), None);
    e.status("symm.7_5_8", NotFound);
    e.status("symm.null", NullArgument);
    e.ok("policy_env");
    e.is("policy_env.value", "0 1");
    e.msg(
        "policy_env.bad",
        InvalidArgument,
        "VLLM_BATCH_INVARIANT is \"maybe\": expected 1, true, 0 or false (case-insensitive)",
    );
    e.msg("policy_env.null", NullArgument, "batch_invariant is NULL");
    e.is("free_null", "done");
    e
}

/// Runs `capi_test main` and `capi_test warm` (`exe`, with `env`) and asserts every line,
/// vLLM's cache file and the fingerprint beside it.
fn run_main_and_warm(exe: &Path, dir: &Path, env: &[(&str, &str)]) {
    let cache = dir.join("cache");
    let mut cmd = program(exe);
    cmd.arg("main")
        .arg(&cache)
        .env("VLLM_USE_NCCL_SYMM_MEM", "1")
        .envs(env.iter().copied());
    let out = run(&mut cmd, Duration::from_secs(120));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    main_lines(&cache).assert(&stdout);
    // The details' length, every way it is told.
    let details = value(&stdout, "report.details.1").replace("\\n", "\n");
    let n = details.len();
    assert_eq!(
        value(&stdout, "details.small"),
        format!("11 15 {n} copy tier, prod")
    );
    assert_eq!(value(&stdout, "details.query"), format!("11 {n}"));
    assert_eq!(value(&stdout, "details.exact"), format!("0 {n} {n}"));
    assert_eq!(value(&stdout, "details.one_short"), format!("11 {}", n - 1));

    // vLLM's cache file, as vLLM writes it, and p2pcheck's fingerprint beside it.
    let file = cache.join("gpu_p2p_access_cache_for_0,1,2,3.json");
    let entries: Vec<String> = (0..16)
        .map(|i| format!("    \"{}->{}\": {}", i / 4, i % 4, i != 1))
        .collect();
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        format!("{{\n{}\n}}", entries.join(",\n"))
    );
    let fingerprint = fs::read_to_string(
        cache.join(".gpu_p2p_access_cache_for_0,1,2,3.json.p2pcheck-fingerprint"),
    )
    .unwrap();
    assert!(fingerprint.contains("\nlevel=kernel\n"), "{fingerprint}");
    assert!(
        fingerprint.contains("\ngpu=3 GPU-51a00000-0000-0000-0000-000000000003 "),
        "{fingerprint}"
    );

    // A fresh process answers from it with no worker at all; a refresh needs one.
    let mut cmd = program(exe);
    cmd.arg("warm").arg(&cache).envs(env.iter().copied());
    let out = run(&mut cmd, Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut e = Lines::default();
    e.ok("warm.sim");
    e.ok("warm.level");
    e.ok("warm.kernel_bytes");
    e.ok("warm.worker");
    e.ok("warm.0_1");
    e.is("warm.0_1.answer", "0");
    e.ok("warm.2_3");
    e.is("warm.2_3.answer", "1");
    e.msg(
        "warm.refresh",
        Status::Worker,
        "worker (from options): /nonexistent/p2pcheck-worker: No such file or directory (os \
         error 2)",
    );
    e.assert(&text(&out.stdout));
}

#[test]
fn a_c_program_linked_with_the_static_library_and_exactly_its_system_libraries() {
    let dir = TempDir::new("p2pcheck-capi-static");
    let mut args = strings(&C_FLAGS);
    args.push(root("capi/tests/c/capi_test.c").display().to_string());
    // Exactly the flags `pkg-config --cflags --static --libs p2pcheck` gives in the installed
    // layout, where the shared library sits beside the static one: the static library and
    // the system libraries, nothing else.
    let (prefix, flags) = install(dir.path());
    args.extend(flags);
    let exe = dir.path().join("capi_test");
    compile("cc", &args, &exe);
    // No dynamic dependency on libp2pcheck, as the linker recorded it and as the loader sees
    // it.
    let dynamic = dynamic_section(&exe);
    assert!(dynamic.contains("(NEEDED)"), "{dynamic}");
    assert!(!dynamic.contains("libp2pcheck"), "{dynamic}");
    match Command::new("ldd").arg(&exe).output() {
        Ok(out) => {
            assert!(out.status.success(), "{}", text(&out.stderr));
            let loaded = text(&out.stdout);
            assert!(loaded.contains("libc.so"), "{loaded}");
            assert!(!loaded.contains("libp2pcheck"), "{loaded}");
        }
        Err(e) => eprintln!("ldd not run: {e}"),
    }
    // Such a program finds the installed worker on $PATH.
    let bin = prefix.join("bin").display().to_string();
    run_main_and_warm(&exe, dir.path(), &[("PATH", bin.as_str())]);

    // The default options, on the simulator named by the environment, as a host would load it.
    let sim = dir.path().join("libsim.so");
    p2pcheck::sim::write_library(&sim).unwrap();
    let root_dir = dir.path().join("vllm-cache");
    let mut cmd = program(&exe);
    cmd.arg("env")
        .env("P2PCHECK_WORKER", worker())
        .env("P2PCHECK_LIBCUDA", &sim)
        .env("P2PCHECK_LIBCUDART", &sim)
        .env("P2PCHECK_SIM_GPUS", "2")
        .env("P2PCHECK_SIM_FAULTS", "1->0:drop-writes")
        .env("VLLM_CACHE_ROOT", &root_dir);
    let out = run(&mut cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut e = Lines::default();
    for (src, tgt) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
        e.ok(&format!("env.access.{src}_{tgt}"));
        e.is(
            format!("env.access.{src}_{tgt}.answer"),
            if (src, tgt) == (1, 0) { "0" } else { "1" },
        );
    }
    e.msg(
        "env.access.2_0",
        Status::InvalidArgument,
        "device 2->0 out of range: 2 devices are visible",
    );
    e.msg("env.access.null", Status::NullArgument, "result is NULL");
    e.ok("env.can");
    e.is("env.can.results", "0 1");
    e.ok("env.cache_path");
    let file = root_dir.join("gpu_p2p_access_cache_for_0,1.json");
    e.is("env.cache_path.value", file.display().to_string());
    // A batch of the broken pair: every worker sees both GPUs (with a warning saying why not
    // one each), so the consumer could ask the driver, which claims access.
    e.ok("env.check");
    e.status("env.report.device_count", Status::Ok);
    e.is("env.report.devices", "2");
    e.status("env.report.pair_count", Status::Ok);
    e.is("env.report.pairs", "1");
    let failed = TierCode::Failed as i32;
    e.is(
        "env.report.pair.0",
        format!(
            "1->0 ok=0 verdict={} copy={failed} kernel={failed} handshake={failed} failed_tier={} \
             diagnosis={} attempts=2 claim=1 persistable=1",
            VerdictCode::Fails as i32,
            LevelCode::Copy as i32,
            ClassCode::NeverWritten as i32
        ),
    );
    e.test("env.report.details.0", "drop-writes at every tier", |v| {
        drop_writes_details(v, true)
    });
    e.status("env.warning_count", Status::Ok);
    e.is("env.warning_count.value", "1");
    e.status("env.warning.0", Status::Ok);
    e.test("env.warning.0.value", "the visibility fallback", |v| {
        v.starts_with("1 each worker sees every GPU: ")
    });
    e.status("env.warning.small", Status::BufferTooSmall);
    e.is("env.warning.small.value", "each wo");
    e.assert(&text(&out.stdout));
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        "{\n    \"0->0\": true,\n    \"0->1\": true,\n    \"1->0\": false,\n    \"1->1\": true\n}"
    );
}

#[test]
fn a_c_program_linked_with_the_shared_library_finds_the_worker_beside_it() {
    let dir = TempDir::new("p2pcheck-capi-shared");
    let lib = dir.path().join("lib");
    install_shared(&lib);
    let mut args = strings(&C_FLAGS);
    args.push(root("capi/tests/c/capi_test.c").display().to_string());
    args.push(format!("-I{}", root("include").display()));
    args.push(format!("-L{}", lib.display()));
    args.push("-lp2pcheck".into());
    args.push(format!("-Wl,-rpath,{}", lib.display()));
    let exe = dir.path().join("capi_test");
    compile("cc", &args, &exe);
    let dynamic = text(
        &Command::new("readelf")
            .arg("-d")
            .arg(&exe)
            .output()
            .unwrap()
            .stdout,
    );
    assert!(
        dynamic.contains("Shared library: [libp2pcheck.so.0]"),
        "{dynamic}"
    );
    // No P2PCHECK_WORKER: the worker is found beside libp2pcheck.so.0.
    run_main_and_warm(&exe, dir.path(), &[]);
}

#[test]
fn the_headers_shared_link_lines_work_from_the_build_tree() {
    // The header's lines, run as they are in a tree laid out as cargo leaves it (the shared
    // library only as libp2pcheck_capi.so).
    let lines = [
        "ln -sf libp2pcheck_capi.so target/release/libp2pcheck.so.0",
        "cc prog.c -Iinclude target/release/libp2pcheck.so.0 -Wl,-rpath,\"$PWD/target/release\"",
    ];
    let h = header_text();
    let readme = fs::read_to_string(root("README.md")).unwrap();
    for line in lines {
        assert!(
            h.contains(&format!(" *     {line}\n")),
            "{line} in the header"
        );
        assert!(readme.contains(line), "{line} in the README");
    }
    let dir = TempDir::new("p2pcheck-capi-tree");
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("target")).unwrap();
    fs::rename(build_dir(dir.path()), tree.join("target/release")).unwrap();
    std::os::unix::fs::symlink(root("include"), tree.join("include")).unwrap();
    fs::write(
        tree.join("prog.c"),
        "#include \"p2pcheck.h\"\n#include <stdio.h>\n\
         int main(void) {\n    printf(\"%s\\n\", p2pcheck_version());\n    return 0;\n}\n",
    )
    .unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(lines.join(" && "))
        .current_dir(&tree)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let exe = tree.join("a.out");
    assert!(dynamic_section(&exe).contains("Shared library: [libp2pcheck.so.0]"));
    let out = run(&mut program(&exe), Duration::from_secs(30));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("{}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// `capi/tests/c/capi_process.c` linked with the static library as `dir/name`.
fn process_program(dir: &Path, name: &str) -> PathBuf {
    let mut args = strings(&C_FLAGS);
    args.push(root("capi/tests/c/capi_process.c").display().to_string());
    args.push(format!("-I{}", root("include").display()));
    args.push(static_lib().display().to_string());
    args.extend(strings(&NATIVE_STATIC_LIBS));
    let exe = dir.join(name);
    compile("cc", &args, &exe);
    exe
}

/// `output`'s value for `key`, as milliseconds.
fn millis(output: &str, key: &str) -> f64 {
    value(output, key)
        .parse()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

#[test]
fn a_wait_cancelled_from_another_thread_returns_cancelled_at_once() {
    let dir = TempDir::new("p2pcheck-capi-cancel");
    let exe = process_program(dir.path(), "capi_process");
    let mut cmd = program(&exe);
    cmd.arg("cancel").env("P2PCHECK_WORKER", worker());
    let out = run(&mut cmd, Duration::from_secs(120));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let cancelled = format!("{} the check was cancelled", Status::Cancelled as i32);
    let time = |v: &str| v.parse::<f64>().is_ok_and(|ms| ms >= 0.0);
    let mut e = Lines::default();
    e.ok("start");
    e.msg(
        "wait_ms.200",
        Status::NotReady,
        "the check is still running",
    );
    e.test("wait_ms.200.waited_ms", "a time", time);
    e.is("wait_ms.200.out", "null");
    e.is("cancel", "0");
    e.test("cancel.returned_ms", "a time", time);
    for i in 0..2 {
        e.is(format!("waiter.{i}"), cancelled.clone());
        e.is(format!("waiter.{i}.out"), "null");
        e.test(format!("waiter.{i}.after_cancel_ms"), "a time", time);
    }
    e.msg("wait.again", Status::Cancelled, "the check was cancelled");
    e.test("free_ms", "a time", time);
    e.assert(&stdout);
    // A bounded wait waited its time; the cancel did not block; both waits (one without a
    // limit, one of an hour) returned at once. The bounds are generous (a loaded machine):
    // they prove the waits end, the figures say how fast.
    let waited = millis(&stdout, "wait_ms.200.waited_ms");
    assert!((200.0..10_000.0).contains(&waited), "{waited} ms");
    let returned = millis(&stdout, "cancel.returned_ms");
    assert!(returned < 1_000.0, "the cancel took {returned} ms");
    for i in 0..2 {
        let after = millis(&stdout, &format!("waiter.{i}.after_cancel_ms"));
        assert!(after < 2_000.0, "waiter {i}: {after} ms after the cancel");
    }
    let free = millis(&stdout, "free_ms");
    assert!(free < 30_000.0, "the free took {free} ms");
    eprintln!(
        "cancel returned in {returned:.3} ms; the waits {:.3} and {:.3} ms after it; the free \
         (workers killed and reaped) {free:.1} ms",
        millis(&stdout, "waiter.0.after_cancel_ms"),
        millis(&stdout, "waiter.1.after_cancel_ms")
    );
}

#[test]
fn a_child_of_fork_gets_a_status_from_inherited_handles_at_once() {
    let dir = TempDir::new("p2pcheck-capi-fork");
    let exe = process_program(dir.path(), "capi_process");
    let err_file = dir.path().join("child-stderr");
    let mut cmd = program(&exe);
    cmd.arg("fork")
        .arg(&err_file)
        .env("P2PCHECK_WORKER", worker());
    let out = run(&mut cmd, Duration::from_secs(120));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let pids = value(&stdout, "child.pids").to_string();
    let (parent, child) = pids.split_once(' ').unwrap();
    let wrong = |what: &str| {
        format!(
            "{what} was made by process {parent}, and this is process {child} (a child of \
             fork?): a handle is used only in the process that made it"
        )
    };
    let status = |s: Status| (s as i32).to_string();
    let mut e = Lines::default();
    e.ok("check");
    e.ok("start");
    e.test("child.pids", "two pids", |v| v.split(' ').count() == 2);
    for key in ["child.try_wait", "child.wait_ms", "child.wait"] {
        e.msg(key, Status::WrongProcess, wrong("pending"));
    }
    e.is("child.cancel", status(Status::WrongProcess));
    e.is("child.pair_count", status(Status::WrongProcess));
    e.msg("child.set_level", Status::WrongProcess, wrong("opts"));
    e.msg("child.check", Status::WrongProcess, wrong("opts"));
    e.is("child.out", "null");
    e.is("child.frees", "done");
    e.test("child.ms", "a time", |v| v.parse::<f64>().is_ok());
    e.is("child.exit", "0");
    // The parent's handles are untouched: its check still runs until it cancels it.
    e.is("parent.pair_count", "0 1");
    e.msg(
        "parent.try_wait",
        Status::NotReady,
        "the check is still running",
    );
    e.is("parent.cancel", "0");
    e.msg("parent.wait", Status::Cancelled, "the check was cancelled");
    e.assert(&stdout);
    // Every call of the child, the frees included, returned within 1 s, and it printed
    // nothing on its stderr.
    let ms = millis(&stdout, "child.ms");
    assert!(ms < 1_000.0, "the child's calls took {ms} ms");
    assert_eq!(fs::read_to_string(&err_file).unwrap(), "");
    eprintln!("the child's 10 calls on inherited handles took {ms:.3} ms in all");
}

#[test]
fn a_child_of_the_host_lives_through_checks_with_hangs_and_crashes() {
    // Relies on the library touching only the processes it started.
    let dir = TempDir::new("p2pcheck-capi-bystander");
    let exe = process_program(dir.path(), "capi_process");
    let mut cmd = program(&exe);
    cmd.arg("bystander").env("P2PCHECK_WORKER", worker());
    let out = run(&mut cmd, Duration::from_secs(240));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let mut e = Lines::default();
    e.is("bystander.before", "alive, not reaped");
    e.ok("faults");
    e.ok("timeouts");
    for engine in 0..2 {
        e.ok(&format!("check.{engine}"));
        e.is(
            format!("bystander.after_check.{engine}"),
            "alive, not reaped",
        );
    }
    e.ok("start");
    e.is("cancel", "0");
    e.is("bystander.after_cancel", "alive, not reaped");
    e.is("bystander.reaped", "1");
    e.is("bystander.signal", libc::SIGTERM.to_string());
    e.assert(&stdout);
}

/// Issue 24 through the C ABI's access check: a cache planted by another user (uid 65534: the
/// file and its fingerprint edited to say true), or lying in a folder others may write without
/// the sticky bit, is not trusted: the answer is the machine's (false), and the planted files
/// are left as they are. Needs root (CI is), to give files away; says so and skips otherwise.
#[test]
fn the_c_abis_access_check_answers_the_machine_not_a_planted_cache() {
    const OTHER: u32 = 65534;
    let tmp = TempDir::new("p2pcheck-capi-trust");
    let exe = process_program(tmp.path(), "capi_process");
    let probe = tmp.path().join("probe");
    fs::write(&probe, "").unwrap();
    if std::os::unix::fs::chown(&probe, Some(OTHER), None).is_err() {
        eprintln!("skipped: this process cannot chown files to uid {OTHER} (not root)");
        return;
    }
    let access = |dir: &Path| {
        let mut cmd = program(&exe);
        cmd.arg("access").arg(dir).env("P2PCHECK_WORKER", worker());
        let out = run(&mut cmd, Duration::from_secs(120));
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
        let mut e = Lines::default();
        e.ok("sim");
        e.ok("access");
        e.is("access.answer", "false");
        e.assert(&stdout);
    };
    let name = "gpu_p2p_access_cache_for_0,1.json";
    // A consistent forgery of the computed cache: vLLM's file and the fingerprint say true.
    let forge = |dir: &Path| {
        let file = dir.join(name);
        let beside = dir.join(format!(".{name}.p2pcheck-fingerprint"));
        let text = fs::read_to_string(&file).unwrap();
        fs::write(&file, text.replace("\"0->1\": false", "\"0->1\": true")).unwrap();
        let fp = fs::read_to_string(&beside).unwrap();
        assert!(fp.contains("verdicts=10 11\n"), "{fp}");
        fs::write(&beside, fp.replace("verdicts=10 11\n", "verdicts=11 11\n")).unwrap();
    };
    let snapshot = |dir: &Path| -> Vec<(String, Vec<u8>, u32, u32)> {
        let mut all: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let meta = fs::symlink_metadata(e.path()).unwrap();
                use std::os::unix::fs::MetadataExt;
                let bytes = fs::read(e.path()).unwrap_or_default();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    bytes,
                    meta.uid(),
                    meta.mode(),
                )
            })
            .collect();
        all.sort();
        all
    };
    use std::os::unix::fs::PermissionsExt;
    // Another user's forgery in a shared (1777) folder.
    let shared = tmp.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    access(&shared);
    forge(&shared);
    for f in fs::read_dir(&shared).unwrap() {
        std::os::unix::fs::chown(f.unwrap().path(), Some(OTHER), Some(OTHER)).unwrap();
    }
    let before = snapshot(&shared);
    access(&shared);
    assert_eq!(
        snapshot(&shared),
        before,
        "another user's files are left as they are"
    );
    // The user's own forgery, in a folder anyone may write (0777, no sticky bit).
    let open = tmp.path().join("open");
    fs::create_dir(&open).unwrap();
    access(&open);
    forge(&open);
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    access(&open);
}

#[test]
fn a_failed_libcuda_load_is_tried_again_after_the_environment_is_fixed() {
    let dir = TempDir::new("p2pcheck-capi-reload");
    let exe = process_program(dir.path(), "capi_process");
    let sim = dir.path().join("libsim.so");
    p2pcheck::sim::write_library(&sim).unwrap();
    let mut cmd = program(&exe);
    cmd.arg("reload")
        .arg(&sim)
        .env("P2PCHECK_WORKER", worker())
        .env("P2PCHECK_LIBCUDART", &sim)
        .env("P2PCHECK_SIM_GPUS", "2")
        .env("P2PCHECK_SIM_FAULTS", "0->1:drop-writes")
        .env("VLLM_CACHE_ROOT", dir.path().join("cache"));
    let out = run(&mut cmd, Duration::from_secs(120));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let missing = "could not load libcuda (set P2PCHECK_LIBCUDA to its path): \
                   /nonexistent/libcuda.so.1: cannot open shared object file: No such file or \
                   directory";
    let mut e = Lines::default();
    e.msg("missing", Status::Cuda, missing);
    e.msg("missing.again", Status::Cuda, missing);
    e.ok("fixed");
    e.is("fixed.answer", "0");
    e.ok("fixed.1_0");
    e.is("fixed.1_0.answer", "1");
    e.assert(&stdout);
}

#[test]
fn only_an_executable_that_serves_as_a_worker_is_run_as_one() {
    // A host called p2pcheck, with no worker anywhere: the check says so, and never runs the
    // host itself (its main would write the marker).
    let dir = TempDir::new("p2pcheck-capi-noworker");
    let exe = process_program(dir.path(), "p2pcheck");
    let marker = dir.path().join("marker");
    let mut cmd = program(&exe);
    cmd.arg("noworker")
        .env("PATH", "/nonexistent")
        .env("P2PCHECK_TEST_MARKER", &marker);
    let out = run(&mut cmd, Duration::from_secs(60));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let mut e = Lines::default();
    e.ok("sim");
    e.msg(
        "check",
        Status::Worker,
        format!(
            "cannot find the p2pcheck-worker executable (tried {}, p2pcheck-worker on $PATH); \
             install it beside your program or set P2PCHECK_WORKER to its path",
            dir.path().join("p2pcheck-worker").display()
        ),
    );
    e.is("check.out", "null");
    e.assert(&stdout);
    assert!(!marker.exists(), "{}", fs::read_to_string(&marker).unwrap());

    // The p2pcheck CLI declares that it serves as a worker: alone in a folder (a copy:
    // the executable's path is where the worker is looked for), it runs its check with itself.
    let cli = dir.path().join("cli");
    fs::create_dir_all(&cli).unwrap();
    fs::copy(cli_exe(), cli.join("p2pcheck")).unwrap();
    let mut cmd = program(&cli.join("p2pcheck"));
    cmd.args(["--simulate", "2", "--fault", "0->1:drop-writes"])
        .env("PATH", "/nonexistent");
    let out = run(&mut cmd, Duration::from_secs(60));
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    // The checked matrix: its workers can only have been the CLI itself (nothing beside it,
    // nothing on PATH).
    assert!(stdout.contains(" 0         ok  FAIL:copy\n"), "{stdout}");
}

#[test]
fn a_cpp_program_uses_the_header_and_the_static_library() {
    let dir = TempDir::new("p2pcheck-capi-cpp");
    let mut args = strings(&CXX_FLAGS);
    args.push(root("capi/tests/c/capi_test.cpp").display().to_string());
    args.push(format!("-I{}", root("include").display()));
    args.push(static_lib().display().to_string());
    args.extend(strings(&NATIVE_STATIC_LIBS));
    let exe = dir.path().join("capi_test_cpp");
    compile("c++", &args, &exe);
    let mut cmd = program(&exe);
    cmd.env("P2PCHECK_WORKER", worker());
    let out = run(&mut cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}", text(&out.stderr));
    // 1->0 passes vLLM's copy test; the kernel tier sees wrong data.
    let wrong = format!("[{}: {}]", Class::WrongData.name(), Class::WrongData.hint());
    let details_ok = move |v: &str| {
        v.starts_with("kernel tier: SM loads through the mapping (1-byte accesses): ")
            && v.ends_with(&wrong)
    };
    let details_ok = std::rc::Rc::new(details_ok);
    let mut e = Lines::default();
    e.is("set_simulation", "0 ");
    e.is("set_level", "0 ");
    e.is("set_kernel_bytes", "0 ");
    e.is("check", "0 ok");
    for key in ["check", "background"] {
        let pairs: &[(u32, u32)] = if key == "check" {
            &[(0, 0), (0, 1), (1, 0), (1, 1)]
        } else {
            e.is("start", "0");
            e.is("try_wait", "0");
            &[(1, 0)]
        };
        e.is(format!("{key}.pairs"), pairs.len().to_string());
        for (i, &(src, tgt)) in pairs.iter().enumerate() {
            let fails = (src, tgt) == (1, 0);
            e.is(
                format!("{key}.pair.{i}"),
                format!(
                    "{src}->{tgt} ok={} copy={} kernel={} handshake={} failed_tier={} class={} \
                     details={}",
                    i32::from(!fails),
                    TierCode::Ok as i32,
                    if fails {
                        TierCode::Failed
                    } else {
                        TierCode::Ok
                    } as i32,
                    TierCode::NotRun as i32,
                    if fails {
                        LevelCode::Kernel
                    } else {
                        LevelCode::None
                    } as i32,
                    if fails { "wrong-data" } else { "none" },
                    i32::from(fails)
                ),
            );
            if fails {
                let f = details_ok.clone();
                e.test(
                    format!("{key}.details.{i}"),
                    "the kernel tier's wrong data",
                    move |v| f(v),
                );
            }
        }
    }
    e.assert(&text(&out.stdout));
}

#[test]
fn the_cmake_examples_program_prints_the_matrix() {
    let dir = TempDir::new("p2pcheck-capi-cmake");
    let sim = dir.path().join("libsim.so");
    p2pcheck::sim::write_library(&sim).unwrap();
    // What examples/cmake/CMakeLists.txt does: the static library and exactly its libraries.
    let mut args = strings(&C_FLAGS);
    args.push(root("examples/cmake/main.c").display().to_string());
    args.push(format!("-I{}", root("include").display()));
    args.push(static_lib().display().to_string());
    args.extend(strings(&NATIVE_STATIC_LIBS));
    let exe = dir.path().join("p2p_matrix");
    compile("cc", &args, &exe);
    // The worker beside the program, as the CMake snippet copies it.
    std::os::unix::fs::symlink(worker(), dir.path().join("p2pcheck-worker")).unwrap();
    let mut cmd = program(&exe);
    cmd.env("P2PCHECK_LIBCUDA", &sim)
        .env("P2PCHECK_LIBCUDART", &sim)
        .env("P2PCHECK_SIM_GPUS", "2")
        .env("P2PCHECK_SIM_FAULTS", "0->1:drop-writes");
    let out = run(&mut cmd, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "0->0: ok\n0->1: fails (copy tier, never-written)\n1->0: ok\n1->1: ok\n"
    );
    // No worker: could not check, and says why.
    let mut cmd = program(&exe);
    cmd.env("P2PCHECK_WORKER", "/nonexistent/p2pcheck-worker");
    let out = run(&mut cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "p2pcheck {}: {}: P2PCHECK_WORKER=/nonexistent/p2pcheck-worker: \
             /nonexistent/p2pcheck-worker: No such file or directory (os error 2)\n",
            env!("CARGO_PKG_VERSION"),
            Status::Worker.text().to_str().unwrap()
        )
    );
}

#[test]
fn the_python_example_answers_gpu_p2p_access_check_as_vllms() {
    let dir = TempDir::new("p2pcheck-capi-python");
    let lib = dir.path().join("lib");
    install_shared(&lib);
    let sim = dir.path().join("libsim.so");
    p2pcheck::sim::write_library(&sim).unwrap();
    let cache = dir.path().join("vllm-cache");
    let python = |args: &[&str], faults: &str, libcuda: &Path| {
        let mut cmd = program(Path::new("python3"));
        cmd.arg(root("examples/python/access_check.py"))
            .args(args)
            .env("P2PCHECK_LIBRARY", lib.join("libp2pcheck.so.0"))
            .env("P2PCHECK_LIBCUDA", libcuda)
            .env("P2PCHECK_LIBCUDART", libcuda)
            .env("P2PCHECK_SIM_GPUS", "2")
            .env("P2PCHECK_SIM_FAULTS", faults)
            .env("VLLM_CACHE_ROOT", &cache)
            .env("PYTHONDONTWRITEBYTECODE", "1");
        run(&mut cmd, Duration::from_secs(120))
    };
    let pairs = ["0", "0", "0", "1", "1", "0", "1", "1", "2", "0", "0", "-1"];
    let answers =
        "0->0: True\n0->1: False\n1->0: True\n1->1: True\n2->0: KeyError\n0->-1: KeyError\n";
    let out = python(&pairs, "0->1:drop-writes", &sim);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), answers);
    let file = cache.join("gpu_p2p_access_cache_for_0,1.json");
    let bytes =
        "{\n    \"0->0\": true,\n    \"0->1\": false,\n    \"1->0\": true,\n    \"1->1\": true\n}";
    assert_eq!(fs::read_to_string(&file).unwrap(), bytes);
    // A fresh process reads the file (as vLLM does): the fault is gone, the answer is cached.
    let out = python(&pairs, "", &sim);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), answers);
    assert_eq!(fs::read_to_string(&file).unwrap(), bytes);
    // No driver: RuntimeError, as vLLM raises when its check cannot run.
    let out = python(&["0", "1"], "", Path::new("/nonexistent/libcuda.so.1"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "RuntimeError: p2pcheck: {}: could not load libcuda",
            Status::Cuda.text().to_str().unwrap()
        )),
        "{stderr}"
    );
}
