"""The installed p2pcheck package on the simulated driver (no GPU): typed results, the
background check, vLLM's functions, the settings `env` gives for a fault of each tier, the
engines' caches byte for byte, the console script and the Prometheus text.

Run against an installed wheel (scripts/test-python.sh): `python -m pytest python/tests`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import p2pcheck
from p2pcheck import Level, TierResult, Verdict

CACHE_NAME = "gpu_p2p_access_cache_for_0,1.json"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test reads or writes the real caches, and the cache file's name is fixed."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm-root"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("P2PCHECK_WORKER", raising=False)
    monkeypatch.delenv("P2PCHECK_LIBRARY", raising=False)


def test_the_wheel_carries_library_worker_cli_and_types():
    pkg = Path(p2pcheck.__file__).parent
    assert (pkg / "py.typed").is_file()
    for name in ["libp2pcheck.so", "p2pcheck-worker", "p2pcheck"]:
        assert (pkg / "_bin" / name).is_file(), name
    assert os.access(p2pcheck.worker_path(), os.X_OK)
    assert os.access(p2pcheck.cli_path(), os.X_OK)
    assert p2pcheck.version() == p2pcheck.__version__
    # Imported from the installed package, not from the source tree.
    assert "site-packages" in str(pkg)


def test_check_on_the_simulator_gives_typed_results():
    report = p2pcheck.check(simulate=4)
    assert isinstance(report, p2pcheck.Report)
    assert report.device_count == 4
    assert [(p.src, p.tgt) for p in report.pairs] == [(s, t) for s in range(4) for t in range(4)]
    assert report.all_ok
    for p in report.pairs:
        assert isinstance(p, p2pcheck.PairResult)
        assert p.verdict is Verdict.OK and p.ok and p.persistable
        assert (p.copy, p.kernel, p.handshake) == (TierResult.OK,) * 3
        assert p.failed_tier is None and p.diagnosis is None and p.details == ()
    assert "all ok" in str(report)


@pytest.mark.parametrize(
    "fault,tier,diagnosis",
    [
        ("0->1:drop-writes", Level.COPY, "never-written"),
        ("0->1:sm-only", Level.KERNEL, "wrong-data"),
        ("0->1:late-visibility", Level.HANDSHAKE, "timeout"),
    ],
)
def test_a_fault_of_each_tier_is_reported_at_that_tier(fault, tier, diagnosis):
    report = p2pcheck.check([(0, 1), (1, 0)], simulate=2, faults=[fault])
    bad, good = report.pairs
    assert good.ok and good.verdict is Verdict.OK
    assert not bad.ok and bad.verdict is Verdict.FAILS
    assert bad.failed_tier is tier
    assert bad.diagnosis == diagnosis
    assert bad.attempts == 2 and bad.persistable  # the same failure twice: a fact
    assert any(f"{tier.value} tier" in d for d in bad.details), bad.details
    assert report.get(0, 1) is bad and report.get(3, 3) is None


def test_start_runs_in_the_background():
    with p2pcheck.start(simulate=2, faults=["1->0:drop-writes"]) as pending:
        report = pending.wait(timeout=120)
        # The result is kept: asked again, the same verdicts.
        again = pending.poll()
    assert again is not None
    assert [p.ok for p in report.pairs] == [True, True, False, True]
    assert [p.ok for p in again.pairs] == [p.ok for p in report.pairs]


def test_errors_are_typed():
    with pytest.raises(p2pcheck.P2PCheckError) as e:
        p2pcheck.check([(0, 7)], simulate=2)
    assert e.value.status == 6  # INVALID_ARGUMENT
    with pytest.raises(ValueError):
        p2pcheck.check(simulate=2, engine="fastest")
    with pytest.raises(p2pcheck.P2PCheckError):
        p2pcheck.check(simulate=2, faults=["0->9:hang"])


def test_can_actually_p2p_is_vllms():
    assert p2pcheck.can_actually_p2p([], []) == []
    got = p2pcheck.can_actually_p2p(
        [0, 1, 1], [1, 0, 1], simulate=2, faults=["0->1:drop-writes"], engine="vllm", level="copy"
    )
    assert got == [False, True, True]
    with pytest.raises(ValueError):
        p2pcheck.can_actually_p2p([0], [0, 1])


def test_access_check_keeps_vllms_key_error(tmp_path):
    kw = dict(simulate=2, cache_dir=str(tmp_path))
    assert p2pcheck.access_check(0, 1, **kw) is True
    with pytest.raises(KeyError):
        p2pcheck.access_check(0, 2, **kw)
    with pytest.raises(KeyError):
        p2pcheck.access_check("01", 1, **kw)


@pytest.mark.parametrize(
    "fault,environ",
    [
        (None, {}),
        ("0->1:drop-writes", {"NCCL_P2P_DISABLE": "1", "FORCE_NCCL_ALL_REDUCE_STRATEGY": "1"}),
        ("0->1:ipc-open-fails", {"NCCL_P2P_DISABLE": "1", "FORCE_NCCL_ALL_REDUCE_STRATEGY": "1"}),
        ("0->1:sm-only", {"FORCE_NCCL_ALL_REDUCE_STRATEGY": "1"}),
        ("0->1:late-visibility", {"FORCE_NCCL_ALL_REDUCE_STRATEGY": "1"}),
    ],
)
def test_env_gives_the_settings_of_each_tier(fault, environ):
    advice = p2pcheck.env(simulate=2, faults=[fault] if fault else [])
    assert advice.environ() == environ
    assert advice.all_ok == (fault is None)
    if fault is None:
        assert advice.settings == () and advice.flags("vllm") == ()
        return
    assert advice.flags("vllm") == ("--disable-custom-all-reduce",)
    assert advice.flags("sglang") == ("--disable-custom-all-reduce",)
    for s in advice.settings:
        assert [(c.src, c.tgt) for c in s.causes] == [(0, 1)]
        assert "0->1" in s.because


def test_prepare_writes_the_caches_the_cli_writes(tmp_path):
    faults = ["1->0:drop-writes"]
    dirs = {k: tmp_path / k for k in ["cli", "vllm", "sglang", "access", "env-v", "env-s"]}
    done = p2pcheck.run_cli(
        ["--simulate", "2", "--fault", faults[0], "--write-vllm-cache", "--cache-dir", str(dirs["cli"])]
    )
    assert done.returncode == 1, done.stderr
    want = (dirs["cli"] / CACHE_NAME).read_bytes()
    # vLLM's own writer, json.dump(cache, f, indent=4), gives the same bytes.
    assert json.dumps(json.loads(want), indent=4).encode() == want
    assert json.loads(want) == {"0->0": True, "0->1": True, "1->0": False, "1->1": True}

    v = p2pcheck.vllm.prepare(cache_dir=str(dirs["vllm"]), simulate=2, faults=faults)
    s = p2pcheck.sglang.prepare(cache_dir=str(dirs["sglang"]), simulate=2, faults=faults)
    assert Path(v.path) == dirs["vllm"] / CACHE_NAME and not v.all_ok
    assert Path(s.path) == dirs["sglang"] / CACHE_NAME
    assert p2pcheck.access_check(
        1, 0, cache_dir=str(dirs["access"]), simulate=2, faults=faults
    ) is False
    p2pcheck.env(
        simulate=2, faults=faults, cache_dir=dirs["env-v"], sglang_cache_dir=dirs["env-s"]
    )
    for name, d in dirs.items():
        assert (d / CACHE_NAME).read_bytes() == want, name


def test_prepare_on_the_simulator_needs_a_folder():
    for engine in (p2pcheck.vllm, p2pcheck.sglang):
        with pytest.raises(ValueError):
            engine.prepare(simulate=2)


def test_sglang_folder_is_sglangs():
    assert p2pcheck.sglang.default_cache_dir() == os.path.join(
        os.environ["HOME"], ".cache", "sglang"
    )


def test_the_console_script_runs_the_bundled_cli():
    script = shutil.which("p2pcheck", path=os.path.dirname(sys.executable))
    assert script, "the console script is installed beside the interpreter"
    done = subprocess.run([script, "--json", "--simulate", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["schema"] == 1 and report["all_ok"] is True and report["device_count"] == 2


def test_prometheus_text_parses():
    from prometheus_client.parser import text_string_to_metric_families

    done = p2pcheck.run_cli(
        ["--simulate", "2", "--fault", "0->1:sm-only", "--format", "prometheus"]
    )
    assert done.returncode == 1, done.stderr
    families = {f.name: f for f in text_string_to_metric_families(done.stdout)}
    for name in [
        "p2pcheck_check_success",
        "p2pcheck_check_duration_seconds",
        "p2pcheck_last_run_timestamp_seconds",
        "p2pcheck_pair_ok",
        "p2pcheck_pair_tier",
        "p2pcheck_remedy",
    ]:
        assert families[name].type == "gauge", name
    ok = {(s.labels["src"], s.labels["tgt"]): s.value for s in families["p2pcheck_pair_ok"].samples}
    assert ok == {("0", "0"): 1, ("0", "1"): 0, ("1", "0"): 1, ("1", "1"): 1}
    tiers = {
        s.labels["tier"]: s.value
        for s in families["p2pcheck_pair_tier"].samples
        if (s.labels["src"], s.labels["tgt"]) == ("0", "1")
    }
    # sm-only breaks every SM access through the mapping: the handshake tier too.
    assert tiers == {"copy": 1, "kernel": 0, "handshake": 0}
    remedy = {s.labels["remedy"]: s.value for s in families["p2pcheck_remedy"].samples}
    assert remedy == {"nccl-p2p-off": 0, "custom-all-reduce-off": 1}

    failed = p2pcheck.run_cli(
        ["--simulate", "2", "--format", "prometheus"], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    )
    assert failed.returncode == 2
    families = {f.name: f for f in text_string_to_metric_families(failed.stdout)}
    assert families["p2pcheck_check_success"].samples[0].value == 0
