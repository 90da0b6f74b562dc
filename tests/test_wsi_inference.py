"""Whole-slide inference on pyramidal TIFFs built here from real MoNuSeg pixels: tissue-only tiles, every nucleus
found exactly once across tile borders, QuPath GeoJSON + instance TIFF + NIfTI, and the bundle config end to end."""

import json
from glob import glob

import nibabel
import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from bench_wsi import write_pyramid
from conftest import BUNDLE, MONUSEG, SAMPLE_CROPS, bundle_workflow
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer
from PIL import Image
from scipy import ndimage

from scripts.data import instances_from_mask, read_rgb_image
from scripts.inference import TilePredictor
from scripts.wsi import Slide, infer_slide, run_wsi_inference

INFER, WSI = BUNDLE / "configs" / "inference.json", BUNDLE / "configs" / "wsi_inference.json"
TILE, HALO, MIN_AREA = 448, 96, 8


class DarkNuclei(torch.nn.Module):
    """Deterministic stand-in segmenter (B, 3, h, w) -> logits (B, 1, h, w): red channel dark (< 0.4) and darker
    than its 15x15 neighbourhood by 0.04. Receptive field 15 px; its MoNuSeg components reach < 80 px from their
    centroid, so a 96 px halo holds them whole."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        red = image[:, :1]
        small = F.avg_pool2d(F.pad(red, (1,) * 4, mode="replicate"), 3, stride=1)
        large = F.avg_pool2d(F.pad(red, (7,) * 4, mode="replicate"), 15, stride=1)
        return 50 * torch.minimum(0.4 - small, large - small - 0.04)


def _bundle_predictor(network: torch.nn.Module) -> TilePredictor:
    """``network`` with inference.json's own load transforms and activation (sigmoid, threshold 0.5)."""
    parser = ConfigParser()
    parser.read_config(str(INFER))
    return TilePredictor(network, SimpleInferer(), parser.get_parsed_content("load"),
                         parser.get_parsed_content("activation"))


def _real_tiles(monuseg: bool) -> list[np.ndarray]:
    """1000x1000 MoNuSeg test images when present, else the shipped 256x256 crops with their flips / rotations."""
    if monuseg:
        return [tifffile.imread(path)[..., :3] for path in sorted(glob(str(MONUSEG / "test" / "*.tif")))[:5]]
    crops = [read_rgb_image(path) for path in sorted((SAMPLE_CROPS / "images").glob("*.png"))]
    return [np.rot90(crop, k)[:, ::flip] for k in range(4) for flip in (1, -1) for crop in crops]


def _mosaic(tiles: list[np.ndarray], rows: int, columns: int) -> np.ndarray:
    """RGB (rows * side, columns * side, 3) of the tiles in raster order, white (glass) in the bottom half of the
    last third of the columns."""
    side = tiles[0].shape[0]
    mosaic = np.full((rows * side, columns * side, 3), 255, dtype=np.uint8)
    for cell in range(rows * columns):
        row, column = divmod(cell, columns)
        if row < rows // 2 or column < columns - columns // 3:
            mosaic[row * side:(row + 1) * side, column * side:(column + 1) * side] = tiles[cell % len(tiles)]
    return mosaic


@pytest.fixture(scope="module")
def mosaic_slide(tmp_path_factory) -> tuple:
    """A 3-level pyramidal TIFF a few thousand px wide: (path, its level-0 pixels (H, W, 3))."""
    monuseg = (MONUSEG / "split_lvit.json").is_file()  # as the monuseg_dir fixture, which would skip instead
    tiles = _real_tiles(monuseg)
    mosaic = _mosaic(tiles, 2, 3) if monuseg else _mosaic(tiles, 6, 9)  # 2000x3000 or 1536x2304
    path = tmp_path_factory.mktemp("slide") / "mosaic.tif"
    write_pyramid(path, lambda y, x, h, w: mosaic[y:y + h, x:x + w], mosaic.shape[:2], levels=3)
    return path, mosaic


def _instances(mask: np.ndarray) -> np.ndarray:
    instances = instances_from_mask(mask)
    areas = np.bincount(instances.ravel())
    return np.where(areas[instances] >= MIN_AREA, instances, 0)


def test_reads_tiles_of_the_pyramid_exactly(mosaic_slide):
    path, mosaic = mosaic_slide
    with Slide(path) as slide:
        assert slide.shape == mosaic.shape[:2] and slide.levels == 3
        assert np.array_equal(slide.region(300, 700, 777, 1234), mosaic[300:1077, 700:1934])
        thumbnail, downsample = slide.thumbnail()
        assert downsample == 4 and np.array_equal(thumbnail, mosaic[::4, ::4])


