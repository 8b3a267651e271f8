"""Data-parallel calibration (``lowbit.ranks``): two ranks give what one process gives, steps that would fit on
one rank's windows alone are refused before work, and a rank that fails stops the others with one error line."""

from __future__ import annotations

import subprocess
import sys
import time

from lowbit.ranks import Ranks


def test_shares_cover_every_window_once():
    for n in (2, 7, 128):
        for world in (1, 2, 3):
            parts = [range(n)[Ranks(r, world).share(n)] for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


ARGS = ("--recipe", "gptq-w4g64", "--nsamples", "8", "--seqlen", "64")


def test_two_ranks_write_what_one_process_writes(run_cli, small_model_dir, tmp_path):
    from safetensors.torch import load_file

    two = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", str(small_model_dir), *ARGS, "--out",
                          str(tmp_path / "two"), "--nproc", "2"], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert "512 tokens" in two.stdout  # the report counts every rank's windows
    code, _, err = run_cli("quantize", str(small_model_dir), *ARGS, "--out", str(tmp_path / "one"))
    assert code == 0, err
    a, b = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert a.keys() == b.keys()
    # summation order differs (each rank sums its own windows first): measured max diff 0.0 here
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4


def test_block_fitting_steps_are_refused_before_ranks_start(run_cli, small_model_dir, tmp_path, clean_error):
    code, _, err = run_cli("quantize", str(small_model_dir), "--recipe", "awq-w4g64", "--out", str(tmp_path / "o"),
                           "--nproc", "2")
    clean_error(code, err, "'awq'", "one process")
    assert not (tmp_path / "o").exists()


RANK_FAILS = '''
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == 1:
    print("error: rank 1 could not read its windows", file=sys.stderr)
    sys.exit(2)
dist.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that is gone
print("unreachable")
'''


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path, monkeypatch, capsys):
    from lowbit.cli.launch import launch

    (tmp_path / "rank_fails.py").write_text(RANK_FAILS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    t0 = time.perf_counter()
    code = launch(2, [], module="rank_fails")
    assert code == 2 and time.perf_counter() - t0 < 120  # no hang (gloo's own timeout is 30 min)
    assert capsys.readouterr().err.strip() == "error: rank 1 could not read its windows"


def test_ranks_refuse_nproc_below_one(run_cli, small_model_dir, clean_error):
    code, _, err = run_cli("quantize", str(small_model_dir), "--nproc", "0")
    clean_error(code, err, "--nproc")
