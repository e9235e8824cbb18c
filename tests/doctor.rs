//! `p2pcheck doctor` on recorded machine states (tests/fixtures/doctor, written by its
//! generate.py): one fixture per cause, each diagnosed with the right fix, through the real
//! CLI and the real `dlopen` of NVML (the simulated NVML, csrc/nvml_sim.c); absent, failing,
//! old and hanging NVML; hostile trees; and a failing check that prints the doctor's top
//! finding under the failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::TempDir;
use p2pcheck::doctor::{self, Acs, NvmlSource};
use p2pcheck::json::{self, Value};

/// The simulated NVML, and the same without the fabric functions (an older driver).
const NVML_SIM: &str = env!("P2PCHECK_NVML_SIM_LIB");
const NVML_SIM_OLD: &str = env!("P2PCHECK_NVML_SIM_OLD_LIB");

/// Variables the doctor reads that the test's own environment must not leak into a run.
const HOST_VARS: [&str; 5] = [
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "NCCL_P2P_DISABLE",
    "NCCL_P2P_LEVEL",
    "NCCL_CUMEM_ENABLE",
];

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/doctor")
        .join(case)
}

fn p2pcheck(args: &[&str], case: &str, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_p2pcheck"));
    cmd.args(args)
        .env("P2PCHECK_WORKER", env!("CARGO_BIN_EXE_p2pcheck-worker"))
        .env("P2PCHECK_LIBNVML", NVML_SIM)
        .env("P2PCHECK_NVML_SIM", fixture(case).join("nvml.txt"));
    for v in HOST_VARS {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let out = cmd.output().expect("p2pcheck runs");
    // Generous: only proves that nothing waits without end.
    assert!(started.elapsed() < Duration::from_secs(120));
    out
}

/// `p2pcheck doctor --json --root <case>/root`: the exit code and the parsed object.
fn doctor_json(case: &str, env: &[(&str, &str)]) -> (i32, Value) {
    let root = fixture(case).join("root");
    let out = p2pcheck(
        &["doctor", "--json", "--root", root.to_str().unwrap()],
        case,
        env,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = json::parse(stdout.trim())
        .unwrap_or_else(|e| panic!("{case}: not JSON ({e}): {stdout}\n{}", text(&out.stderr)));
    (out.status.code().expect("exited"), value)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The member at a dotted path; array elements by number (`gpus.1.bus_id`).
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, key| match v {
        Value::Object(members) => members
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no {key} in {path}")),
        Value::Array(items) => &items[key.parse::<usize>().unwrap()],
        other => panic!("{path}: {key} of {}", other.kind()),
    })
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    match at(v, path) {
        Value::String(s) => s,
        other => panic!("{path} is {}", other.kind()),
    }
}

fn items<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    match at(v, path) {
        Value::Array(a) => a,
        other => panic!("{path} is {}", other.kind()),
    }
}

