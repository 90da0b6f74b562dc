"""MONAI Label app serving the allinsam bundle.

    python scripts/serve_label.py --studies tiles/            # binds 127.0.0.1:8000
    monailabel start_server --app apps/allinsam --studies tiles/ --host 127.0.0.1 --conf bundle_path bundles/allinsam

Models: ``allinsam`` (prompt-free segmentation, needs the bundle's ``models/model.pt``), ``allinsam_box`` (boxes
-> SAM masks, pretrained weights only); trainer ``allinsam`` (the bundle's train.json on the saved labels).
``--conf bundle_path`` serves another copy of the bundle (e.g. one unpacked from a shared zip).
"""

import json
import logging
import os

from fastapi import HTTPException
from lib.datastore import ConfinedDatastore
from lib.infers import AllInSamBoxAnnotation, AllInSamSegmentation, boxes_from_request, bundle_scripts
from lib.trainers import AllInSamTrainTask
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

logger = logging.getLogger(__name__)

TILE_EXTENSIONS = ["*.png", "*.tif", "*.tiff", "*.jpg", "*.jpeg"]


class AllInSamApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        default_bundle = os.path.join(app_dir, "..", "..", "bundles", "allinsam")
        self.bundle = os.path.realpath(conf.get("bundle_path", default_bundle))
        metadata_file = os.path.join(self.bundle, "configs", "metadata.json")
        if not os.path.isfile(metadata_file):
            raise FileNotFoundError(f"{metadata_file}: not found; "
                                    f"--conf bundle_path must name an allinsam bundle folder")
        with open(metadata_file) as handle:
            metadata = json.load(handle)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="allinsam",
                         description=metadata["description"], version=metadata["version"], labels={"nucleus": 1})

    def init_datastore(self) -> ConfinedDatastore:
        return ConfinedDatastore(self.studies, bundle_scripts(self.bundle), TILE_EXTENSIONS)

    def init_infers(self) -> dict:
        infers = {"allinsam_box": AllInSamBoxAnnotation(self.bundle, self.conf)}
        segmentation = AllInSamSegmentation(self.bundle, self.conf)
        if segmentation.is_valid():
            infers["allinsam"] = segmentation
        else:
            logger.warning(f"'allinsam' not served: no {self.bundle}/models/model.pt yet; train the bundle "
                           "(python -m monai.bundle run training ...) or POST /train/allinsam, then restart")
        return infers

    def init_trainers(self) -> dict:
        return {"allinsam": AllInSamTrainTask(self.bundle, self.conf)}

    def init_strategies(self) -> dict:
        return {"random": Random(), "first": First()}

    def _check_image_id(self, request: dict) -> None:
        """Only a tile of the studies folder is read: any other id or path answers the same 404 (whether it exists
        elsewhere is not told). Upload a tile with ``PUT /datastore/image`` first."""
        image = request.get("image")
        if not self.datastore().has_image(image):
            raise HTTPException(status_code=404, detail=f"image {image!r} is not a tile of the studies folder")

    def infer_wsi(self, request: dict, datastore=None) -> dict:
        self._check_image_id(request)
        return super().infer_wsi(request, datastore)

    def infer(self, request: dict, datastore=None) -> dict:
        """Bad requests get a 4xx answer naming the problem (MONAI Label's own checks answer 500)."""
        model = request.get("model")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"no model {model!r}; served: {sorted(self._infers)}")
        self._check_image_id(request)
        if isinstance(self._infers[model], AllInSamBoxAnnotation):
            try:
                boxes_from_request(request)
            except ValueError as error:
                raise HTTPException(status_code=422, detail=str(error)) from None
        return super().infer(request, datastore)
