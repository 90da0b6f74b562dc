"""H&E stain augmentation. Ours because MONAI has stain extraction and normalisation (``monai.apps.pathology``) but
no random stain perturbation."""

import numpy as np
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_numpy
from skimage.color import hed2rgb, rgb2hed


class RandHEDJitterd(RandomizableTransform, MapTransform):
    """Scale and shift the haematoxylin, eosin and residual optical densities of an RGB image (Tellez et al.'s
    HED jitter): od_c <- od_c * U(1 - sigma, 1 + sigma) + U(-bias, bias) * std(od_c).

    Args:
        keys: (3, H, W) RGB images in [0, 1].
        sigma: largest relative change of each stain's density.
        bias: largest shift of each stain's density, in units of its standard deviation over the image.
        prob: probability of jittering an image.
    """

    def __init__(self, keys, sigma: float = 0.05, bias: float = 0.05, prob: float = 1.0, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.sigma, self.bias = sigma, bias
        self._scale, self._shift = np.ones(3), np.zeros(3)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._scale = self.R.uniform(1 - self.sigma, 1 + self.sigma, 3)
        self._shift = self.R.uniform(-self.bias, self.bias, 3)

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            hed = rgb2hed(np.moveaxis(convert_to_numpy(image), 0, -1))
            hed = hed * self._scale + self._shift * hed.std(axis=(0, 1))
            jittered = np.moveaxis(np.clip(hed2rgb(hed), 0.0, 1.0), -1, 0).astype(np.float32)
            d[key] = convert_to_dst_type(jittered, image)[0]  # same type (MetaTensor and its meta kept), device
        return d