/// `[[0,1],[1,0]]` as `"0->1 1->0"`.
fn pairs(v: &Value) -> String {
    items(v, "pairs")
        .iter()
        .map(|p| match p {
            Value::Array(ends) => format!("{}->{}", num(&ends[0]), num(&ends[1])),
            other => panic!("a pair is {}", other.kind()),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn num(v: &Value) -> &str {
    match v {
        Value::Number(n) => n,
        other => panic!("{} is not a number", other.kind()),
    }
}

/// Every line of a finding's `field` (`fix`, `confirm`, `facts`) joined.
fn lines(f: &Value, field: &str) -> String {
    items(f, field)
        .iter()
        .map(|l| match l {
            Value::String(s) => s.as_str(),
            _ => "",
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The findings as (kind, severity), in rank order, checking that the ranks are 1, 2, ...
fn kinds(v: &Value) -> Vec<(String, String)> {
    items(v, "findings")
        .iter()
        .enumerate()
        .map(|(i, f)| {
            assert_eq!(num(at(f, "rank")), (i + 1).to_string());
            (s(f, "kind").to_string(), s(f, "severity").to_string())
        })
        .collect()
}

fn first<'a>(v: &'a Value, kind: &str) -> &'a Value {
    items(v, "findings")
        .iter()
        .find(|f| s(f, "kind") == kind)
        .unwrap_or_else(|| panic!("no {kind} finding: {:?}", kinds(v)))
}

fn kind_pair(kind: &str, severity: &str) -> (String, String) {
    (kind.to_string(), severity.to_string())
}

#[test]
fn a_healthy_nvlink_machine_has_no_finding_and_every_fact_is_read() {
    let (code, v) = doctor_json("healthy-nvlink", &[]);
    assert_eq!(code, 0);
    assert!(kinds(&v).is_empty(), "{:?}", kinds(&v));
    // NVML came through dlopen of the simulated library.
    assert_eq!(s(&v, "nvml.library"), NVML_SIM);
    assert_eq!(s(&v, "nvml.driver_version"), "580.159.04");
    assert_eq!(s(&v, "numbering"), "cuda");
    assert_eq!(s(&v, "gpus.1.bus_id"), "0000:2c:00.0");
    assert_eq!(
        s(&v, "gpus.1.uuid"),
        "GPU-1a2b3c4d-0000-4000-8000-000000000001"
    );
    assert_eq!(s(&v, "gpus.1.model"), "NVIDIA H200");
    assert_eq!(s(&v, "gpus.0.root_complex"), "pci0000:15");
    let upstream: Vec<&str> = items(&v, "gpus.0.upstream")
        .iter()
        .map(|b| match b {
            Value::String(s) => s.as_str(),
            _ => "",
        })
        .collect();
    assert_eq!(upstream, ["0000:15:01.0", "0000:16:00.0", "0000:17:00.0"]);
    assert_eq!(num(at(&v, "gpus.0.iommu_group")), "30");
    assert_eq!(s(&v, "gpus.0.iommu_type"), "DMA-FQ");
    assert_eq!(at(&v, "gpus.0.iommu_translating"), &Value::Bool(true));
    assert_eq!(items(&v, "gpus.0.nvml.nvlinks").len(), 18);
    assert_eq!(s(&v, "gpus.0.nvml.compute_mode"), "Default");
    assert_eq!(at(&v, "gpus.0.nvml.persistence"), &Value::Bool(true));
    assert_eq!(at(&v, "gpus.0.nvml.fabric"), &Value::Null);
    assert_eq!(s(&v, "pairs.0.path"), "PHB");
    assert_eq!(at(&v, "pairs.0.nvlink"), &Value::Bool(true));
    // ACS redirects and the IOMMU translates, but NVLink carries the pair: no finding.
    assert_eq!(s(&v, "bridges.0.acs.state"), "present");
    assert_eq!(
        at(&v, "bridges.0.acs.control_bits.p2p_request_redirect"),
        &Value::Bool(true)
    );
    assert_eq!(at(&v, "bridges.0.acs.redirects"), &Value::Bool(true));
    assert_eq!(s(&v, "bridges.1.acs.state"), "absent");
    assert_eq!(s(&v, "iommu.vendor"), "intel");
    assert_eq!(at(&v, "host.container"), &Value::Bool(false));
    assert_eq!(at(&v, "host.namespaces.1.host_initial"), &Value::Bool(true));
}

#[test]
fn acs_redirect_with_a_translating_iommu_breaks_the_pcie_pair() {
    let (code, v) = doctor_json("acs-iommu", &[]);
    assert_eq!(code, 1, "a finding that breaks peer access");
    assert_eq!(kinds(&v), [kind_pair("acs-iommu", "breaks")]);
    let f = first(&v, "acs-iommu");
    assert_eq!(pairs(f), "0->1 1->0");
    assert_eq!(s(&v, "pairs.0.path"), "PIX");
    assert_eq!(s(&v, "pairs.0.common"), "0000:01:00.0");
    let fix = lines(f, "fix");
    assert!(fix.contains("BIOS"), "{fix}");
    assert!(
        fix.contains("setpci -s 0000:02:08.0 ECAP_ACS+0x6.w=0000"),
        "{fix}"
    );
    assert!(
        fix.contains("pci=disable_acs_redir=0000:02:08.0;0000:02:10.0"),
        "{fix}"
    );
    assert!(fix.contains("iommu=pt (with intel_iommu=on)"), "{fix}");
    let confirm = lines(f, "confirm");
    assert!(
        confirm.contains("cat /sys/kernel/iommu_groups/*/type"),
        "{confirm}"
    );
    assert!(confirm.contains("ReqRedir-"), "{confirm}");
    assert!(lines(f, "facts").contains("ReqRedir+ CmpltRedir+"));
}

#[test]
fn acs_that_only_root_can_read_is_reported_so_and_still_suspected() {
    let (_, v) = doctor_json("acs-unreadable", &[]);
    assert_eq!(s(&v, "bridges.0.acs.state"), "unreadable");
    assert!(s(&v, "bridges.0.acs.why").contains("not readable without root"));
    assert_eq!(at(&v, "bridges.0.acs.redirects"), &Value::Null);
    assert_eq!(kinds(&v), [kind_pair("acs-iommu", "degrades")]);
    let f = first(&v, "acs-iommu");
    assert!(s(f, "title").contains("cannot be read without root"));
    assert!(lines(f, "facts").contains("not readable without root"));
    assert!(lines(f, "confirm").contains("sudo lspci -vvv"));
}

#[test]
fn a_container_of_its_own_is_named_with_the_namespace_fix() {
    let (code, v) = doctor_json("container", &[]);
    assert_eq!(code, 0, "a note does not break anything by itself");
    assert_eq!(kinds(&v), [kind_pair("container-namespaces", "note")]);
    let f = first(&v, "container-namespaces");
    assert!(items(f, "gpus").is_empty(), "host-wide");
    assert_eq!(pairs(f), "0->0 0->1 1->0 1->1");
    assert!(lines(f, "fix").contains("--ipc=host --pid=host"));
    assert!(lines(f, "fix").contains("hostIPC: true"));
    assert!(lines(f, "confirm").contains("readlink /proc/self/ns/ipc"));
    assert_eq!(at(&v, "host.container"), &Value::Bool(true));
    let evidence = lines(at(&v, "host"), "container_evidence");
    assert!(evidence.contains("/.dockerenv exists"), "{evidence}");
    assert!(evidence.contains("docker-3f2a9c1b7e.scope"), "{evidence}");
    assert_eq!(s(&v, "host.namespaces.0.this"), "pid:[4026532301]");
    assert_eq!(
        at(&v, "host.namespaces.0.host_initial"),
        &Value::Bool(false)
    );
}

#[test]
fn nvlink_links_down_degrade_the_pairs_of_that_gpu() {
    let (_, v) = doctor_json("nvlink-down", &[]);
    assert_eq!(kinds(&v), [kind_pair("nvlink-down", "degrades")]);
    let f = first(&v, "nvlink-down");
    assert_eq!(pairs(f), "0->1 1->0");
    assert_eq!(num(&items(f, "gpus")[0]), "1");
    assert!(lines(f, "facts").contains("GPU 1: 12 of 18 links active; inactive: 12, 13"));
    assert!(lines(f, "confirm").contains("nvidia-smi nvlink -s -i 0000:2c:00.0"));
}

#[test]
fn an_exclusive_compute_mode_breaks_every_pair_of_that_gpu() {
    let (code, v) = doctor_json("exclusive", &[]);
    assert_eq!(code, 1);
    assert_eq!(kinds(&v), [kind_pair("compute-mode", "breaks")]);
    let f = first(&v, "compute-mode");
    assert_eq!(
        pairs(f),
        "0->1 1->0 1->1",
        "the same-GPU pair runs in two processes too"
    );
    assert!(lines(f, "fix").contains("sudo nvidia-smi -i 0000:2c:00.0 -c DEFAULT"));
    assert_eq!(s(&v, "gpus.1.nvml.compute_mode"), "Exclusive_Process");
}

#[test]
fn mig_mode_breaks_p2p_and_says_how_to_turn_it_off() {
    let (_, v) = doctor_json("mig", &[]);
    assert_eq!(kinds(&v), [kind_pair("mig", "breaks")]);
    let f = first(&v, "mig");
    assert_eq!(pairs(f), "0->0 0->1 1->0");
    assert!(lines(f, "fix").contains("sudo nvidia-smi -i 0000:18:00.0 -mig 0"));
    assert!(lines(f, "confirm").contains("mig.mode.current"));
}

#[test]
fn a_fabric_that_is_not_ready_names_the_fabric_manager_of_the_drivers_version() {
    let (_, v) = doctor_json("fabric", &[]);
    // Without the fabric there is no NVLink either, so the pair's PCIe path (ACS redirect,
    // translating IOMMU) is a finding too; the fabric bears on more pairs.
    assert_eq!(
        kinds(&v),
        [
            kind_pair("fabric", "breaks"),
            kind_pair("acs-iommu", "breaks")
        ]
    );
    let f = first(&v, "fabric");
    let fix = lines(f, "fix");
    assert!(
        fix.contains("systemctl enable --now nvidia-fabricmanager"),
        "{fix}"
    );
    assert!(fix.contains("version 580.159.04"), "{fix}");
    assert!(lines(f, "confirm").contains("State: Completed, Status: Success"));
    assert!(lines(f, "facts").contains("fabric state not started"));
    assert_eq!(s(&v, "gpus.0.nvml.fabric.state"), "not started");
}

#[test]
fn persistence_mode_off_is_a_note_about_start_up() {
    let (code, v) = doctor_json("persistence-off", &[]);
    assert_eq!(code, 0);
    assert_eq!(kinds(&v), [kind_pair("persistence-off", "note")]);
    let f = first(&v, "persistence-off");
    assert_eq!(items(f, "gpus").len(), 2);
    assert!(lines(f, "fix").contains("nvidia-persistenced"));
}

#[test]
fn nccl_variables_that_turn_p2p_off_are_tied_to_the_pairs_they_cut() {
    let (code, v) = doctor_json("pcie-clean", &[]);
    assert_eq!((code, kinds(&v)), (0, Vec::new()), "a clean PCIe pair");
    let (_, v) = doctor_json("pcie-clean", &[("NCCL_P2P_LEVEL", "NVL")]);
    assert_eq!(kinds(&v), [kind_pair("nccl-env", "degrades")]);
    let f = first(&v, "nccl-env");
    assert_eq!(pairs(f), "0->1 1->0");
    assert!(
        lines(f, "fix").contains("or set it to PIX"),
        "{}",
        lines(f, "fix")
    );
    assert!(lines(f, "confirm").contains("NCCL_DEBUG=INFO"));
    // PIX is far enough for a pair under one switch.
    let (_, v) = doctor_json("pcie-clean", &[("NCCL_P2P_LEVEL", "PIX")]);
    assert!(kinds(&v).is_empty());
    let (_, v) = doctor_json(
        "pcie-clean",
        &[("NCCL_P2P_DISABLE", "1"), ("NCCL_CUMEM_ENABLE", "0")],
    );
    let f = first(&v, "nccl-env");
    assert_eq!(pairs(f), "0->1 1->0");
    assert_eq!(lines(f, "fix"), "unset NCCL_P2P_DISABLE");
    assert!(lines(f, "facts").contains("NCCL_CUMEM_ENABLE=0"));
    assert_eq!(s(&v, "host.env.NCCL_P2P_DISABLE"), "1");
    // A legacy integer level cannot be judged: said so, as a note.
    let (_, v) = doctor_json("pcie-clean", &[("NCCL_P2P_LEVEL", "3")]);
    assert_eq!(kinds(&v), [kind_pair("nccl-env", "note")]);
}

#[test]
fn the_drivers_own_refusal_across_sockets_is_explained() {
    let (code, v) = doctor_json("driver-p2p", &[]);
    assert_eq!(code, 1);
    assert_eq!(kinds(&v), [kind_pair("driver-p2p", "breaks")]);
    let f = first(&v, "driver-p2p");
    assert_eq!(pairs(f), "0->1 1->0");
    assert!(s(f, "title").contains("IOH topology not supported"));
    assert!(lines(f, "fix").contains("different root complexes"));
    assert!(lines(f, "confirm").contains("nvidia-smi topo -p2p rw"));
    assert_eq!(s(&v, "pairs.0.path"), "SYS");
    assert_eq!(num(at(&v, "pairs.0.nvml_p2p.read")), "3");
}

#[test]
fn cuda_visible_devices_picks_and_numbers_the_gpus_as_cuda_does() {
    let (_, v) = doctor_json("healthy-nvlink", &[("CUDA_VISIBLE_DEVICES", "1")]);
    assert_eq!(items(&v, "gpus").len(), 1);
    assert_eq!(s(&v, "gpus.0.bus_id"), "0000:2c:00.0");
    assert_eq!(s(&v, "numbering"), "cuda");
    assert!(lines(&v, "notes").contains("1 of 2 GPUs are hidden"));
    // MIG instances cannot be named without CUDA: every GPU in bus order, and the finding.
    let mig = "MIG-5c4b3a29-1111-2222-3333-444455556666";
    let (_, v) = doctor_json("healthy-nvlink", &[("CUDA_VISIBLE_DEVICES", mig)]);
    assert_eq!(s(&v, "numbering"), "bus-order");
    assert_eq!(items(&v, "gpus").len(), 2);
    let f = first(&v, "mig");
    assert!(items(f, "gpus").is_empty());
    assert!(lines(f, "facts").contains(mig));
}

#[test]
fn absent_nvml_is_reported_and_the_sysfs_findings_stand() {
    let (code, v) = doctor_json(
        "acs-iommu",
        &[("P2PCHECK_LIBNVML", "/nonexistent/libnvidia-ml.so.1")],
    );
    assert_eq!(code, 1);
    assert_eq!(at(&v, "nvml"), &Value::Null);
    assert!(s(&v, "nvml_error").contains("/nonexistent/libnvidia-ml.so.1"));
    assert_eq!(at(&v, "gpus.0.nvml"), &Value::Null);
    assert_eq!(at(&v, "pairs.0.nvlink"), &Value::Null);
    assert_eq!(kinds(&v), [kind_pair("acs-iommu", "breaks")]);
    assert!(lines(first(&v, "acs-iommu"), "facts").contains("not known whether NVLink"));
}

#[test]
fn an_older_nvml_without_the_fabric_functions_is_no_error() {
    let (code, v) = doctor_json("healthy-nvlink", &[("P2PCHECK_LIBNVML", NVML_SIM_OLD)]);
    assert_eq!(code, 0);
    assert!(kinds(&v).is_empty());
    assert_eq!(at(&v, "gpus.0.nvml.fabric"), &Value::Null);
    assert!(items(&v, "gpus.0.nvml.unavailable").is_empty());
    assert_eq!(items(&v, "gpus.0.nvml.nvlinks").len(), 18);
}

#[test]
fn nvml_that_fails_to_start_or_is_misconfigured_is_reported_with_its_code() {
    let dir = TempDir::new("p2pcheck-doctor-nvml");
    let config = dir.path().join("nvml.txt");
    for (text, needle) in [
        ("init 18\n", "code 18"),
        ("gpu 0000:18:00.0 colour=blue\n", "code 999"),
    ] {
        std::fs::write(&config, text).unwrap();
        let (_, v) = doctor_json(
            "healthy-nvlink",
            &[("P2PCHECK_NVML_SIM", config.to_str().unwrap())],
        );
        let err = s(&v, "nvml_error");
        assert!(
            err.contains("nvmlInit_v2 failed") && err.contains(needle),
            "{err}"
        );
    }
}

#[test]
fn nvml_that_hangs_is_left_behind_after_its_deadline() {
    let dir = TempDir::new("p2pcheck-doctor-hang");
    let config = dir.path().join("nvml.txt");
    std::fs::write(&config, "hang\n").unwrap();
    // The only test that loads NVML in this process, so setting the variable races nothing.
    std::env::set_var("P2PCHECK_NVML_SIM", &config);
    let started = Instant::now();
    let facts = doctor::gather_at(
        &fixture("healthy-nvlink").join("root"),
        Some(&NvmlSource {
            library: NVML_SIM.into(),
            timeout: Duration::from_millis(500),
        }),
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let err = facts.nvml.unwrap_err();
    assert!(err.contains("did not answer within 0.5 s"), "{err}");
    // The sysfs facts are all there.
    assert_eq!(facts.gpus.len(), 2);
    assert_eq!(facts.pairs[0].path, doctor::PathKind::Phb);
}

/// A copy of `case`'s tree in a temp folder, to break on purpose.
fn copy_tree(case: &str, dir: &Path) -> PathBuf {
    let to = dir.join("root");
    let status = Command::new("cp")
        .args(["-a"])
        .arg(fixture(case).join("root"))
        .arg(&to)
        .status()
        .unwrap();
    assert!(status.success());
    to
}

fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

fn replace_link(path: &Path, target: &str) {
    let _ = std::fs::remove_file(path);
    std::os::unix::fs::symlink(target, path).unwrap();
}

#[test]
fn hostile_trees_are_reported_never_a_panic_or_a_hang() {
    let dir = TempDir::new("p2pcheck-doctor-hostile");
    let root = copy_tree("acs-iommu", dir.path());
    let bridges = "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0";
    let gpu0 = format!("{bridges}/0000:02:08.0/0000:03:00.0");
    let gpu1 = format!("{bridges}/0000:02:10.0/0000:04:00.0");
    // FIFOs where files are (a reader that blocked on them would hang), a directory for a
    // file, a file of 1 MiB, bytes that are not UTF-8, a link loop, a link to nothing, and
    // random bytes for a config space.
    mkfifo(&root.join("proc/cmdline"));
    mkfifo(&root.join(bridges).join("0000:02:08.0/config"));
    mkfifo(&root.join("proc/self/cgroup"));
    std::fs::remove_file(root.join("sys/kernel/iommu_groups/12/type")).unwrap();
    std::fs::create_dir(root.join("sys/kernel/iommu_groups/12/type")).unwrap();
    std::fs::write(root.join(&gpu0).join("numa_node"), vec![b'9'; 1 << 20]).unwrap();
    std::fs::write(
        root.join("sys/kernel/iommu_groups/13/type"),
        b"\xff\xfe DMA\n",
    )
    .unwrap();
    replace_link(&root.join(&gpu1).join("numa_node"), "numa_node");
    replace_link(&root.join("proc/self/ns/ipc"), "/nonexistent");
    std::fs::write(
        root.join("sys/devices/pci0000:00/0000:00:01.0/config"),
        (0..4096u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let started = Instant::now();
    let facts = doctor::gather_at(&root, None);
    assert!(started.elapsed() < Duration::from_secs(30));
    let notes = facts.notes.join("\n");
    assert!(notes.contains("proc/cmdline: it is a FIFO"), "{notes}");
    assert!(notes.contains("12/type: it is a directory"), "{notes}");
    assert!(notes.contains("13/type is not UTF-8"), "{notes}");
    assert_eq!(facts.gpus.len(), 2);
    assert_eq!(
        (facts.gpus[0].numa_node, facts.gpus[1].numa_node),
        (None, None)
    );
    assert_eq!(facts.gpus[0].iommu_type, None);
    assert!(matches!(facts.bridges[2].acs, Acs::Unreadable(ref why) if why.contains("FIFO")));
    assert!(facts.iommu.cmdline.is_empty());
    assert!(facts.host.cgroup.is_empty());
    assert_eq!(facts.host.namespaces[1].this, "/nonexistent");
    assert_eq!(facts.host.namespaces[1].host_initial, None);
    // Renders either way.
    let findings = doctor::findings(&facts, &[]);
    assert!(doctor::render_table(&facts, &findings).contains("notes:"));
    json::parse(&doctor::render_json(&facts, &findings)).expect("valid JSON");

    // The GPU list itself broken: /proc's is garbage, sysfs's is what is left; a GPU's link
    // names no device, another's IOMMU group link leads out of the tree.
    let dir = TempDir::new("p2pcheck-doctor-hostile2");
    let root = copy_tree("acs-iommu", dir.path());
    std::fs::write(root.join("proc/driver/nvidia/version"), b"\x00\x01garbage").unwrap();
    for i in 0..3000 {
        std::fs::write(root.join(format!("sys/bus/pci/drivers/nvidia/junk{i}")), "").unwrap();
    }
    replace_link(
        &root.join("sys/bus/pci/devices/0000:04:00.0"),
        "../../../devices/pci0000:00/not-a-device",
    );
    replace_link(
        &root.join(&gpu0).join("iommu_group"),
        "../../../../../../../../../../../../etc",
    );
    let facts = doctor::gather_at(&root, None);
    assert!(
        matches!(&facts.numbering, doctor::Numbering::BusOrder(why) if why.contains("sysfs")),
        "{:?}",
        facts.numbering
    );
    let buses: Vec<&str> = facts.gpus.iter().map(|g| g.bus_id.as_str()).collect();
    assert_eq!(buses, ["0000:03:00.0", "0000:04:00.0"]);
    assert_eq!(facts.gpus[0].uuid, None);
    assert_eq!(facts.gpus[0].iommu_group, None);
    assert!(facts.gpus[1].upstream.is_empty());
    assert!(facts
        .notes
        .join("\n")
        .contains("not at a device 0000:04:00.0"));
    assert_eq!(facts.pairs[0].path, doctor::PathKind::Unknown);
    // And no tree at all.
    let facts = doctor::gather_at(&dir.path().join("nothing"), None);
    assert!(facts.gpus.is_empty() && !facts.notes.is_empty());
    let out = p2pcheck(
        &[
            "doctor",
            "--root",
            dir.path().join("nothing").to_str().unwrap(),
        ],
        "healthy-nvlink",
        &[],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("no GPU found"));
}

#[test]
fn bad_doctor_arguments_are_exit_2() {
    for args in [
        &["doctor", "--root"][..],
        &["doctor", "--frobnicate"],
        &["doctor", "--root", ""],
    ] {
        let out = p2pcheck(args, "healthy-nvlink", &[]);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(text(&out.stderr).contains("doctor"), "{args:?}");
    }
}

/// A check on the simulator with `fault`, explained from `case`'s facts.
fn failing_check(case: &str, fault: &str, json: bool) -> Output {
    let root = fixture(case).join("root");
    let mut args = vec!["--simulate", "2", "--level", "copy", "--fault", fault];
    if json {
        args.push("--json");
    }
    p2pcheck(
        &args,
        case,
        &[("P2PCHECK_DOCTOR_ROOT", root.to_str().unwrap())],
    )
}

#[test]
fn a_failing_check_prints_the_doctors_top_finding_under_the_failure() {
    let out = failing_check("acs-iommu", "0->1:drop-writes", false);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let doctor_at = stdout.find("doctor (the most likely cause").expect(&stdout);
    assert!(stdout[..doctor_at].contains("details:"), "{stdout}");
    let below = &stdout[doctor_at..];
    assert!(below.contains("  0->1: [breaks] acs-iommu: "), "{stdout}");
    assert!(below.contains("fix: turn ACS off"), "{stdout}");
    assert!(below.contains("confirm: re-run p2pcheck"), "{stdout}");
    assert!(!below.contains("1->0"), "only failing pairs: {stdout}");

    // In JSON, the same under "doctor"; a cause that explains the failure ranks first even
    // where another bears on more pairs (the fabric fixture has both).
    let out = failing_check("fabric", "0->1:drop-writes", true);
    let v = json::parse(text(&out.stdout).trim()).unwrap();
    let explained = items(&v, "doctor");
    assert_eq!(explained.len(), 1);
    assert_eq!(num(at(&explained[0], "pair.0")), "0");
    assert_eq!(num(at(&explained[0], "pair.1")), "1");
    let f = at(&explained[0], "finding");
    assert_eq!((s(f, "kind"), num(at(f, "rank"))), ("acs-iommu", "1"));
    assert_eq!(s(f, "explains.0.symptom"), "never-written");
}

#[test]
fn an_open_failure_in_a_container_is_laid_at_the_namespaces() {
    let out = failing_check("container", "1->0:ipc-open-fails", false);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("  1->0: [note] container-namespaces: "),
        "{stdout}"
    );
    assert!(stdout.contains("fix: run every process that shares GPU memory in one container"));
    // Nothing to explain without a failure, and a simulation without a doctor root is not
    // this machine.
    let out = p2pcheck(&["--simulate", "2", "--level", "copy"], "container", &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(!text(&out.stdout).contains("doctor"));
    let out = p2pcheck(
        &[
            "--simulate",
            "2",
            "--level",
            "copy",
            "--fault",
            "1->0:ipc-open-fails",
        ],
        "container",
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(!text(&out.stdout).contains("doctor"));
}