def test_openslide_backend_reads_the_same_pixels(mosaic_slide):
    pytest.importorskip("openslide")  # openslide-bin and openslide-python come with monailabel
    path, mosaic = mosaic_slide
    with Slide(path, backend="openslide") as slide:
        assert slide.shape == mosaic.shape[:2] and slide.levels == 3
        assert np.array_equal(slide.region(300, 700, 777, 1234), mosaic[300:1077, 700:1934])
        thumbnail, downsample = slide.thumbnail()
        assert downsample == 4 and np.array_equal(thumbnail, mosaic[::4, ::4])


def test_reads_a_sub_ifd_pyramid(tmp_path):
    """OME-TIFF style: the reduced levels are sub-IFDs of the first page, not pages of their own."""
    image = read_rgb_image(min((SAMPLE_CROPS / "images").glob("*.png")))
    with tifffile.TiffWriter(tmp_path / "subifd.tif") as writer:
        writer.write(image, tile=(64, 64), subifds=1, photometric="rgb", compression="zlib")
        writer.write(image[::2, ::2], tile=(64, 64), subfiletype=1, photometric="rgb", compression="zlib")
    with Slide(tmp_path / "subifd.tif") as slide:
        assert slide.levels == 2 and slide.shape == (256, 256)
        thumbnail, downsample = slide.thumbnail()
        assert downsample == 2 and np.array_equal(thumbnail, image[::2, ::2])
        assert np.array_equal(slide.region(10, 70, 100, 150), image[10:110, 70:220])


def test_every_nucleus_is_found_exactly_once_across_tile_borders(mosaic_slide, tmp_path):
    path, mosaic = mosaic_slide
    network = DarkNuclei()
    summary = infer_slide(path, _bundle_predictor(network), tmp_path, tile_size=TILE, tile_halo=HALO,
                          min_area=MIN_AREA, write_nifti=True, progress=False)
    height, width = mosaic.shape[:2]

    # the same predictor on the whole slide in one go
    with torch.no_grad():
        logits = network(torch.as_tensor(mosaic).permute(2, 0, 1)[None].float() / 255)[0, 0].numpy()
    expected = _instances(logits >= 0)  # sigmoid >= 0.5
    stitched = tifffile.imread(tmp_path / "mosaic_instances.tif")
    assert stitched.shape == (1, height, width) and stitched.dtype == np.uint32
    stitched = stitched[0]
    count = int(summary["instances"])
    assert summary["duplicates"] == 0 and summary["cut"] == 0
    assert np.array_equal(np.unique(stitched), np.arange(count + 1))  # ids 1..N, each present

    # one-to-one with IoU 1: the two label maps are the same partition of the same pixels
    assert np.array_equal(stitched > 0, expected > 0)
    pairs = np.unique(np.stack([expected[expected > 0], stitched[stitched > 0]]), axis=1)
    assert pairs.shape[1] == len(np.unique(expected)) - 1 == count
    assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == count
    boxes = ndimage.find_objects(expected)
    crossing = sum(1 for rows, cols in filter(None, boxes)
                   if rows.start // TILE != (rows.stop - 1) // TILE or cols.start // TILE != (cols.stop - 1) // TILE)
    assert count > 1000 and crossing > 100, (count, crossing)

    # tissue only: a tile runs when its cell grown by one tissue-mask pixel (4 px at level 2) is not all glass
    run = {tuple(cell) for cell in summary["tiles_run"]}
    assert summary["tiles_in_grid"] == len(range(0, height, TILE)) * len(range(0, width, TILE)) > len(run)
    glass = mosaic.min(axis=2) == 255
    for y in range(0, height, TILE):
        for x in range(0, width, TILE):
            grown = glass[max(y - 4, 0):y + TILE + 4, max(x - 4, 0):x + TILE + 4]
            assert ((y, x) in run) == (not grown.all()), (y, x)

    # QuPath GeoJSON: one closed polygon per instance, inside the slide, on that instance
    collection = json.loads((tmp_path / "mosaic.geojson").read_text())
    features = collection["features"]
    assert collection["type"] == "FeatureCollection" and len(features) == count
    ids = sorted(feature["properties"]["measurements"]["instance_id"] for feature in features)
    assert ids == list(range(1, count + 1))
    for feature in features:
        assert feature["properties"]["objectType"] == "detection"
        assert feature["properties"]["classification"]["name"] == "nucleus"
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert feature["geometry"]["type"] == "Polygon" and len(ring) >= 4 and (ring[0] == ring[-1]).all()
        assert ring.min() >= 0 and ring[:, 0].max() < width and ring[:, 1].max() < height
        instance_id = feature["properties"]["measurements"]["instance_id"]
        assert (stitched[ring[:, 1], ring[:, 0]] == instance_id).all()  # vertices are the instance's own pixels

    nifti = np.asarray(nibabel.load(tmp_path / "mosaic_instances.nii.gz").dataobj)
    assert nifti.shape == (width, height) and np.array_equal(nifti.T, stitched)
    assert json.loads((tmp_path / "mosaic_summary.json").read_text())["instances"] == count
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "mosaic.geojson", "mosaic_instances.nii.gz", "mosaic_instances.tif", "mosaic_summary.json"]


