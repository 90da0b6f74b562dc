"""Training on cached features of the frozen encoder: every augmented view of a training image goes through the frozen
part of the encoder once, is stored on disk by MONAI's ``PersistentDataset``, and is reused by every epoch, stage and
run that sees the same view.

A view is deterministic: its random draws (crop, zoom, turn, flip, stain) come from (seed, image index, view index),
so a view can be cached like any deterministic transform. The cache key is the SHA-256 of the frozen weights, the
bytes of the view's files, the augmentation recipe and the seeds: a new checkpoint, an edited image or label, or
another recipe give new files, never a stale hit.
"""

import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.data import CacheDataset, PersistentDataset
from monai.transforms import Compose, SelectItemsd, Transform

from ..networks import AllInSamNet, FeatureHead
from .precision import TRAIN_PRECISION_CHOICES, Autocast

CACHE_FORMAT = "allinsam-view-features-1"  # bump when what a cache file holds changes


def view_datalist(entries: Sequence[dict], views: int) -> list[dict]:
    """``views`` training views spread evenly over ``entries`` (each image at least one): each entry copied with
    its ``view``, ``"<image file name>#<k>"``; asking for more views keeps the earlier ones."""
    if not entries:
        raise ValueError("no training entries to make views of")
    per_image = max(1, -(-views // len(entries)))
    return [dict(entry, view=f"{Path(entry['image']).name}#{k}") for entry in entries for k in range(per_image)]


class AugmentedViewd(Transform):
    """Apply ``augmentation`` (random transforms) with its random state set from (``seed``, the item's ``view``), so
    each view is a fixed function of its item: cacheable by ``PersistentDataset``, which caches only up to its first
    random transform."""

    def __init__(self, augmentation: Sequence | Compose, seed: int = 0):
        self.augmentation = augmentation if isinstance(augmentation, Compose) else Compose(list(augmentation))
        self.seed = seed

    def __call__(self, data: dict) -> dict:
        view_seed = zlib.crc32(f"{self.seed}:{data['view']}".encode())
        self.augmentation.set_random_state(seed=view_seed)
        return self.augmentation(dict(data))


class FrozenFeaturesd(Transform):
    """Replace ``key`` ((3, S, S) RGB in [0, 1]) by the network's ``frozen_features`` of it, stored as ``dtype``
    (bfloat16 halves the disk; its rounding moves LiteMedSAM's logits by about 5e-3)."""

    def __init__(self, network: AllInSamNet, key: str = "image", dtype: torch.dtype = torch.bfloat16):
        self.network, self.key, self.dtype = network, key, dtype

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        image = torch.as_tensor(d[self.key]).float()[None]
        device = next(self.network.parameters()).device
        d[self.key] = self.network.frozen_features(image.to(device))[0].to(self.dtype).cpu()
        return d


def frozen_weights_sha256(network: AllInSamNet) -> str:
    """SHA-256 of every weight and buffer of the frozen part (everything outside the trained parameters), in name
    order, with the backbone's input size, the cut point and ``window_minmax``: what decides a view's features."""
    digest = hashlib.sha256(f"{network.trainable}:{network.tail_stages}:{network.image_size}:"
                            f"{float(network.window_minmax)}".encode())
    trained = {id(p) for p in network.parameters() if p.requires_grad}
    for name, tensor in sorted(list(network.sam.image_encoder.state_dict(keep_vars=True).items())):
        if id(tensor) in trained:
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ViewCacheKey:
    """``PersistentDataset`` hash function: a view item -> hex SHA-256 of the frozen weights, the recipe, the
    item's seeds and the bytes of each file it names (file hashes memoised by path, size and mtime)."""

    def __init__(self, network: AllInSamNet, recipe: dict, file_keys: Sequence[str] = ("image", "label")):
        self.weights = frozen_weights_sha256(network)
        self.recipe = json.dumps(recipe, sort_keys=True, default=str)
        self.file_keys = list(file_keys)
        self._file_hashes: dict[tuple, str] = {}

    def _file_sha256(self, path: str | os.PathLike) -> str:
        stat = os.stat(path)
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._file_hashes:
            self._file_hashes[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        return self._file_hashes[key]

    def __call__(self, item: dict) -> bytes:
        parts = [CACHE_FORMAT, self.weights, self.recipe, str(item.get("view"))]
        parts += [self._file_sha256(item[key]) for key in self.file_keys if key in item]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest().encode()


def feature_cache_dataset(entries: Sequence[dict], views: int, network: AllInSamNet, load: Sequence,
                          augmentation: Sequence, cache_dir: str | os.PathLike, seed: int = 0,
                          label_keys: Sequence[str] = ("label",)) -> PersistentDataset:
    """The training views of ``entries`` as frozen features on disk (``cache_dir``), label maps alongside.

    Args:
        entries: datalist entries with ``image`` and label files.
        views: total number of views (spread evenly over the images).
        network: a cacheable ``AllInSamNet`` (``trainable`` ``tail`` or ``decoder``).
        load: deterministic transforms that read an entry ((3, H, W) image in [0, 1]) and its label files into one
            ``label`` (C, H, W) (e.g. a class map split into one channel per class).
        augmentation: the random transforms that make a view ((3, S, S) image, (C, S, S) label).
        label_keys: the entry's label files (their bytes are part of the cache key).
        seed: seed of the views' random draws.
    """
    if not network.cacheable:
        raise ValueError(f"trainable={network.trainable!r}: the whole encoder path is trained, nothing to cache")
    items = view_datalist(entries, views)
    recipe = {"load": [_describe(t) for t in load], "augmentation": [_describe(t) for t in augmentation], "seed": seed}
    # only tensors and the view's name are stored: PersistentDataset reads with weights_only=True and silently
    # recomputes a file it cannot read (e.g. one holding CropForegroundd's numpy coordinates)
    transform = Compose(list(load) + [AugmentedViewd(augmentation, seed), FrozenFeaturesd(network),
                                      SelectItemsd(keys=["image", "label", "view"])])
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return PersistentDataset(items, transform, cache_dir=cache_dir,
                             hash_func=ViewCacheKey(network, recipe, ["image", *label_keys]))


def _describe(transform, depth: int = 3) -> dict | str:
    """A transform's class and plain settings, nested transforms included, for the recipe part of the cache key."""
    plain = (int, float, str, bool, type(None))
    settings = {"class": type(transform).__name__}
    for key, value in vars(transform).items() if depth and hasattr(transform, "__dict__") else ():
        if key.startswith("_") or key == "R":
            continue
        if isinstance(value, plain) or (isinstance(value, (tuple, list)) and all(isinstance(v, plain) for v in value)):
            settings[key] = value
        elif isinstance(value, Transform) or callable(value) and hasattr(value, "__dict__"):
            settings[key] = _describe(value, depth - 1)
    return settings


def training_dataset(data: Sequence[dict], network, load: Sequence, augmentation: Sequence,
                     view_augmentation: Sequence, views: int, cache_dir: str | os.PathLike, seed: int = 0,
                     label_keys: Sequence[str] = ("label",), num_workers: int = 0):
    """The trainer's dataset: cached views (``feature_cache_dataset``) when the network trains after a frozen part,
    else MONAI's ``CacheDataset`` of the loaded images with ``augmentation`` run at every step (the adapter and full
    recipes, where gradients flow through the whole encoder)."""
    network = getattr(network, "module", network)  # DistributedDataParallel
    if network.cacheable:
        return feature_cache_dataset(data, views, network, load, view_augmentation, cache_dir, seed, label_keys)
    return CacheDataset(data, Compose(list(load) + list(augmentation)), cache_rate=1.0, num_workers=num_workers,
                        progress=False)


def trainer_network(network, precision: str = "float32") -> torch.nn.Module:
    """What the trainer runs on a batch: ``FeatureHead`` on cached features, else the network on images; under
    bfloat16 autocast when ``precision`` is ``bfloat16``."""
    if precision not in TRAIN_PRECISION_CHOICES:
        raise ValueError(f"train_precision must be one of {TRAIN_PRECISION_CHOICES}, got {precision!r}")
    if isinstance(network, torch.nn.parallel.DistributedDataParallel):
        if network.module.cacheable:
            raise ValueError(f"trainable={network.module.trainable!r} trains on cached features, which multi-GPU "
                             "training does not support yet: use --trainable adapter (multi_gpu_train.json's default)")
        model = network
    else:
        model = FeatureHead(network) if network.cacheable else network
    return Autocast(model, torch.bfloat16) if precision == "bfloat16" else model
