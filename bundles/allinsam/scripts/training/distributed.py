"""torchrun set-up for ``configs/multi_gpu_train.json``."""

import os

import torch
import torch.distributed as dist


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
