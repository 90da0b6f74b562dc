"""MONAI Label inference tasks of the allinsam bundle: prompt-free segmentation and box annotation.

Both answer with an instance map (PNG, uint16, 0 = background, (H, W) as the image is stored) and its contours in
MONAI Label's annotation JSON (``result.annotation.elements``: one element per class, one contour per nucleus).
"""

import logging
import os
import sys
import tempfile
from types import ModuleType

import numpy as np
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.utils.others.class_utils import unload_module

# window embeddings the box model keeps (4 MiB each with LiteMedSAM): new boxes on a tile seen before skip the encoder
APP_CACHED_WINDOWS = 32

logger = logging.getLogger(__name__)


def bundle_scripts(bundle_path: str) -> ModuleType:
    """The ``scripts`` package of the bundle at ``bundle_path`` (freshly imported from there)."""
    sys.path.insert(0, bundle_path)
    try:
        unload_module("scripts")
        import scripts.data
        import scripts.metrics

        return scripts
    finally:
        sys.path.remove(bundle_path)


def boxes_from_request(request: dict) -> np.ndarray:
    """``boxes`` (a list of ``[x0, y0, x1, y1]``, pixels, ends exclusive) or MONAI Label's ``roi`` -> (N, 4) float.

    Raises ValueError saying what is wrong with the request.
    """
    value = request.get("boxes", request.get("roi"))
    if value is None:
        raise ValueError("allinsam_box needs 'boxes': [[x0, y0, x1, y1], ...] (pixels, ends exclusive) or 'roi'")
    try:
        boxes = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"boxes must be numbers [[x0, y0, x1, y1], ...], got {value!r}") from None
    boxes = boxes[None] if boxes.shape == (4,) else boxes
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) == 0:
        raise ValueError(f"boxes must be a non-empty list of [x0, y0, x1, y1], got shape {boxes.shape}")
    bad = np.flatnonzero(~np.isfinite(boxes).all(1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if len(bad):
        raise ValueError(f"box {int(bad[0])} {boxes[bad[0]].tolist()} is not finite or not x0 < x1, y0 < y1")
    return boxes


def annotation_result(scripts: ModuleType, class_instances: dict[str, np.ndarray]) -> dict:
    """Per-class instance maps {name: (H, W)} -> MONAI Label's annotation JSON with one contour per instance."""
    height, width = next(iter(class_instances.values())).shape
    elements = []
    for name, instances in class_instances.items():
        contours = scripts.data.instance_contours(instances)
        if contours:
            elements.append({"label": name, "contours": list(contours.values()), "instance_ids": list(contours)})
    return {"annotation": {"location": [0, 0], "size": [width, height], "elements": elements}}


def merged_instances(class_instances: dict[str, np.ndarray]) -> np.ndarray:
    """Per-class instance maps -> one (H, W) uint16 map; class c's ids follow class c - 1's (later classes on top)."""
    merged = np.zeros(next(iter(class_instances.values())).shape, dtype=np.uint16)
    offset = 0
    for instances in class_instances.values():
        merged[instances > 0] = instances[instances > 0] + offset
        offset += int(instances.max(initial=0))
    return merged


def write_result(scripts: ModuleType, data: dict) -> tuple[str, dict]:
    """MONAI Label writer: ``data["instances"]`` to a temporary PNG (the server deletes it once sent), and the JSON.

    Ours, not MONAI Label's ``Writer``: that one transposes 2D arrays for ITK, and our maps are (H, W) as read.
    """
    handle, path = tempfile.mkstemp(suffix=".png", prefix="allinsam_")
    os.close(handle)
    scripts.data.write_png_atomic(path, data["instances"])
    return path, data.get("result", {})


class AllInSamSegmentation(BundleInferTask):
    """``allinsam``: prompt-free segmentation of a whole tile through the bundle's ``configs/inference.json``
    (its preprocessing, sliding-window inferer and sigmoid), then instances and their contours.

    Options (request, or app conf for the default): ``threshold`` on the probability and ``instances``:
    ``components`` (8-connected) or ``watershed`` (splits touching nuclei), the functions that score the bundle;
    both default to the bundle's (its ``calibrate.json`` choice when the model was calibrated, else 0.5 and
    components). App conf ``inference_precision`` (``float32``, ``int8`` or ``bfloat16``) overrides inference.json's.
    """

    def __init__(self, path: str, conf: dict[str, str]):
        self.inference_precision = conf.get("inference_precision")
        super().__init__(path, conf, type=InferType.SEGMENTATION, add_post_restore=False)
        if not self.is_valid():
            return
        self.scripts = bundle_scripts(path)
        self.classes = list(self.bundle_config.get_parsed_content("classes"))
        self.labels = {name: index + 1 for index, name in enumerate(self.classes)}
        threshold = float(conf.get("threshold", self.bundle_config.get_parsed_content("threshold")))
        instances = conf.get("instances", self.bundle_config.get_parsed_content("instance_method"))
        self._config.update({"threshold": threshold, "instances": instances})

    def _load_bundle_config(self, path, config):
        """inference.json with the app's ``inference_precision``, set before the network is built from it."""
        bundle_config = super()._load_bundle_config(path, config)
        if self.inference_precision:
            bundle_config["inference_precision"] = self.inference_precision
        return bundle_config

    def post_transforms(self, data=None) -> list:
        return [*super().post_transforms(data), self.instances_and_contours]

    def instances_and_contours(self, data: dict) -> dict:
        """``pred`` (C, H, W) probability -> ``instances`` (H, W) uint16 and ``result`` (contours per class)."""
        mask = np.asarray(data["pred"]) >= float(data["threshold"])
        method = data["instances"]
        class_instances = {name: self.scripts.data.instances_from_mask(mask[channel], method)
                           for channel, name in enumerate(self.classes)}
        data["instances"] = merged_instances(class_instances)
        data["result"] = annotation_result(self.scripts, class_instances)
        return data

    def writer(self, data: dict, extension=None, dtype=None) -> tuple[str, dict]:
        return write_result(self.scripts, data)


class AllInSamBoxAnnotation(BasicInferTask):
    """``allinsam_box``: boxes drawn by the annotator -> one SAM mask each, through the bundle's
    ``configs/annotate.json`` (its preprocessing and ``BoxPromptedSegmenter``, pretrained SAM, no training).

    Box i gets instance id i + 1; boxes partly outside the tile are clipped, boxes fully outside are skipped and
    listed with the reason in ``result.report``. App conf: ``encoder_precision`` and ``decoder_precision``
    (``float32``, ``int8`` or ``bfloat16``, each on the runtime that runs it), ``cached_windows`` (default
    ``APP_CACHED_WINDOWS``), ``backbone``, ``sam_checkpoint``.
    """

    def __init__(self, path: str, conf: dict[str, str]):
        self.scripts = bundle_scripts(path)
        parser = ConfigParser()
        parser.read_config(os.path.join(path, "configs", "annotate.json"))
        parser["bundle_root"] = path
        for key in ("backbone", "sam_checkpoint", "encoder_precision", "decoder_precision"):
            if conf.get(key):
                parser[key] = conf[key]
        parser["cached_windows"] = int(conf.get("cached_windows", APP_CACHED_WINDOWS))
        sys.path.insert(0, path)
        try:
            self.segmenter = parser.get_parsed_content("segmenter")
            self.preprocessing = list(parser.get_parsed_content("preprocessing").transforms)
        finally:
            sys.path.remove(path)
        super().__init__(path=None, network=None, type=InferType.ANNOTATION, labels={"nucleus": 1}, dimension=2,
                         description="Boxes -> nucleus masks with the pretrained SAM of the allinsam bundle")

    def is_valid(self) -> bool:
        return True  # the pretrained SAM is loaded in __init__; no trained model is needed

    def pre_transforms(self, data=None) -> list:
        return self.preprocessing

    def run_inferer(self, data: dict, convert_to_batch: bool = True, device: str = "cuda") -> dict:
        image = np.asarray(data["image"]).transpose(1, 2, 0).astype(np.uint8)
        instances, report = self.segmenter(image, boxes_from_request(data))
        data["instances"] = instances
        data["result"] = {**annotation_result(self.scripts, {"nucleus": instances}), "report": report}
        return data

    def post_transforms(self, data=None) -> list:
        return []

    def writer(self, data: dict, extension=None, dtype=None) -> tuple[str, dict]:
        return write_result(self.scripts, data)
