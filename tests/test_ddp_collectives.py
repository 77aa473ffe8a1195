"""No collective in a training step: under data parallelism (gloo, two spawned processes,
as torchrun would start them) the ranks talk between steps only at a log flush, where one
all-reduce carries the logged values and the stop flag; and a stop signal sent to one rank
stops both at the same step boundary, after one checkpoint.

Every Python-level collective of ``torch.distributed`` is counted in the child processes
(DDP's gradient all-reduce runs inside its C++ reducer, in the backward: not counted, and
not a step's extra cost), with the optimizer step each one follows.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from regdrop import train as training
from regdrop.checkpoint import CHECKPOINT, load_checkpoint
from regdrop.preemption import PREEMPTED, Preempted
from tests.conftest import TINY, TINY_MODELS, compose_config
from tests.test_ddp import free_port

WORLD = 2
COLLECTIVES = ("all_reduce", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object",
               "gather_object", "reduce", "barrier")
# 96 images, 8 per process: 6 optimizer steps in the one epoch, logged every 3.
CONFIG = [*TINY, *TINY_MODELS["lenet"], "dropout=standard", "data.image_size=16", "data.channels=1",
          "data.num_train=96", "data.batch_size=8", "trainer.epochs=1", "trainer.max_steps=null",
          "trainer.threads=1", "trainer.log_every=3", "trainer.checkpoint_every=null"]
SIGNAL_BEFORE = 1  # the step before which rank 1 (only) receives SIGTERM


def worker(rank: int, jobs: list[tuple[str, str, bool, int]]) -> None:
    """One rank of each job ``(config yaml, out file, send the signal, port)``: train with
    every collective and every step recorded, in order, into the out file."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(WORLD),
                      WANDB_SILENT="true")
    for config, out, send_signal, port in jobs:
        os.environ["MASTER_PORT"] = str(port)
        events: list = []
        with pytest.MonkeyPatch.context() as patch:
            for name in COLLECTIVES:
                original = getattr(torch.distributed, name)
                patch.setattr(torch.distributed, name,
                              lambda *a, _name=name, _original=original, _events=events, **k:
                              _events.append(_name) or _original(*a, **k))
            step_once = training.train_step

            def step(parts, batches, number, factor, _step_once=step_once, _events=events, _signal=send_signal):
                _events.append(number)
                if _signal and rank == 1 and number == SIGNAL_BEFORE:
                    os.kill(os.getpid(), signal.SIGTERM)
                return _step_once(parts, batches, number, factor)

            patch.setattr(training, "train_step", step)
            code = 0
            try:
                training.train(OmegaConf.create(config))
            except Preempted as stopped:
                code = stopped.code
                torch.distributed.destroy_process_group()
        torch.save({"events": events, "code": code}, Path(out) / f"rank{rank}.pt")


def collectives_after_each_step(events: list) -> dict[int, list[str]]:
    """The collectives between the start of each optimizer step and the start of the next
    (the last step: until the run ends)."""
    after: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, int):
            after[event] = []
        elif after:
            after[max(after)].append(event)
    return after


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """Two two-process runs: uninterrupted, and with SIGTERM sent to rank 1 alone."""
    root = tmp_path_factory.mktemp("collectives")
    jobs, folders = [], {}
    for name, send_signal in (("whole", False), ("signalled", True)):
        folders[name] = root / name
        folders[name].mkdir()
        cfg = compose_config(CONFIG, folders[name] / "run")
        jobs.append((OmegaConf.to_yaml(cfg), str(folders[name]), send_signal, free_port()))
    threads = torch.get_num_threads()
    try:
        mp.start_processes(worker, args=(jobs,), nprocs=WORLD, start_method="spawn")
    finally:
        torch.set_num_threads(threads)
    return {name: (folder, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)])
            for name, folder in folders.items()}


def test_a_step_issues_no_collective_the_ranks_talk_once_per_log_flush(runs):
    _, ranks = runs["whole"]
    for rank in ranks:
        after = collectives_after_each_step(rank["events"])
        assert sorted(after) == list(range(6))
        # Steps 0..4: nothing but the flush after step 2 (the loss, accuracy and stop flag
        # in one all-reduce); after step 5 come the epoch's flush, evaluation and checkpoint.
        assert {step: after[step] for step in range(5)} == {0: [], 1: [], 2: ["all_reduce"], 3: [], 4: []}


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_after_one_checkpoint(runs):
    folder, ranks = runs["signalled"]
    assert [rank["code"] for rank in ranks] == [PREEMPTED, PREEMPTED]
    # Asked before step 1, agreed at the flush after step 2: both ranks ran steps 0..2.
    assert [[e for e in rank["events"] if isinstance(e, int)] for rank in ranks] == [[0, 1, 2], [0, 1, 2]]
    saved = load_checkpoint(folder / "run" / CHECKPOINT)
    assert saved["state"]["step"] == 3 and saved["world_size"] == WORLD
