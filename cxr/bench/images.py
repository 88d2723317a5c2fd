"""The images the suites read: generated chest-like JPEGs (in parallel), or a folder of real ones,
repeated through links to the count a suite needs, and laid out as the Kaggle dataset.

Generated image k is drawn from its own seed (seed, k), so any number of processes can draw any
share of them and the files are the same. Names follow the Kaggle dataset's (IM-XXXXX-0001.jpeg,
personN_bacteria_N.jpeg), one patient per original image, so validation is carved by patient as
from the real data; a link repeating an original keeps its name's patient. `save_dicom` writes a
picture as a hospital exports it (12 bits stored, rescaled, windowed, MONOCHROME1 or 2): the cache
suite times those beside the JPEGs they came from, and tests decode them against their source.
"""

import os
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from cxr.data import find_classes, list_files
from cxr.synthetic import draw_in_parallel, render_chest

# measured on cxr-fullres: real radiographs take about 0.2 bytes per pixel as JPEG; a smooth
# upscale takes half that, so generated images get this much film grain at full size
GRAIN = 3.0
FULL_RESOLUTION = (800, 1800)  # heights of the full-resolution originals (0.8-2.6 Mpx)


def image_name(index: int) -> tuple[str, str]:
    """(class, file name) of generated image `index`: a quarter NORMAL, as in Kaggle's train."""
    if index % 4 == 0:
        return "NORMAL", f"IM-{index:05d}-0001.jpeg"
    return "PNEUMONIA", f"person{index}_bacteria_{index}.jpeg"


def draw_image(folder: Path, index: int, heights: tuple[int, int], seed: int) -> None:
    """Generated image `index` into folder/<class>/: drawn at most 320 px high (as cxr.synthetic
    draws: a full-size render takes seconds), upscaled, with film grain."""
    rng = np.random.default_rng([seed, index])
    label, name = image_name(index)
    height = int(rng.integers(heights[0], heights[1] + 1))
    width = int(height * rng.uniform(1.0, 1.45))
    drawn = min(320, height)
    small = render_chest(rng, drawn, round(drawn * width / height), pneumonia=label == "PNEUMONIA")
    pixels = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
    pixels += rng.normal(0, GRAIN, (height, width))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / label / name, quality=90)


def generate_images(folder: Path, count: int, heights: tuple[int, int] = FULL_RESOLUTION, first: int = 0,
                    seed: int = 0, workers: int | None = None) -> Path:
    """Images first .. first+count-1 into folder/{NORMAL,PNEUMONIA}/, over `workers` processes
    (default: every core, as cxr.synthetic draws its datasets); the folder."""
    for label in ("NORMAL", "PNEUMONIA"):
        (folder / label).mkdir(parents=True, exist_ok=True)
    draw_in_parallel(draw_image, [(folder, index, heights, seed) for index in range(first, first + count)], workers)
    return folder


def image_source(images: Path | None, distinct: int, work: Path) -> Path:
    """The folder of <class>/ subfolders a suite reads: `images` when given, else
    $CXR_SHARED_DATA/cxr-fullres when set, else `distinct` generated full-resolution images."""
    shared = os.environ.get("CXR_SHARED_DATA")
    if images is not None:
        return images
    if shared and (Path(shared) / "cxr-fullres").is_dir():
        return Path(shared) / "cxr-fullres"
    return generate_images(work / "generated", distinct)


def repeat_images(source: Path, folder: Path, count: int) -> list[tuple[str, int]]:
    """`count` links in folder/<class>/ cycling over source/<class>/* (shuffled, so that a small
    count still holds every class); their (path, label). A link is named after its original plus
    a repeat number, so its patient is the original's."""
    classes = find_classes(source)
    originals = list_files(source, classes)
    order = np.random.default_rng(0).permutation(len(originals))
    for k in range(count):
        path, label = originals[order[k % len(originals)]]
        link = folder / classes[label] / f"{Path(path).stem}-r{k:05d}{Path(path).suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(path).resolve())
    return list_files(folder, classes)


def kaggle_layout(items: list[tuple[str, int]], folder: Path) -> Path:
    """folder/{train,test}/<class>/ of links to `items` (of each class, every seventh to test)."""
    seen: dict[str, int] = {}
    for path, _ in items:
        label = Path(path).parent.name
        seen[label] = seen.get(label, -1) + 1
        split = "test" if seen[label] % 7 == 0 else "train"
        link = folder / split / label / Path(path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.realpath(path))
    return folder


def save_dicom(picture: np.ndarray, path: Path, bits: int = 8, monochrome1: bool = False,
               rescale: tuple[float, float] | None = None, window: tuple[float, float] | None = None,
               header: dict | None = None) -> pydicom.Dataset:
    """`picture` (uint8 greys) as a DICOM file at `path`: stored on `bits` bits (the greys scaled to
    0..2^bits-1), inverted when `monochrome1`, with a RescaleSlope/Intercept (`rescale`), a
    WindowCenter/Width (`window`) and any other elements (`header`: name -> value). Its dataset."""
    top = 2**bits - 1
    stored = np.rint(picture.astype(np.float64) * top / 255).astype(np.uint16 if bits > 8 else np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = pydicom.Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = picture.shape
    dataset.SamplesPerPixel, dataset.PixelRepresentation = 1, 0
    dataset.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = stored.itemsize * 8, bits, bits - 1
    dataset.PixelData = (top - stored if monochrome1 else stored).tobytes()
    if rescale is not None:
        dataset.RescaleSlope, dataset.RescaleIntercept = rescale
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    for name, value in (header or {}).items():
        setattr(dataset, name, value)
    dataset.save_as(path, enforce_file_format=True)
    return dataset


def dicom_copies(source: Path, folder: Path) -> Path:
    """folder/<class>/<name>.dcm: every image of source/<class>/ as a 12-bit rescaled DICOM file
    of the same picture (its greys as PIL decodes them)."""
    for path, _ in list_files(source, find_classes(source)):
        with Image.open(path) as image:
            picture = np.asarray(image.convert("L"))
        copy = folder / Path(path).parent.name / f"{Path(path).stem}.dcm"
        copy.parent.mkdir(parents=True, exist_ok=True)
        save_dicom(picture, copy, bits=12, rescale=(0.5, -1024.0))
    return folder


def describe_source(source: Path, items: list[tuple[str, int]]) -> dict:
    """Where the images came from and how large the originals are."""
    distinct = {os.path.realpath(path) for path, _ in items}
    megapixels = []
    for path in distinct:
        with Image.open(path) as image:
            megapixels.append(image.size[0] * image.size[1] / 1e6)
    return {"path": str(source), "count": len(items), "distinct": len(distinct),
            "mean_megapixels": float(np.mean(megapixels))}
