from .classes import SplitClassesd, prediction_writers
from .image_io import read_instance_map, read_rgb_image, write_json_atomic, write_png_atomic
from .instances import boxes_from_instances, instance_contours, relabel_sequential

__all__ = [
    "SplitClassesd",
    "boxes_from_instances",
    "instance_contours",
    "prediction_writers",
    "read_instance_map",
    "read_rgb_image",
    "relabel_sequential",
    "write_json_atomic",
    "write_png_atomic",
]
