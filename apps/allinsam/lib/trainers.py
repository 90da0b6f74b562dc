"""MONAI Label training task: the bundle's ``configs/train.json`` on the labels saved in the studies folder."""

import logging

from monailabel.tasks.train.bundle import BundleTrainTask

logger = logging.getLogger(__name__)


class AllInSamTrainTask(BundleTrainTask):
    """``BundleTrainTask`` with the overrides our ``train.json`` needs for labels collected in MONAI Label.

    - labels are instance maps (what ``allinsam_box`` returns and the annotator corrects): binarised to 0/1;
    - ``epochs`` follows ``max_epochs`` (the learning-rate schedule spans the run) and validation runs every
      epoch, so a short run still writes ``models/model.pt`` (best validation Dice);
    - each run starts from ``models/model.pt`` (MONAI Label's checkpoint loader), not by resuming an older
      run's trainer state, which would stop at once when that run had reached ``max_epochs``;
    - too few labelled images for a validation split: validation on the training images (logged).
    """

    def _partition_datalist(self, datalist, request, shuffle=False):
        train, validation = super()._partition_datalist(datalist, request, shuffle)
        if validation is not None and len(validation) == 0:
            logger.warning(f"{len(train)} labelled image(s): too few to split; validating on the training images")
            validation = train
        return train, validation

    def _update_overrides(self, overrides: dict) -> dict:
        overrides.update({
            "epochs": overrides[self.const.key_train_trainer_max_epochs()],
            "val_interval": 1,
            "resume": False,
            "label_transforms": [{"_target_": "AsDiscreted", "keys": "@label_keys", "threshold": 0.5}],
            "binary_label_keys": [],  # instance maps, binarised by label_transforms
        })
        return overrides
