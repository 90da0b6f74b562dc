"""torchrun set-up for ``configs/multi_gpu_train.json``."""

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from ignite.handlers import ProgressBar
from monai.handlers import StatsHandler, TensorBoardStatsHandler

# what only rank 0 attaches: every rank would repeat the same log lines, event records and progress bar
REPORTING_HANDLERS = (StatsHandler, TensorBoardStatsHandler, ProgressBar)


def init_distributed() -> torch.device:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``), once:
    NCCL with one GPU per process, gloo on CPU. Returns this process's device. A function rather than the config's
    ``initialize`` list because MONAI evaluates that before it puts the bundle's ``scripts`` on ``sys.path``."""
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError("multi_gpu_train.json runs under torchrun: torchrun --nproc_per_node <gpus> -m monai.bundle "
                           "run --config_file \"['configs/train.json','configs/multi_gpu_train.json']\"")
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def handlers_of_rank(handlers: Sequence, is_rank0: bool) -> list:
    """The handlers a rank attaches: all on rank 0, the others without ``REPORTING_HANDLERS``. Chosen by kind, so an
    overlay keeps working when a handler is added to ``train.json``."""
    return list(handlers) if is_rank0 else [h for h in handlers if not isinstance(h, REPORTING_HANDLERS)]
