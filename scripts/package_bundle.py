"""Package a bundle as the MONAI model zoo does: checks first, then ``<name>_v<version>.zip`` with the top folder
named after the bundle and fixed timestamps, so two builds of the same tree are byte-identical.

    python scripts/package_bundle.py allinsam                 # -> dist/allinsam_v<version>.zip
    python scripts/package_bundle.py nnunet_baseline
    python scripts/package_bundle.py all --output_dir dist
    python scripts/package_bundle.py /path/to/a/copy/allinsam  # any bundle folder

Checks (offline, nothing downloaded): LICENSE, configs/metadata.json and docs/README.md present; the version in
the changelog; ``verify_metadata`` against the schema shipped in ``bundles/``; ``models/model.pt`` loads with
``weights_only`` into the bundle's network, strictly (anything else, a pickle payload included, is refused); and,
for bundles with a ``network_def``, ``verify_net_in_out`` and ``ckpt_export`` to TorchScript (scripting, else
tracing at the metadata's input shape, compared with the eager network), both on eager torch in one interpreter.
A failed check stops before anything is written, except TorchScript, which is reported: the zip never carries
``model.ts``.

The zip holds the bundle's files except run outputs (``runs/``, ``eval/``, caches) and checkpoints other than
``models/model.pt`` (with its ``model_calibration.json`` when one was measured on it); with weights it adds
``large_files.yml`` (SHA-256), which ``python -m monai.bundle download_large_files --bundle_path <unpacked>`` checks.
"""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import bundle_path  # noqa: F401  (the bundle's scripts package, for read_network_weights)
import fire

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = BUNDLES / "meta_schema_20240725.json"
SKIPPED_FOLDERS = {"runs", "eval", "__pycache__", ".ipynb_checkpoints", ".pytest_cache"}
WEIGHTS = "models/model.pt"
CALIBRATION = "models/model_calibration.json"  # calibrate.json's threshold / instance split for WEIGHTS
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception)\b.*:")


class PackagingError(RuntimeError):
    """A model-zoo check failed; the message names the bundle file and the problem."""


def bundle_members(bundle: Path) -> list[str]:
    """Paths (POSIX, relative to ``bundle``) that go into the zip, sorted."""
    members = []
    for path in bundle.rglob("*"):
        relative = path.relative_to(bundle).as_posix()
        if not path.is_file() or SKIPPED_FOLDERS & set(path.relative_to(bundle).parts[:-1]):
            continue
        if path.suffix in (".pyc", ".tmp") or path.name.startswith("."):
            continue
        if relative.startswith("models/") and relative not in (WEIGHTS, CALIBRATION):
            continue
        if relative == CALIBRATION and not (bundle / WEIGHTS).is_file():
            continue
        members.append(relative)
    return sorted(members)


def weights_sha256(bundle: Path) -> str:
    return hashlib.sha256((bundle / WEIGHTS).read_bytes()).hexdigest()


def large_files_yml(bundle: Path) -> str:
    """``large_files.yml`` for the weights (their URL is empty: they travel inside the zip)."""
    digest = weights_sha256(bundle)
    return (f'large_files:\n  - path: "{WEIGHTS}"\n    url: ""\n'
            f'    hash_val: "{digest}"\n    hash_type: "sha256"\n')


