"""Long runs, on request: `bash scripts/test.sh -m slow`."""

import json

import pytest

from tests.conftest import FASHION_MNIST_INSTALLED, run_cli


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_INSTALLED, reason="Debian's dataset-fashion-mnist is not installed")
def test_the_default_run_reaches_088_on_real_fashion_mnist(tmp_path):
    # The README's main job, as is: default config, real data, offline wandb.
    result = run_cli(f"hydra.run.dir={tmp_path / 'run'}", f"paths.data_dir={tmp_path / 'data'}",
                     env={"WANDB_MODE": "offline"}, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.88
    assert "final:" in result.stdout
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
