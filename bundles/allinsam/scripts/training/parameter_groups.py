"""Optimizer parameter groups: pretrained encoder weights learn at a fraction of the head's learning rate."""

from torch import nn

from ..networks.allinsam_net import ADAPTER_KEY

ENCODER_PREFIX = "sam.image_encoder."


def parameter_groups(network: nn.Module, learning_rate: float, encoder_lr_scale: float = 1.0) -> list[dict]:
    """The trainable parameters of an ``AllInSamNet`` as optimizer groups: pretrained image-encoder weights (the
    tail stages of ``trainable="tail"``, the whole encoder of ``full``) at ``learning_rate * encoder_lr_scale``,
    everything else (mask decoder, no-mask embedding, adapters) at ``learning_rate``. Empty groups are left out.
    """
    if not 0.0 < encoder_lr_scale <= 1.0:
        raise ValueError(f"encoder_lr_scale must be in (0, 1], got {encoder_lr_scale}")
    encoder, head = [], []
    for name, parameter in network.named_parameters():
        if parameter.requires_grad:
            pretrained_encoder = name.startswith(ENCODER_PREFIX) and ADAPTER_KEY not in name
            (encoder if pretrained_encoder else head).append(parameter)
    groups = [{"params": head, "lr": learning_rate},
              {"params": encoder, "lr": learning_rate * encoder_lr_scale}]
    return [group for group in groups if group["params"]]
