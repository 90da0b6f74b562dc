from .segmentation import dice_iou, paired_instance_iou

__all__ = ["dice_iou", "paired_instance_iou"]
