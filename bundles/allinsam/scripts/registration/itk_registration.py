"""Register a moving image (an immunofluorescence channel) to a fixed one (a nuclear channel of the PAS / H&E
image) with ITK: multi-resolution, Mattes mutual information, rigid or affine, then an optional B-spline.

Coordinates are physical = full-resolution pixels (x = column, y = row, spacing 1, origin 0). Large images are
registered on a copy shrunk to at most ``max_size`` pixels a side (spacing > 1), so memory stays bounded; the
transform still maps full-resolution fixed points to moving points, ITK's convention.
"""

import time
from dataclasses import dataclass

import itk
import numpy as np
from skimage.color import rgb2hed
from skimage.transform import downscale_local_mean

IMAGE = itk.Image[itk.F, 2]
TRANSFORMS = ("rigid", "affine")


@dataclass
class Registration:
    """A fitted transform (fixed -> moving physical points) and how well it fits."""

    transform: "itk.CompositeTransform"
    metric_before: float  # Mattes mutual information (negative; lower is better) at the initial (centred) transform
    metric_after: float
    seconds: float

    def map_points(self, points_xy: np.ndarray) -> np.ndarray:
        """Fixed (N, 2) [x, y] pixel points -> their moving-image positions."""
        return np.array([list(self.transform.TransformPoint([float(x), float(y)]))
                         for x, y in points_xy]).reshape(-1, 2)


def nuclear_channel(rgb: np.ndarray) -> np.ndarray:
    """The haematoxylin (nuclear) stain of an RGB uint8 PAS / H&E image (H, W, 3) -> (H, W) float32, nuclei bright,
    like a DAPI channel: the pair mutual information compares."""
    return rgb2hed(rgb)[..., 0].astype(np.float32)


def to_itk(array: np.ndarray, max_size: int | None = None) -> "itk.Image":
    """(H, W) array -> float ITK image; shrunk by an integer factor (block mean) to at most ``max_size`` a side."""
    factor = 1 if max_size is None else int(np.ceil(max(array.shape) / max_size))
    if factor > 1:
        array = downscale_local_mean(array, (factor, factor))
    image = itk.image_from_array(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing([float(factor)] * 2)
    image.SetOrigin([(factor - 1) / 2.0] * 2)  # block centres, in full-resolution pixels
    return image


def _centre(shape: tuple[int, ...]) -> np.ndarray:
    """Physical [x, y] centre of a full-resolution (H, W) grid."""
    return np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0])


def _registration(fixed, moving, initial, optimizer, shrink: list[int], sampling: float, seed: int,
                  moving_initial=None):
    """Fit ``initial`` in place over the pyramid ``shrink`` (e.g. [4, 2, 1], Gaussian sigma = shrink / 2 pixels);
    returns the final metric value."""
    metric = itk.MattesMutualInformationImageToImageMetricv4[IMAGE, IMAGE].New(NumberOfHistogramBins=32)
    scales = itk.RegistrationParameterScalesFromPhysicalShift[type(metric)].New(Metric=metric)
    optimizer.SetScalesEstimator(scales)
    method = itk.ImageRegistrationMethodv4[IMAGE, IMAGE].New(FixedImage=fixed, MovingImage=moving, Metric=metric,
                                                              Optimizer=optimizer, InitialTransform=initial,
                                                              InPlace=True)
    if moving_initial is not None:
        method.SetMovingInitialTransform(moving_initial)
    method.SetNumberOfLevels(len(shrink))
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel([factor / 2.0 for factor in shrink])
    method.SetMetricSamplingStrategy(itk.ImageRegistrationMethodv4Enums.MetricSamplingStrategy_RANDOM)
    method.SetMetricSamplingPercentage(sampling)
    method.MetricSamplingReinitializeSeed(seed)
    method.Update()
    return optimizer.GetValue()


def _metric(fixed, moving, transform) -> float:
    metric = itk.MattesMutualInformationImageToImageMetricv4[IMAGE, IMAGE].New(NumberOfHistogramBins=32)
    metric.SetFixedImage(fixed)
    metric.SetMovingImage(moving)
    metric.SetMovingTransform(transform)
    metric.Initialize()
    return float(metric.GetValue())


def register(fixed: np.ndarray, moving: np.ndarray, transform: str = "affine", bspline_mesh: int | None = None,
             max_size: int = 1024, levels: int = 3, iterations: int = 300, sampling: float = 0.25,
             seed: int = 0) -> Registration:
    """Fit ``moving`` (H', W') onto ``fixed`` (H, W), both single-channel float arrays.

    ``transform``: ``rigid`` (rotation + translation) or ``affine``, started from the image centres; then, with
    ``bspline_mesh`` = n, a cubic B-spline on an n x n control mesh refines it (local tissue deformation).
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    start = time.perf_counter()
    fixed_image, moving_image = to_itk(fixed, max_size), to_itk(moving, max_size)
    linear = itk.Euler2DTransform[itk.D].New() if transform == "rigid" else itk.AffineTransform[itk.D, 2].New()
    # centred start (ITK's CenteredTransformInitializer, geometry mode): rotate about the fixed image centre and
    # move it onto the moving image centre
    fixed_centre, moving_centre = _centre(fixed.shape), _centre(moving.shape)
    linear.SetCenter(fixed_centre)
    linear.SetTranslation(moving_centre - fixed_centre)
    before = _metric(fixed_image, moving_image, linear)
    optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New(
        LearningRate=1.0, MinimumStepLength=1e-4, RelaxationFactor=0.5, NumberOfIterations=iterations)
    pyramid = [2 ** level for level in reversed(range(levels))]
    after = _registration(fixed_image, moving_image, linear, optimizer, pyramid, sampling, seed)
    composite = itk.CompositeTransform[itk.D, 2].New()
    composite.AddTransform(linear)
    if bspline_mesh:
        bspline = itk.BSplineTransform[itk.D, 2, 3].New()
        itk.BSplineTransformInitializer[type(bspline), IMAGE].New(
            Transform=bspline, Image=fixed_image, TransformDomainMeshSize=[bspline_mesh] * 2).InitializeTransform()
        optimizer = itk.RegularStepGradientDescentOptimizerv4[itk.D].New(
            LearningRate=1.0, MinimumStepLength=1e-4, RelaxationFactor=0.5, NumberOfIterations=iterations // 3)
        # the deformable stage on the two coarsest-but-one levels: local shifts of a few pixels are resolved at
        # half resolution, and the full-resolution level would cost most of the time
        after = _registration(fixed_image, moving_image, bspline, optimizer, pyramid[1:-1] or [1], sampling, seed,
                              moving_initial=linear)
        composite.AddTransform(bspline)  # applied first: moving point = linear(bspline(fixed point))
    return Registration(composite, before, float(after), time.perf_counter() - start)


def resample(moving: np.ndarray, registration: Registration, fixed_shape: tuple[int, int]) -> np.ndarray:
    """One moving channel (H', W') resampled onto the fixed grid (H, W) through the fitted transform (linear
    interpolation, 0 outside)."""
    reference = itk.image_from_array(np.zeros(fixed_shape, dtype=np.float32))
    resampled = itk.resample_image_filter(to_itk(moving), transform=registration.transform, use_reference_image=True,
                                          reference_image=reference, default_pixel_value=0.0)
    return itk.array_from_image(resampled).astype(moving.dtype if moving.dtype.kind == "f" else np.float32)
