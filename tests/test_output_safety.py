"""Outputs never cost the user data: every command-line writer refuses, before any work, a target
that would replace what lowbit did not write (or the input, the working directory, home, root);
``atomic_dir`` refuses the same on its own; stale temporaries of killed runs are removed; one
Ctrl-C ends a sweep promptly and keeps its finished rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit.atomic import MARKER, _HOST, atomic_dir, atomic_file, clean_stale
from lowbit.errors import LowbitError
from lowbit.outputs import check_output

MODEL, MODEL_PARENT = "<model>", "<model parent>"  # stand for the small checkpoint (and its folder) below


@pytest.fixture(scope="module")
def small_model(small_model_dir) -> Path:
    return small_model_dir


@pytest.fixture()
def work(tmp_path, monkeypatch) -> Path:
    """The working directory: the user's ``victim`` (notes and a thesis), a file, calibration text."""
    (tmp_path / "victim" / "sub").mkdir(parents=True)
    (tmp_path / "victim" / "notes.txt").write_text("my notes\n")
    (tmp_path / "victim" / "sub" / "thesis.tex").write_text("\\section{Results}\n")
    (tmp_path / "mine.gguf").write_bytes(b"GGUF user file")
    (tmp_path / "calib.txt").write_text("A few sentences of calibration text about many things.\n" * 200)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every path under ``roots`` (hidden ones too) with its bytes (None for a directory)."""
    out: dict[str, bytes | None] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = None if p.is_dir() else p.read_bytes()
    return out


REFUSED = [
    (("quantize", MODEL, "--out", "victim"), "pass --overwrite"),
    (("quantize", MODEL, "--out", MODEL, "--overwrite"), "is the input"),
    (("quantize", MODEL, "--out", ".", "--overwrite"), "is the working directory"),
    (("quantize", MODEL, "--out", "..", "--overwrite"), "holding the working directory"),
    (("quantize", MODEL, "--out", MODEL_PARENT, "--overwrite"), "holding the input"),
    (("quantize", MODEL, "--out", ""), "--out is empty"),
    (("quantize", MODEL, "--out", "calib.txt", "--overwrite"), "is the input"),
    (("quantize", MODEL, "--out", "victim/notes.txt"), "is not a directory"),
    (("quantize", MODEL, "--out", "mine.gguf/q"), "is a file, not a directory"),
    (("quantize", MODEL, "--out", "/proc/lowbit-out"), "under /proc"),
    (("quantize", MODEL, "--target-bpw", "4", "--sensitivity", "victim"), "holding no lowbit results"),
    (("export", MODEL, "victim"), "pass --overwrite"),
    (("export", MODEL, MODEL, "--overwrite"), "is the input"),
    (("export", MODEL, "mine.gguf", "--format", "gguf"), "already exists"),
    (("export", MODEL, "victim", "--format", "gguf", "--overwrite"), "is a directory"),
    (("export", MODEL, "/dev/null", "--format", "gguf", "--overwrite"), "under /dev"),
    (("sweep", MODEL, "--methods", "rtn", "--out", "victim"), "holding no lowbit results"),
    (("sweep", MODEL, "--methods", "rtn", "--out", ""), "--out is empty"),
    (("analyze", MODEL, "--out", "victim"), "holding no lowbit results"),
    (("report", "victim"), "holding no lowbit results"),
]


@pytest.mark.parametrize(("argv", "needle"), REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused_before_any_work_and_nothing_changes(argv, needle, small_model, work, run_cli, clean_error):
    before = snapshot(work, small_model)
    argv = [{MODEL: str(small_model), MODEL_PARENT: str(small_model.parent)}.get(a, a) for a in argv]
    if argv[0] == "quantize":
        argv += ["--calib", "calib.txt", "--nsamples", "2", "--seqlen", "64"]
    code, _, err = run_cli(*argv)
    clean_error(code, err, needle)
    assert len(err.splitlines()) == 1, err  # the one error line, nothing before it (no work started)
    assert snapshot(work, small_model) == before


def test_previous_outputs_are_replaced_and_overwrite_replaces_the_rest(small_model, work, run_cli):
    quantize = ("quantize", str(small_model), "--method", "rtn", "--group-size", "32", "--calib", "calib.txt",
                "--nsamples", "2", "--seqlen", "64")
    for _ in range(2):  # the second run replaces the first (a lowbit output) without --overwrite
        code, _, err = run_cli(*quantize, "--out", "q")
        assert code == 0, err
    assert (work / "q" / MARKER).is_file() and (work / "q" / "lowbit_summary.json").is_file()
    for _ in range(2):
        code, _, err = run_cli("export", "q", "fq", "--format", "fake-quant")
        assert code == 0, err
    code, _, err = run_cli(*quantize, "--out", "victim", "--overwrite")  # the user asked: victim is replaced
    assert code == 0, err
    assert not (work / "victim" / "notes.txt").exists() and (work / "victim" / "config.json").is_file()
    assert not [p for p in work.iterdir() if ".tmp-" in p.name]


def test_check_output_kinds(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "sweep.json").write_text("{}")
    (tmp_path / "results" / "notes.txt").write_text("kept")
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "results", "results") == tmp_path / "results"  # a previous results dir
    assert check_output(tmp_path / "empty", "dir") == tmp_path / "empty"
    assert check_output(tmp_path / "new" / "deeper" / "m.gguf", "file") == tmp_path / "new" / "deeper" / "m.gguf"
    with pytest.raises(LowbitError, match="is a file"):
        check_output(tmp_path / "results" / "notes.txt", "results")
    with pytest.raises(LowbitError, match="did not write"):
        check_output(tmp_path / "results", "dir")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(LowbitError, match="your home directory"):
        check_output(home, "dir", overwrite=True)


def test_atomic_dir_refuses_what_lowbit_did_not_write(work):
    before = snapshot(work)
    with pytest.raises(LowbitError, match="did not write"):
        with atomic_dir(work / "victim") as tmp:
            (tmp / "x").write_text("never reached")
    with pytest.raises(LowbitError, match="working directory"):
        with atomic_dir(Path(".")) as tmp:
            (tmp / "x").write_text("never reached")
    assert snapshot(work) == before


def _killed_writer(target: Path) -> None:
    """Run a writer of ``target`` in a child process and SIGKILL it while its temporary is half written."""
    code = ("import sys, time; from pathlib import Path; from lowbit.atomic import atomic_dir\n"
            "with atomic_dir(Path(sys.argv[1])) as tmp:\n"
            "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
            "    print('writing', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "out"
    _killed_writer(out)
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert (left / "model.safetensors").is_file()
    live = tmp_path / f".out.tmp-{os.getpid()}-{_HOST}-abcdefgh"  # a writer still running: kept
    old = tmp_path / ".out.tmp-k1x9_2ab"  # an older version's name: removed once old
    young = tmp_path / ".out.tmp-zz3y_9ab"
    others = [tmp_path / ".out.tmp-not-lowbit", tmp_path / ".other.tmp-12-abcdef12-abcdefgh", tmp_path / "out.tmp-1"]
    for p in (live, old, young, *others):
        p.mkdir()
    os.utime(old, (time.time() - 7 * 3600,) * 2)
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"out", live.name, young.name, *(p.name for p in others)}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", MARKER]
    (tmp_path / f".f.txt.tmp-{os.getpid() + 10**7}-{_HOST}-abcdefgh").write_text("x")  # no such process
    with atomic_file(tmp_path / "f.txt") as tmp:
        tmp.write_text("done")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".f.txt.tmp-")]
    assert clean_stale(out) == []


def _live_members(pgid: int) -> list[int]:
    """PIDs of the processes of group ``pgid`` that are still running (zombies excluded)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
def test_sigint_ends_a_sweep_promptly(small_model, work, data_dir):
    """Ctrl-C (SIGINT to the process group) while the second configuration runs."""
    out = work / "sweep"
    cmd = [sys.executable, "-m", "lowbit.cli", "sweep", str(small_model), "--methods", "rtn,gptq", "--bits", "8,4",
           "--group-sizes", "32", "--calib", "calib.txt", "--nsamples", "2", "--seqlen", "64", "--eval-seqlen", "64",
           "--max-windows", "1", "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # a new session stands for the terminal's process group: Ctrl-C reaches the sweep and its workers
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        for line in proc.stdout:  # the first row is finished and the second one running
            lines.append(line)
            if line.startswith("rtn-w8g32:"):
                break
        assert lines and lines[-1].startswith("rtn-w8g32:"), "".join(lines) + proc.stderr.read()
        time.sleep(1.0)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert seconds < 30
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    deadline = time.monotonic() + 10
    while _live_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _live_members(proc.pid) == []  # no worker left behind
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["rtn-w8g32"] and rows[0]["status"] == "ok"
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
