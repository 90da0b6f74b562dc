from .box_prompted import BoxPromptedSegmenter, annotate_dataset
from .marker_classes import assign_marker_classes, class_map, write_marker_labels
from .prompts import Prompts, perturb_boxes, read_prompts
from .weak_labels import make_weak_labels, weak_label_tag

__all__ = ["BoxPromptedSegmenter", "Prompts", "annotate_dataset", "assign_marker_classes", "class_map",
           "make_weak_labels", "perturb_boxes", "read_prompts", "weak_label_tag", "write_marker_labels"]
