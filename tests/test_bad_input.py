"""Bad input: one paragraph naming the key, exit status 2, no traceback, nothing written;
and every `python train.py` command the README and docs show composes and validates."""

from __future__ import annotations

import hashlib
import itertools
import re
import shlex
from pathlib import Path

import pytest
from omegaconf import open_dict

from regdrop.cli import run
from regdrop.config import validate
from regdrop.train import train
from tests.conftest import CONF, ROOT, TINY, TINY_DATA, TINY_MODELS, compose_config, run_cli

BAD_INPUTS = [
    # the issue's own examples
    (["seed=-1"], "seed"),
    (["seed=notanumber"], "seed"),
    (["seed=12345678901"], "seed"),
    (["trainer.compile=true", "trainer.compile_backend=inductr"], "trainer.compile_backend"),
    (["schedule=late", "schedule.cutoff_epoch=1000"], "schedule.cutoff_epoch"),
    (["schedule=early", "schedule.cutoff_epoch=1000"], "schedule.cutoff_epoch"),
    (["dropout=gyro", "dropout.tau=64", "data.batch_size=32"], "dropout.tau"),
    # every section
    (["schedule=warmup", "schedule.warmup_epochs=100"], "schedule.warmup_epochs"),
    (["schedule=early", "schedule.shape=cosine"], "schedule.shape"),
    (["dropout.p=1.5"], "dropout.p"),
    (["dropout.p=null"], "dropout.p"),
    (["dropout=gyro", "dropout.tau=0"], "dropout.tau"),
    (["dropout=gyro", "dropout.sigma=4", "dropout.tau=8"], "dropout.tau"),
    (["dropout=gyro", "dropout.scaling=average"], "dropout.scaling"),
    (["dropout=stochastic_depth"], "dropout=stochastic_depth"),  # lenet has no residual blocks
    (["dropout=stochastic_depth", "model=resnet18", "dropout.mode=layer"], "dropout.mode"),
    (["dropout=dropconnect", "dropout.per=row"], "dropout.per"),
    (["dropout=multisample", "dropout.samples=0"], "dropout.samples"),
    (["dropout=spatial", "dropout.sites=[fc]"], "dropout.sites"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.batch_size=100000"], "data.batch_size"),
    (["data.subset=0"], "data.subset"),
    (["data.augment=maybe"], "data.augment"),
    (["data=cifar10", "data.root=/nonexistent/regdrop-data"], "data.root"),
    (["data=imagenet", "data.on_bad_image=ignore"], "data.on_bad_image"),
    (["model.width=abc"], "model"),
    (["+model.depth=3"], "model.depth"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim=adamw", "optim.betas=[0.9]"], "optim.betas"),
    # optimizer factors torch takes without a word (0.9 mistyped as 9) or fails on mid-build
    (["optim.momentum=9"], "optim.momentum"),
    (["optim.momentum=1"], "optim.momentum"),
    (["optim.momentum=-0.1"], "optim.momentum"),
    (["optim.momentum=0", "optim.nesterov=true"], "optim.nesterov"),
    (["optim.weight_decay=-1e-4"], "optim.weight_decay"),
    (["optim.lr=0"], "optim.lr"),
    (["optim=adamw", "optim.betas=[0.9,1.5]"], "optim.betas"),
    (["optim=adamw", "optim.betas=[-0.1,0.999]"], "optim.betas"),
    (["optim=adamw", "optim.betas=0.9"], "optim.betas"),
    (["optim=adamw", "optim.betas=[0.9,0.99,0.9]"], "optim.betas"),
    (["optim=rmsprop", "optim.alpha=1.0"], "optim.alpha"),
    (["optim=rmsprop", "optim.momentum=9"], "optim.momentum"),
    (["optim=rmsprop", "optim.eps=0"], "optim.eps"),
    (["optim=rmsprop", "optim.eps=-1"], "optim.eps"),
    (["lr=multistep", "lr.milestones=[1,abc]"], "lr.milestones"),
    (["lr.warmup_epochs=100"], "lr.warmup_epochs"),
    (["trainer.grad_accum=0"], "trainer.grad_accum"),
    (["trainer.precision=fp8"], "trainer.precision"),
    (["trainer.device=tpu"], "trainer.device"),
    (["trainer.epochs=true"], "trainer.epochs"),
    (["trainer.checkpoint_every=0"], "trainer.checkpoint_every"),
    (["trainer.max_steps=0"], "trainer.max_steps"),
    (["trainer.resume=/nonexistent/checkpoint.pt"], "trainer.resume"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode"),
    (["+logger.typo=1"], "logger.typo"),
    (["optimized_metric=best/tset_acc"], "optimized_metric"),
    (["+foo=1"], "foo"),
]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finished") / "run"
    train(compose_config([*TINY, *TINY_MODELS["lenet"]], folder))
    return folder


def test_there_are_at_least_thirty_bad_inputs():
    assert len(BAD_INPUTS) >= 30


@pytest.mark.parametrize("overrides, key", BAD_INPUTS)
def test_a_bad_input_is_one_paragraph_naming_the_key_exit_2_and_changes_nothing(
        overrides, key, finished_run, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    before = digest(finished_run)
    base = [o for o in TINY if not (o in TINY_DATA and any(x.startswith("data=") for x in overrides))]
    cfg = compose_config([*base, *TINY_MODELS["lenet"], *overrides], finished_run)
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"regdrop: error in {key}") and "Traceback" not in err
    assert err.strip().count("\n\n") == 0  # one paragraph
    assert digest(finished_run) == before


def test_on_the_command_line_too_and_hydras_own_errors_exit_2(tmp_path):
    for args, key in ((["seed=notanumber"], "seed"), (["trainer.epochz=3"], "epochz"),
                      (["model=nosuchmodel"], "nosuchmodel"),
                      # a dropout option's type is its method's schema's: refused on composition
                      (["dropout.p=abc"], "dropout.p")):
        result = run_cli(*TINY, *args, f"hydra.run.dir={tmp_path / 'run'}")
        assert result.returncode == 2, result.stderr[-2000:]
        assert key in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # a rejected config writes nothing


def test_a_multirun_of_failing_jobs_ends_with_one_line_per_job_and_no_traceback(tmp_path):
    result = run_cli("-m", *TINY, "dropout=gyro", "dropout.tau=0,-1", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "2 job(s) of the sweep failed" in result.stderr
    assert len(re.findall(r"^  job \d \(.*dropout\.tau", result.stderr, re.M)) == 2


# -- the commands the docs show -----------------------------------------------------------


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `python train.py ...` (and `torchrun ... train.py ...`) line of the README and
    docs/, as its argument list, with continuation lines joined."""
    commands = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #")[0].strip().strip("`")
            match = re.search(r"(?:python|torchrun[^`]*?) train\.py(?P<args>[^`&|]*)$", line)
            if match and "..." not in line and "<" not in line:
                commands.append((f"{path.name}: {line}", shlex.split(match["args"])))
    return commands


def jobs(args: list[str]) -> list[list[str]]:
    """The jobs of a (multi)run: comma lists expanded; Hydra's own flags and keys dropped."""
    # ${hydra:...} values (a GPU per joblib job) exist only inside a launched job.
    kept = [a for a in args if not a.startswith(("-", "hydra")) and a not in ("job", "hydra")
            and "${hydra:" not in a]
    choices = [[f"{a.split('=')[0]}={v}" for v in a.split("=", 1)[1].split(",")]
               if "," in a and "[" not in a else [a] for a in kept]
    return [list(job) for job in itertools.product(*choices)]


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 20


@pytest.mark.parametrize("where, args", COMMANDS, ids=[c[0][:80] for c in COMMANDS])
def test_every_documented_command_composes_and_validates(where, args, tmp_path):
    for job in jobs(args):
        cfg = compose_config(job, tmp_path)
        with open_dict(cfg):
            cfg.data.root = str(CONF.parent)  # where the data is does not matter here
            cfg.data.download = True
        validate(cfg)
