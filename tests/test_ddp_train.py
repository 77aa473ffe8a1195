"""Data parallelism through `train()` itself (gloo, two spawned processes, as torchrun
would start them): a two-process run killed mid-epoch resumes bit-exact, every rank from its
own generators; and two processes with accumulation train like one process on the global
batch (the all-reduce on the last micro-batch, the methods seeded alike on every rank, the
learning rate scaled to the global batch).

The two processes are started once for the module and run every job in turn; the tests
read the run folders they leave.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from regdrop.checkpoint import CHECKPOINT, load_checkpoint
from regdrop.train import train
from tests.conftest import TINY, TINY_MODELS, compose_config
from tests.test_ddp import free_port
from tests.test_resume_exact import Killed, assert_same_run, kill_before_step, records

WORLD = 2
SMALL = [*TINY, "data.image_size=16", "data.channels=1", "data.num_train=96", "trainer.epochs=2",
         "trainer.max_steps=null", "trainer.deterministic=true", "trainer.threads=1", "trainer.log_every=3"]
# Standard dropout draws from torch's global generator, seeded per rank: a resume must give
# each rank its own. 8 images per process: 6 steps an epoch; checkpoints at 4 and 8.
KILLED = [*SMALL, *TINY_MODELS["lenet"], "dropout=standard", "data.batch_size=8", "trainer.checkpoint_every=4"]
KILL_AT = 9
# Block-mode stochastic depth: gates that every rank must draw alike. 2 x 8 images x 2
# micro-batches = 32 a step, 3 steps an epoch; optim.lr is the rate at batch 64, so the run
# uses half of it.
ACCUMULATED = [*SMALL, *TINY_MODELS["vit_tiny"], "dropout=stochastic_depth", "dropout.mode=block",
               "dropout.p=0.5", "data.batch_size=8", "trainer.grad_accum=2", "optim.reference_batch=64",
               "optim.lr=0.2"]


def worker(rank: int, jobs: list[tuple[str, int | None, list[int]]]) -> None:
    """One rank of every job: ``(config yaml, kill step or None, two free ports)``; a killed job is
    resumed by a second `train()` in a new process group, as a relaunch would be."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(WORLD),
                      WANDB_SILENT="true")
    for config, kill_at, ports in jobs:
        cfg = OmegaConf.create(config)
        os.environ["MASTER_PORT"] = str(ports[0])
        if kill_at is not None:
            with pytest.MonkeyPatch.context() as patch:
                kill_before_step(patch, kill_at)
                try:
                    train(cfg)
                except Killed:
                    pass
                else:
                    raise AssertionError(f"rank {rank} was not killed at step {kill_at}")
            torch.distributed.destroy_process_group()  # what the dead processes held
            os.environ["MASTER_PORT"] = str(ports[1])
        train(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The run folders: two processes uninterrupted, killed then resumed, with accumulation."""
    root = tmp_path_factory.mktemp("ddp")
    folders = {name: root / name for name in ("whole", "killed", "accumulated")}
    killed = compose_config(KILLED, folders["whole"])
    accumulated = compose_config(ACCUMULATED, folders["accumulated"])
    jobs = []
    for name, cfg, kill_at in (("whole", killed, None), ("killed", killed, KILL_AT),
                               ("accumulated", accumulated, None)):
        cfg = cfg.copy()
        cfg.paths.output_dir = str(folders[name])
        jobs.append((OmegaConf.to_yaml(cfg), kill_at, [free_port(), free_port()]))
    threads = torch.get_num_threads()
    try:
        mp.start_processes(worker, args=(jobs,), nprocs=WORLD, start_method="spawn")
    finally:
        torch.set_num_threads(threads)
    return folders


def test_a_two_process_run_killed_mid_epoch_resumes_bit_exact_on_every_rank(runs):
    assert load_checkpoint(runs["killed"] / CHECKPOINT)["world_size"] == WORLD
    assert [r["step"] for r in records(runs["killed"]) if "train/loss" in r] == list(range(12))
    assert "resumed at optimizer step 8" in (runs["killed"] / "train.log").read_text()
    assert_same_run(runs["whole"], runs["killed"])


def test_two_processes_with_accumulation_train_like_one_process_on_the_global_batch(runs, tmp_path):
    single = compose_config([*ACCUMULATED, "data.batch_size=16"], tmp_path / "single")
    threads = torch.get_num_threads()
    try:
        train(single)
    finally:
        torch.set_num_threads(threads)
    one, two = Path(single.paths.output_dir), runs["accumulated"]
    assert "x 2 process(es), batch 8 per process x 2 micro-batches = 32 global" in (two / "train.log").read_text()
    steps_one = [r for r in records(one) if "train/loss" in r]
    steps_two = [r for r in records(two) if "train/loss" in r]
    assert [r["step"] for r in steps_two] == list(range(6))
    # the same learning rate, scaled from the reference batch 64 to the global batch 32
    assert [r["lr"] for r in steps_two] == [r["lr"] for r in steps_one]
    assert steps_one[0]["lr"] == pytest.approx(0.1)
    for a, b in zip(steps_one, steps_two, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
    weights_one = load_checkpoint(one / CHECKPOINT)["model"]
    weights_two = load_checkpoint(two / CHECKPOINT)["model"]
    assert weights_one.keys() == weights_two.keys()
    for key in weights_one:
        torch.testing.assert_close(weights_two[key], weights_one[key], rtol=1e-5, atol=1e-6, msg=key)
    summary_one = json.loads((one / "metrics.json").read_text())
    summary_two = json.loads((two / "metrics.json").read_text())
    assert summary_two["test/acc"] == summary_one["test/acc"]
