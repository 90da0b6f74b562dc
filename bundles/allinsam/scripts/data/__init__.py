from .annotation_xml import read_xml_polygons
from .classes import SplitClassesd, class_colour, prediction_writers
from .datalist import check_entries, checked_datalist, checked_image_glob
from .image_io import (
    read_instance_map,
    read_rgb_image,
    staged,
    to_rgb8,
    write_json_atomic,
    write_png_atomic,
)
from .prepare import prepare_dataset, prepared_datalist
from .stain_augmentation import RandHEDJitterd
from .instances import (
    INSTANCE_METHODS,
    boxes_from_instances,
    instance_contours,
    instances_from_mask,
    relabel_sequential,
)

__all__ = [
    "INSTANCE_METHODS",
    "RandHEDJitterd",
    "SplitClassesd",
    "class_colour",
    "boxes_from_instances",
    "check_entries",
    "checked_datalist",
    "checked_image_glob",
    "instance_contours",
    "instances_from_mask",
    "prediction_writers",
    "prepare_dataset",
    "prepared_datalist",
    "read_instance_map",
    "read_rgb_image",
    "read_xml_polygons",
    "relabel_sequential",
    "staged",
    "to_rgb8",
    "write_json_atomic",
    "write_png_atomic",
]
