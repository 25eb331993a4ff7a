"""Many processes (gzq.dist): the collectives against their single-process formulas, and torchrun runs of the CLI."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gzq import dist
from gzq.bn import channel_moments, global_channel_moments
from gzq.pipeline import check_world
from gzq.presets import make_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------- one process

def test_helpers_are_no_ops_in_one_process():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_(t, "mean") is t and t.tolist() == [1.0, 2.0]
    assert dist.shard(5).tolist() == [0, 1, 2, 3, 4] and dist.local_slice(torch.arange(3)).tolist() == [0, 1, 2]
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    x = torch.randn(4, 3, 5, 5)
    mean, var, n = global_channel_moments(x)
    ref_mean, ref_var = channel_moments(x)
    assert torch.equal(mean, ref_mean) and torch.equal(var, ref_var) and n == 4 * 25


def test_budgets_too_small_for_the_processes_are_refused():
    cfg = make_config("cpu", device="cpu", synth=dict(num_images=8, holdout_images=4, batch_size=8))
    check_world(cfg, 1)
    check_world(cfg, 2)
    with pytest.raises(ValueError, match="3 processes need at least 6 training images"):
        check_world(cfg, 3)
    with pytest.raises(ValueError, match="train.batch_size=2"):
        check_world(make_config("cpu", device="cpu", train=dict(batch_size=2)), 4)


# ------------------------------------------------------------------------------------- two gloo processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives_worker(rank: int, world: int, port: int, out: str) -> None:
    """Each rank holds half of one batch; the reduced results must equal the single-process ones on all of it."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_from_env(torch.device("cpu"))
    try:
        from gzq.quant.modules import ActQuantizer
        from gzq.quant.convert import calibrate_
        gen = torch.Generator().manual_seed(0)
        full = torch.randn(8, 3, 6, 6, generator=gen) * 2 + 1          # the same global batch on every rank
        mine = full[dist.shard(8)].clone().requires_grad_(True)
        mean, var, n = global_channel_moments(mine)
        (mean.sum() + var.pow(2).sum()).backward()
        whole = full.clone().requires_grad_(True)
        ref_mean, ref_var = channel_moments(whole)
        (ref_mean.sum() + ref_var.pow(2).sum()).backward()
        q, ref_q = torch.nn.Sequential(ActQuantizer(4)), torch.nn.Sequential(ActQuantizer(4))
        calibrate_(q, [mine.detach()])
        lin = torch.nn.Linear(3, 2)
        torch.nn.init.constant_(lin.weight, 1.0)
        lin(mine.detach().mean((2, 3))).sum().backward()
        dist.average_gradients_(lin.parameters())
        gathered = dist.gather_rows(mine.detach(), 8)
        res = dict(n=n, mean=bool(torch.allclose(mean, ref_mean, atol=1e-5)),
                   var=bool(torch.allclose(var, ref_var, atol=1e-5)),
                   grad=bool(torch.allclose(mine.grad, whole.grad[dist.shard(8)], atol=1e-5)),
                   gathered=bool(torch.equal(gathered, full)), scale=float(q[0].scale), bias_grad=lin.bias.grad.tolist())
        if rank == 0:   # the single-process calibration on the whole batch
            dist_world = dist.world_size
            dist.world_size = lambda: 1
            try:
                calibrate_(ref_q, [full])
            finally:
                dist.world_size = dist_world
            res["ref_scale"] = float(ref_q[0].scale)
        Path(out, f"{rank}.json").write_text(json.dumps(res))
    finally:
        dist.shutdown()


@pytest.mark.slow
def test_collectives_match_one_process_on_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_collectives_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["n"] == 8 * 36 and r["mean"] and r["var"] and r["grad"] and r["gathered"]
    assert r0["scale"] == r1["scale"] == pytest.approx(r0["ref_scale"], rel=1e-6)   # calibration: all the data
    assert r0["bias_grad"] == r1["bias_grad"] == [4.0, 4.0]   # mean of the ranks' sums over 4 rows each


# ----------------------------------------------------------------------------------------- torchrun runs

#: one budget for both runs: 128 images, 60 synthesis steps, W4A4 with block reconstruction (~15 s each on 2 cores)
BUDGET = ["--model", "default", "--device", "cpu", "--students", "w4a4", "--steps", "60", "--images", "128",
          "--epochs", "8", "--export", "none", "--seed", "0", "--finetune", "recon"]


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), "-m", "gzq", "run", *args]


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_budget(tmp_path):
    """torchrun with 2 gloo processes completes, writes one run folder, and its W4A4 accuracy is within 0.5 pt
    of the single-process run with the same images, steps and global batch."""
    one = subprocess.run([sys.executable, "-m", "gzq", "run", *BUDGET, "--out", str(tmp_path / "one")], cwd=ROOT,
                         env={**ENV, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_torchrun(2, *BUDGET, "--out", str(tmp_path / "two")), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]   # one folder each, no .partial
    assert two.stdout.count("teacher (FP32)") == 1                       # rank 0 alone reports
    r1, r2 = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("one", "two"))
    assert r1["processes"] == 1 and r2["processes"] == 2 and r2["budget"]["processes"] == 2
    assert len(list((tmp_path / "two" / "images").glob("*.png"))) == 128   # every rank's shard, gathered
    a1, a2 = r1["students"][0]["accuracy"], r2["students"][0]["accuracy"]
    assert abs(a1 - a2) <= 0.5, (a1, a2)
    assert len(r2["students"][0]["act_percentile_kl"]) == 3   # probed; ranks that picked apart would fail the
    # check that their students are identical


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split()
        out += [int(k) for k in kids]
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_killing_one_rank_mid_run_leaves_no_folder(tmp_path, victim):
    """SIGKILL one process during synthesis: the other fails at its next collective (or is stopped by torchrun),
    the job exits non-zero, and neither the run folder nor its .partial exists."""
    out = tmp_path / "run"
    args = ["--model", "default", "--device", "cpu", "--steps", "200", "--images", "128", "--export", "none"]
    p = subprocess.Popen(_torchrun(2, *args, "--out", str(out)),
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if line.startswith("synthesis ") and "/200" in line:
                break
        else:
            pytest.fail(f"no synthesis progress: {p.stderr.read()[-2000:]}")
        ranks = {_rank_of(c): c for c in _children(p.pid)}
        os.kill(ranks[victim], signal.SIGKILL)
        t = time.time()
        rc = p.wait(timeout=120)
        assert rc != 0 and time.time() - t < 90
    finally:
        if p.poll() is None:
            p.kill()
    assert not out.exists() and not (tmp_path / "run.partial").exists(), list(tmp_path.iterdir())


@pytest.mark.slow
def test_torchrun_refuses_more_processes_than_images(tmp_path):
    r = subprocess.run(_torchrun(2, "--model", "default", "--device", "cpu", "--steps", "2", "--images", "3",
                                 "--export", "none", "--out", str(tmp_path / "run")),
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.startswith("error: 2 processes need at least 4 training images")   # before torchrun's summary
    assert "/gzq/" not in r.stderr and not list(tmp_path.iterdir())                  # no traceback of ours
