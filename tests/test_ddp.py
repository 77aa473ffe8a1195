"""Data parallelism on the CPU (gloo): two processes step like one process on the global batch,
with gyro's sub-batches cut from the global batch and block-mode gates agreeing on every rank."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from regdrop.data import DataInfo
from regdrop.methods import apply_method, setup_run
from regdrop.methods.gyro import GyroDropout
from regdrop.models import build_model
from regdrop.runtime import Runtime
from regdrop.train import StepParts, train_step, wrap
from tests.conftest import FASHION_MNIST_INSTALLED, ROOT

STEPS, BATCH, WORLD = 4, 8, 2  # BATCH per process; the global batch is BATCH * WORLD
CASES = {
    "gyro": ({"name": "lenet", "width": 0.125}, {"name": "gyro", "p": 0.5, "sigma": 8, "tau": 4, "seed": 3}),
    "block": ({"name": "vit_tiny", "depth": 3, "embed_dim": 32, "num_heads": 2, "patch_size": 4},
              {"name": "stochastic_depth", "p": 0.5, "mode": "block", "seed": 3}),
}


def global_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(BATCH * WORLD, 1, 16, 16, generator=generator),
             torch.randint(0, 10, (BATCH * WORLD,), generator=generator)) for _ in range(steps)]


def run_steps(case: str, rank: int, world_size: int) -> dict:
    """STEPS optimizer steps of ``case``; rank r trains on its slice of each global batch."""
    model_cfg, method_cfg = CASES[case]
    torch.manual_seed(0)
    model = build_model(OmegaConf.create(model_cfg), DataInfo("synthetic", 10, 1, 16, 64, 16))
    apply_method(model, method_cfg)
    setup_run(model, STEPS, rank, world_size)
    gates = [m for m in model.modules() if type(m).__name__ == "BranchGate"]
    drawn = []
    for gate in gates:
        keep = gate.keep
        gate.keep = lambda keep=keep: drawn.append(keep()) or drawn[-1]
    runtime = Runtime(torch.device("cpu"), None, rank, world_size)
    # Momentum and weight decay: a skipped branch given a zero gradient instead of none
    # would still move (as it does not on one process).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    parts = StepParts(model, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                      torch.amp.GradScaler("cpu", enabled=False), runtime)
    parts.net = wrap(model, runtime, OmegaConf.create({"compile": False}))
    # No find_unused_parameters graph walk after every forward, block mode included.
    assert not getattr(parts.net, "find_unused_parameters", False)
    record = {"loss": [], "params": [], "selection": []}
    for step, (x, y) in enumerate(global_batches(STEPS)):
        local = slice(rank * BATCH, (rank + 1) * BATCH) if world_size > 1 else slice(None)
        out = train_step(parts, iter([(x[local], y[local])]), step, 1.0)
        loss = runtime.all_reduce_sum(out.loss.detach().clone()) / world_size
        record["loss"].append(loss.item())
        record["params"].append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        record["selection"].append([m.selection.tolist() for m in model.modules() if isinstance(m, GyroDropout)])
    record["gates"] = drawn
    record["banks"] = [m.scores.clone() for m in model.modules() if isinstance(m, GyroDropout)]
    return record


def worker(rank: int, case: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.save(run_steps(case, rank, WORLD), Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_step_like_one_process_on_the_global_batch(case, tmp_path):
    mp.start_processes(worker, args=(case, free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = run_steps(case, 0, 1)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)  # the ranks never drift apart
    assert ranks[0]["selection"] == ranks[1]["selection"] == single["selection"]
    assert ranks[0]["gates"] == ranks[1]["gates"] == single["gates"]
    for a, b in zip(ranks[0]["banks"], single["banks"], strict=True):
        assert torch.equal(a, b)
    if case == "block":
        assert 0 < sum(not g for g in single["gates"]) < len(single["gates"])  # some branches dropped
    for step in range(STEPS):
        assert ranks[0]["loss"][step] == pytest.approx(single["loss"][step], rel=1e-5, abs=1e-6)
        torch.testing.assert_close(ranks[0]["params"][step], single["params"][step], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not FASHION_MNIST_INSTALLED, reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed beside this Python")
def test_torchrun_leaves_one_run_folder_one_metrics_file_and_one_wandb_run(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "train.py", "dropout=gyro", "trainer=smoke",
         f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = list(tmp_path.rglob("metrics.json"))
    assert len(metrics) == 1
    folder = metrics[0].parent
    assert len(list(tmp_path.rglob("metrics.jsonl"))) == 1 and len(list(tmp_path.rglob(".hydra"))) == 1
    assert len(list(folder.glob("wandb/offline-run-*"))) == 1 and not list(tmp_path.rglob("wandb/*/wandb/*"))
    summary = json.loads(metrics[0].read_text())
    assert summary["step"] == 4
    assert "x 2 process(es)" in (folder / "train.log").read_text()