def write_zip(bundle: Path, zip_path: Path, extra: dict[str, str]) -> None:
    """Deterministic zip: sorted members under ``<bundle name>/``, fixed time and mode, no directory entries."""
    contents = {member: (bundle / member).read_bytes() for member in bundle_members(bundle)}
    contents.update({name: text.encode() for name, text in extra.items()})
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    partial = zip_path.with_name(zip_path.name + ".tmp")
    with zipfile.ZipFile(partial, "w") as archive:
        for member in sorted(contents):
            info = zipfile.ZipInfo(f"{bundle.name}/{member}", date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            archive.writestr(info, contents[member], compresslevel=9)
    os.replace(partial, zip_path)


def _last_error_line(process: subprocess.CompletedProcess, naming: str | None = None) -> str:
    """The exception line of a failed command's traceback (``SomeError: message``); the last one that contains
    ``naming`` if any does (the cause, where MONAI's config parser wraps it)."""
    errors = [line for line in process.stderr.splitlines() if ERROR_LINE.match(line)]
    named = [line for line in errors if naming and naming in line]
    return (named or errors or [f"exit code {process.returncode}"])[-1]


def check_files(bundle: Path, metadata: dict) -> list[tuple[str, str]]:
    for required in ("LICENSE", "configs/metadata.json", "docs/README.md"):
        if not (bundle / required).is_file():
            raise PackagingError(f"{bundle / required}: missing")
    if metadata["version"] not in metadata.get("changelog", {}):
        raise PackagingError(f"{bundle}/configs/metadata.json: version {metadata['version']} not in its changelog")
    return [("LICENSE, metadata, model card", "present"), ("version in changelog", metadata["version"])]


def check_metadata(bundle: Path) -> list[tuple[str, str]]:
    """MONAI's ``verify_metadata`` (what ``python -m monai.bundle verify_metadata`` runs) against the shipped schema,
    in this process: it reads JSON only, no bundle code."""
    from monai.bundle import verify_metadata

    metadata = bundle / "configs" / "metadata.json"
    try:
        with warnings.catch_warnings():  # its log and its note that the (shipped) schema has no hash to check
            warnings.simplefilter("ignore")
            logging.disable(logging.INFO)
            verify_metadata(meta_file=str(metadata), filepath=str(SCHEMA))
    except Exception as error:
        raise PackagingError(f"{metadata}: {type(error).__name__}: {str(error).splitlines()[0]}") from None
    finally:
        logging.disable(logging.NOTSET)
    return [("verify_metadata", f"valid against {SCHEMA.name}")]


def check_weights(bundle: Path) -> list[tuple[str, str]]:
    """``models/model.pt``, when present, is a state dict of tensors (read with ``weights_only`` here, so a hostile or
    corrupt file is refused without a fresh interpreter), its calibration was measured on it, and the inference
    config's ``network_def``, if it has one, loads it strictly (in a fresh interpreter, with the bundle's code)."""
    weights = bundle / WEIGHTS
    if not weights.is_file():
        return [("weights", f"no {WEIGHTS}")]
    state = _state_dict_of_tensors(weights)
    calibrated = check_calibration(bundle)
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    if "network_def" not in inference:
        return [("weights", f"{WEIGHTS} loads (weights_only, a state dict of {len(state)} tensors) + "
                            f"large_files.yml (SHA-256)")] + calibrated
    # the network first: a bundle may read the checkpoint to build it (allinsam: the recipe), with its own checks
    load = ("network = parser.get_parsed_content('network_def')\n"
            f"state = torch.load({str(weights)!r}, map_location='cpu', weights_only=True)\n"
            "network.load_state_dict(state.get('model', state), strict=True)\n")
    try:
        _torch_in_bundle(bundle, load, naming=str(weights))
    except PackagingError as error:
        raise PackagingError(f"{weights}: not this bundle's network weights: "
                             f"{str(error).removeprefix(f'{bundle}: ')}") from None
    return [("weights", f"{WEIGHTS} loads (weights_only, into network_def, strict) + large_files.yml (SHA-256)")] \
        + calibrated


def _state_dict_of_tensors(weights: Path) -> dict:
    """The names -> tensors in ``weights`` (a state dict, or a training checkpoint's ``model``), read in this process
    by the bundle's own ``read_network_weights`` (``weights_only``): anything else is refused before it could run
    code."""
    from scripts.networks import read_network_weights

    try:
        state = read_network_weights(weights)
    except ValueError as error:
        raise PackagingError(f"{weights}: not this bundle's network weights: "
                             f"{str(error).removeprefix(f'{weights}: ')}") from None
    if not state:
        raise PackagingError(f"{weights}: not this bundle's network weights: an empty state dict")
    return state


def check_calibration(bundle: Path) -> list[tuple[str, str]]:
    """``models/model_calibration.json``, when present, was measured on ``models/model.pt`` (its SHA-256): a zip never
    ships the post-processing of other weights."""
    calibration = bundle / CALIBRATION
    if not calibration.is_file():
        return []
    try:
        measured = json.loads(calibration.read_text())["checkpoint_sha256"]
    except (ValueError, KeyError, TypeError):
        raise PackagingError(f"{calibration}: not a calibration written by calibrate.json") from None
    if measured != weights_sha256(bundle):
        raise PackagingError(f"{calibration}: measured on other weights than {bundle / WEIGHTS}; rerun calibrate.json "
                             f"or delete it")
    return [("calibration", f"{CALIBRATION} measured on these weights (SHA-256)")]


def check_network(bundle: Path, metadata: dict) -> list[tuple[str, str]]:
    """verify_net_in_out and TorchScript export, for bundles whose inference config has a ``network_def``: MONAI's
    own functions, all in one fresh interpreter (each interpreter is about 8 s of imports on 2 cores)."""
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    if "network_def" not in inference:
        reason = "inference.json has no network_def"
        return [("verify_net_in_out", f"not applicable: {reason}"), ("ckpt_export", f"not applicable: {reason}")]
    image = metadata["network_data_format"]["inputs"]["image"]
    shape = [1, int(image["num_channels"]), *(int(n) for n in image["spatial_shape"])]
    with tempfile.TemporaryDirectory() as scratch:
        arguments = f"weights, scratch, shape = {str(bundle / WEIGHTS)!r}, {scratch!r}, {shape!r}\n"
        output = _torch_in_bundle(bundle, arguments + NETWORK_CHECKS, naming="verify_net_in_out")
    verified, exported = output.strip().splitlines()[-2:]
    return [("verify_net_in_out", verified), ("ckpt_export", exported)]


# run by _torch_in_bundle after ``weights, scratch, shape = ...``: verify_net_in_out (its failure fails the check),
# then an export to a temporary model.ts (scripting, else tracing at the metadata's input shape) compared with the
# eager network (reported, never a failure); the last two lines printed are the two results
NETWORK_CHECKS = """
import os
from monai.bundle import ckpt_export, verify_net_in_out

# eager torch where the inference config picks a runtime (allinsam): TorchScript is torch's, and an exported runtime
# inside torch.jit.trace crashed the interpreter (a segmentation fault after an OpenVINO session)
eager = {key: value for key, value in (("inference_runtime", "torch"), ("inference_precision", "float32"))
         if key in parser.get()}
for key, value in eager.items():
    parser[key] = value
common = dict(meta_file="configs/metadata.json", config_file="configs/inference.json", **eager)
try:
    verify_net_in_out("network_def", **common)
except Exception as error:
    raise RuntimeError(f"verify_net_in_out failed: {type(error).__name__}: {error}") from None
verified = "input / output shapes and dtypes as in metadata.json"
network = parser.get_parsed_content("network_def")
if not os.path.isfile(weights):  # the network's initial weights: exportability does not depend on training
    weights = os.path.join(scratch, "initial.pt")
    torch.save(network.state_dict(), weights)
exported, failures = os.path.join(scratch, "model.ts"), []
for how, options in (("torch.jit.script", {}),
                     (f"torch.jit.trace at {tuple(shape)}", {"use_trace": True, "input_shape": shape})):
    try:
        ckpt_export("network_def", filepath=exported, ckpt_file=weights, **common, **options)
        break
    except Exception as error:
        failures.append(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
else:
    print(verified, f"NOT exportable: scripting failed ({failures[0]}); tracing failed ({failures[1]})", sep="\\n")
    raise SystemExit
state = torch.load(weights, map_location="cpu", weights_only=True)
network.load_state_dict(state.get("model", state))
network.eval()
scripted = torch.jit.load(exported)
torch.manual_seed(0)
report = [how + (f" (scripting failed: {failures[0]})" if failures else "")]
for batch in (1, 2):
    image = torch.rand(batch, *shape[1:])
    try:
        with torch.no_grad():
            difference = (network(image) - scripted(image)).abs().max().item()
        report.append(f"batch {batch}: max |TorchScript - eager| = {difference:.2g}")
    except RuntimeError:
        report.append(f"batch {batch}: fails in TorchScript")
print(verified, "; ".join(report), sep="\\n")
"""


def _torch_in_bundle(bundle: Path, code: str, naming: str | None = None) -> str:
    """Run ``code`` with ``torch`` and ``parser`` (the bundle's inference.json) in a fresh interpreter; a failure
    reports the error line naming ``naming`` if there is one."""
    prelude = ("import torch\nfrom monai.bundle import ConfigParser\nparser = ConfigParser()\n"
               "parser.read_config('configs/inference.json')\n")
    env = {**os.environ, "PYTHONPATH": str(bundle)}
    process = subprocess.run([sys.executable, "-c", prelude + code], cwd=bundle, env=env, capture_output=True,
                             text=True)
    if process.returncode:
        raise PackagingError(f"{bundle}: {_last_error_line(process, naming)}")
    return process.stdout


def package(bundle: str = "all", output_dir: str = str(REPO / "dist")) -> list[str]:
    """Check and zip ``bundle`` (a name under ``bundles/``, a bundle folder, or ``all``); returns the zip paths."""
    folders = sorted(path.parent.parent for path in BUNDLES.glob("*/configs/metadata.json")) if bundle == "all" \
        else [Path(bundle) if Path(bundle).is_dir() else BUNDLES / bundle]
    zips = []
    for folder in folders:
        folder = folder.resolve()
        metadata_file = folder / "configs" / "metadata.json"
        if not metadata_file.is_file():
            raise FileNotFoundError(f"{metadata_file}: not found; {bundle!r} is not a bundle")
        metadata = json.loads(metadata_file.read_text())
        print(f"{folder.name} {metadata['version']}: checking", flush=True)
        checks = (check_files(folder, metadata) + check_metadata(folder) + check_weights(folder)
                  + check_network(folder, metadata))
        extra = {"large_files.yml": large_files_yml(folder)} if (folder / WEIGHTS).is_file() else {}
        zip_path = Path(output_dir) / f"{folder.name}_v{metadata['version']}.zip"
        write_zip(folder, zip_path, extra)
        for name, result in checks:
            print(f"  {name:<30} {result}")
        print(f"  -> {zip_path} ({zip_path.stat().st_size / 1e6:.1f} MB)", flush=True)
        zips.append(str(zip_path))
    return zips


if __name__ == "__main__":
    fire.Fire(package)
