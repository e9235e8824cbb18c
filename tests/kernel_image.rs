//! The kernels' image on the simulated driver: the fat binary loads, and the trace names the
//! image the driver took (the simulator is an sm_90 GPU and the image holds SASS for it).

mod common;

use std::process::Command;

#[test]
fn the_trace_names_the_sass_the_driver_took_for_every_worker() {
    let dir = common::TempDir::new("kernel-image");
    let trace = dir.path().join("trace.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_p2pcheck"))
        .args(["--simulate", "2", "--trace"])
        .arg(&trace)
        .env("P2PCHECK_WORKER", env!("CARGO_BIN_EXE_p2pcheck-worker"))
        .output()
        .expect("run p2pcheck");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&trace).expect("the trace");
    let loads: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(r#""call":"cuModuleLoadData""#))
        .collect();
    let taken: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(r#""image_taken":"#))
        .collect();
    assert!(!loads.is_empty(), "no module load in the trace:\n{text}");
    assert_eq!(
        loads.len(),
        taken.len(),
        "one image_taken line per module load"
    );
    for l in &loads {
        assert!(
            l.contains("SASS sm_75 sm_80 sm_86 sm_89 sm_90 sm_100 sm_120, PTX compute_75"),
            "{l}"
        );
    }
    for l in &taken {
        assert!(l.contains(r#""image_taken":"SASS sm_90""#), "{l}");
    }
}
