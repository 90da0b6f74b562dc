"""Several nucleus classes, stored as one class map (H, W) per image: 0 = background, c = class c (1..C)."""

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

# RGB per class (class 1, 2, ...; repeats after four): slide GeoJSON and review overlays draw a class alike
CLASS_COLOURS = ((230, 25, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180))


def class_colour(index: int) -> tuple[int, int, int]:
    """RGB of the class at 0-based ``index`` in a class list."""
    return CLASS_COLOURS[index % len(CLASS_COLOURS)]


class SplitClassesd(MapTransform):
    """``label`` (1, H, W) (binary mask or instance map) and ``class_key`` (1, H, W) class map 1..C ->
    ``label`` (C, H, W): channel c keeps the label where the class map is c + 1 (one binary mask or one instance map
    per class, the P2 layout). The class map's key is removed. Ours: MONAI has no label-times-one-hot split."""

    def __init__(self, keys: KeysCollection, class_key: str = "classes", num_classes: int = 2,
                 allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.class_key, self.num_classes = class_key, num_classes

    def __call__(self, data: dict) -> dict:
        data = dict(data)
        if not any(key in data for key in self.keys):
            return data  # inference without labels
        if self.class_key not in data:
            raise KeyError(f"SplitClassesd: no {self.class_key!r} (class map) beside the label")
        classes = data.pop(self.class_key)
        if classes.max() > self.num_classes:
            source = getattr(classes, "meta", {}).get("filename_or_obj", "the class map")
            raise ValueError(f"{source}: class {int(classes.max())} in the class map, but the dataset config names "
                             f"{self.num_classes} classes")
        for key in self.key_iterator(data):
            label = data[key]
            channels = [label * (classes == c + 1) for c in range(self.num_classes)]
            data[key] = torch.cat(channels) if isinstance(label, torch.Tensor) else np.concatenate(channels)
        return data


def prediction_writers(output_dir: str, classes: list[str]) -> list:
    """Transforms writing ``pred`` (C, H, W) probabilities and ``mask`` (C, H, W) as 8-bit PNGs: ``<image>_prob.png``
    / ``<image>_mask.png`` for one class, ``<image>_<class>_prob.png`` / ``..._mask.png`` per class otherwise.
    A function because the output names follow the class list, which a JSON config cannot iterate."""
    from monai.transforms import SaveImaged, SplitDimd

    def save(key: str, postfix: str, scale: int | None) -> SaveImaged:
        return SaveImaged(keys=key, output_dir=output_dir, output_postfix=postfix, output_ext=".png",
                          output_dtype=np.uint8, scale=scale, resample=False, separate_folder=False,
                          writer="PILWriter", print_log=False).set_options(write_kwargs={"reverse_indexing": False})

    if len(classes) == 1:
        return [save("pred", "prob", 255), save("mask", "mask", None)]
    writers = [SplitDimd(keys=["pred", "mask"], output_postfixes=list(classes), keepdim=True)]
    for name in classes:
        writers += [save(f"pred_{name}", f"{name}_prob", 255), save(f"mask_{name}", f"{name}_mask", None)]
    return writers