@pytest.mark.parametrize("damage", ["truncated", "not_a_tiff"])
def test_bad_slide_names_the_file_and_writes_nothing(mosaic_slide, tmp_path, damage):
    source, _ = mosaic_slide
    data = source.read_bytes()
    bad = tmp_path / "bad.tif"
    bad.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"not a slide\n" * 100)
    output = tmp_path / "out"
    with pytest.raises(ValueError, match="bad.tif: cannot read"):
        infer_slide(bad, _bundle_predictor(DarkNuclei()), output, tile_size=TILE, tile_halo=HALO, progress=False)
    assert not output.exists() or not list(output.iterdir())


def test_missing_checkpoint_or_slides_are_named(mosaic_slide, tmp_path):
    path, _ = mosaic_slide
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        run_wsi_inference(str(path), _bundle_predictor(DarkNuclei()), tmp_path / "missing.pt", tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        run_wsi_inference(str(tmp_path / "nothing_here*.tif"), _bundle_predictor(DarkNuclei()), None, tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_bundle_config_runs_the_trained_network_on_a_slide(trained_allinsam, tmp_path):
    _, models = trained_allinsam
    crops = [read_rgb_image(path) for path in sorted((SAMPLE_CROPS / "images").glob("*.png"))]
    pixels = np.full((256, 1024, 3), 255, dtype=np.uint8)  # two crops, then glass
    pixels[:, :512] = np.concatenate(crops[:2], axis=1)
    write_pyramid(tmp_path / "slide.tif", lambda y, x, h, w: pixels[y:y + h, x:x + w], pixels.shape[:2], levels=2)

    # inference.json on the same pixels as one image, windows at multiples of 256 (no overlap)
    Image.fromarray(pixels).save(tmp_path / "slide.png")
    whole = bundle_workflow([INFER], "infer", ckpt_path=str(models / "model.pt"), output_dir=str(tmp_path / "png"),
                            input_glob=str(tmp_path / "slide.png"), sw_overlap=0.0)
    whole.run()
    probability = np.asarray(Image.open(tmp_path / "png" / "slide_prob.png")) / 255
    # the 2-epoch network is confident everywhere (0.55-0.85): threshold both runs at the upper quartile of its
    # tissue probabilities to get blobs to compare, on a PNG level: the PNG holds floor(probability x 255), so
    # ``png / 255 >= k / 255`` decides every pixel as ``probability >= k / 255`` does (a quantile between two levels
    # would not, and made this test flaky)
    threshold = float(np.floor(np.quantile(probability[:, :512], 0.75) * 255) / 255)
    expected = _instances(probability >= threshold)

    # a 256 halo with 256 tiles puts every window of every tile where the whole-image run had one: a network that
    # sees a whole window (SAM's attention) then predicts the same pixels, and the stitched instances must match
    workflow = bundle_workflow([INFER, WSI], "infer", ckpt_path=str(models / "model.pt"), tile_size=256,
                               tile_halo=256, sw_overlap=0.0, threshold=threshold, slide_glob=str(tmp_path / "*.tif"),
                               output_dir=str(tmp_path / "wsi"), wsi_progress=False)
    workflow.run()
    summary = json.loads((tmp_path / "wsi" / "slide_summary.json").read_text())
    assert summary["tiles_in_grid"] == 4 and summary["tiles_run"] == [[0, 0], [0, 256], [0, 512]]  # not the glass
    stitched = tifffile.imread(tmp_path / "wsi" / "slide_instances.tif")[0]
    features = json.loads((tmp_path / "wsi" / "slide.geojson").read_text())["features"]
    assert len(features) == summary["instances"] == stitched.max() == len(np.unique(stitched)) - 1

    ids = np.unique(expected)[1:]
    centroids = ndimage.center_of_mass(expected > 0, expected, ids)
    ious = []
    for instance_id, (_, centroid_x) in zip(ids, centroids):
        if centroid_x >= 768:  # the glass tile was not run: the whole-image run's blobs there have no counterpart
            assert not stitched[expected == instance_id].any()
            continue
        inside = expected == instance_id
        overlap = np.bincount(stitched[inside], minlength=2)
        best = int(np.argmax(overlap[1:]) + 1)
        ious.append(overlap[best] / np.count_nonzero(inside | (stitched == best)))
    ious = np.array(ious)
    # batched windows (sw_batch_size 4 against 1) may still move a pixel or two across the threshold
    assert len(ious) >= 10 and np.mean(ious > 0.5) >= 0.95, (len(ious), np.round(ious, 2).tolist(), summary)


def test_a_tile_gets_the_same_arrays_from_the_tile_predictor_as_from_inference_json(trained_allinsam, tmp_path):
    """inference.json's evaluator and its ``tile_predictor`` (what the whole-slide workflow runs) on one real crop:
    the same probabilities and masks, bit for bit, at the default overlap."""
    _, models = trained_allinsam
    crop = sorted((SAMPLE_CROPS / "images").glob("*.png"))[0]
    workflow = bundle_workflow([INFER], "infer", ckpt_path=str(models / "model.pt"), output_dir=str(tmp_path),
                               input_glob=str(crop))
    workflow.run()
    (image_output,) = workflow.parser.get_parsed_content("evaluator").state.output
    tile_output = workflow.parser.get_parsed_content("tile_predictor")(read_rgb_image(crop))
    assert tile_output["pred"].shape == (1, 256, 256) and tile_output["pred"].std() > 0.01  # a map with structure
    assert np.array_equal(tile_output["pred"], image_output["pred"].numpy())
    assert np.array_equal(tile_output["mask"], image_output["mask"].numpy() > 0)
    with pytest.raises(ValueError, match="RGB"):
        workflow.parser.get_parsed_content("tile_predictor")(read_rgb_image(crop)[..., 0])


THUMBNAIL_PROBE = """
import json, resource, sys
sys.path.insert(0, sys.argv[2])
from scripts.wsi import Slide, tissue_mask, tissue_tiles
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with Slide(sys.argv[1]) as slide:
    thumbnail, downsample = slide.thumbnail(-1)
    tiles, grid = tissue_tiles(tissue_mask(thumbnail), downsample, slide.shape, 1024)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"added_mb": (after - before) / 1024, "shape": thumbnail.shape, "downsample": downsample,
                  "tiles": tiles, "grid": grid, "top_rows": thumbnail[:100].tolist()}))
"""


def test_a_slide_without_a_pyramid_is_thumbnailed_band_by_band(tmp_path):
    """A 12000 x 8000 strip TIFF (288 MB of pixels, one level): tissue detection reads it in bands, its peak memory
    stays far below the level's size, and the thumbnail is level 0 averaged over 6 x 6 blocks."""
    import subprocess
    import sys

    height, width = 12000, 8000
    crop = read_rgb_image(sorted((SAMPLE_CROPS / "images").glob("*.png"))[0])
    pixels = np.full((height, width, 3), 245, dtype=np.uint8)  # glass
    pixels[:4096, :6144] = np.tile(crop, (16, 24, 1))  # tissue: the top-left 4 x 6 tiles of 1024
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", rowsperstrip=64)
    expected_top = pixels[:600, : width // 6 * 6].reshape(100, 6, -1, 6, 3).mean(axis=(1, 3))
    del pixels

    probe = subprocess.run([sys.executable, "-c", THUMBNAIL_PROBE, str(path), str(BUNDLE)], capture_output=True,
                           text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]
    result = json.loads(probe.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2000, 1334, 3] and result["downsample"] == 6.0
    assert np.abs(np.asarray(result["top_rows"])[:, : width // 6] - expected_top).max() <= 0.5
    tiles = set(map(tuple, result["tiles"]))  # the tissue cells, and at most the row / column touching their edge
    assert {(y, x) for y in range(0, 4096, 1024) for x in range(0, 6144, 1024)} <= tiles
    assert all(y <= 4096 and x <= 6144 for y, x in tiles) and result["grid"] == 12 * 8
    assert result["added_mb"] < 100, result["added_mb"]  # the whole level is 288 MB (read whole before: 14.6 GB peak)
