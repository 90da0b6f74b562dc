from .itk_registration import Registration, nuclear_channel, register, resample
from .molecular_labels import molecular_labels, read_if_image

__all__ = ["Registration", "molecular_labels", "nuclear_channel", "read_if_image", "register", "resample"]
