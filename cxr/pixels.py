"""An image file's grey values and the 0-255 picture they become: the reader under
cxr.decoding.decode_image (and under Grad-CAM's overlays, drawn on the same picture).

    JPEG, PNG, TIFF  through PIL: 8-bit images as they are; 16-bit ones (mode I;16, I) by their
                     range, where PIL's convert("L") would clip every value above 255 to white
    DICOM            through pydicom: `.dcm`, or any other file with the DICM preamble. The
                     standard's order (PS3.4 N.2): stored values (BitsStored respected) ->
                     modality LUT (RescaleSlope/Intercept) -> VOI LUT or window (WindowCenter/
                     Width) -> MONOCHROME1 inverted, so that bone is bright in every image

`WINDOWS` (data.window) says which range of grey values becomes 0..255:

    dicom       the range the file declares: a DICOM's VOI LUT or window, else the range BitsStored
                allows through the modality LUT; a 16-bit PNG or TIFF's bit depth, the fewest of
                8/10/12/14/16 bits that hold its brightest value (PNG has no 12-bit depth: a 12-bit
                detector's image saved as 16-bit PNG is scaled by 4095, not 65535); 8-bit images
                unchanged
    minmax      the image's own darkest to brightest value (a DICOM's VOI is then not applied)
    percentile  its 0.5th to 99.5th percentile: a few hot or dead pixels do not set the scale

Of a DICOM file only PIXEL_TAGS are parsed (pydicom's `specific_tags`): names, IDs, dates and
every other header value stay undecoded bytes, so none can reach a log line, an error message or
an output file. A file that is not a usable image raises `Unreadable` with the reason it is
skipped for; compressed pixel data without its decoder plugin raises `DecoderMissing`, an error
for the whole dataset (every other file of that export is compressed alike).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

# what installs the decoders of compressed DICOM (JPEG, JPEG-LS, JPEG 2000, RLE): pyproject's extra
COMPRESSED_EXTRA = "pip install 'cxr[dicom-compressed]'"
# the DICOM elements read: the image pixel module, the modality and VOI LUT modules, and the SOP
# class (named when a file without pixels is skipped)
PIXEL_TAGS = ["SOPClassUID", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
              "PlanarConfiguration", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
              "NumberOfFrames", "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
              "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence", "PixelData"]
# pydicom logs a traceback for every plugin that fails on damaged pixel data; such a file is
# skipped and listed with its reason instead, so in a run's log the traceback is only noise
logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)
GREY = ("MONOCHROME1", "MONOCHROME2")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PIL's integer greys (I: 32-bit)
DEPTHS = (8, 10, 12, 14, 16)  # the bit depths detectors store
PERCENTILES = (0.5, 99.5)
# A JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT) only while that leaves at least
# this many pixels per output pixel for the bilinear squash to average: its picture is then the one
# its pixels give in any other format. At 1 (the draft at the output size), a JPEG and a 16-bit PNG
# of the same pixels differed by 0.6 grey levels on average at 224 px from 1-3 Mpx originals and
# moved a model's probability by up to 0.09 at 64 px; at 4, 0.03 levels, and the decode is still
# cheaper than without a draft.
DRAFT_MARGIN = 4


class Unreadable(Exception):
    """A file that is not a usable image: skipped, and listed with this reason."""


class DecoderMissing(Exception):
    """Compressed DICOM pixel data that no installed plugin decodes (one line naming the extra)."""


@dataclass
class Grey:
    """One image's grey values as its file means them (DICOM: past the modality LUT, and the VOI
    when the window applies it), and the range [low, high] the file declares for them."""

    values: np.ndarray
    low: float
    high: float
    inverted: bool = False  # MONOCHROME1: the highest value is shown black


@dataclass(frozen=True)
class Window:
    """A data.window choice: whether a DICOM's own VOI LUT or window applies first, and which
    range of the grey values becomes 0..255."""

    voi: bool
    bounds: Callable[[Grey], tuple[float, float]]


DEFAULT_WINDOW = "dicom"
# data.window: config validation and decoding read this one table
WINDOWS = {
    "dicom": Window(True, lambda grey: (grey.low, grey.high)),
    "minmax": Window(False, lambda grey: (float(grey.values.min()), float(grey.values.max()))),
    "percentile": Window(False, lambda grey: tuple(float(v) for v in np.percentile(grey.values, PERCENTILES))),
}


def read_picture(path: str, window: str = DEFAULT_WINDOW, draft: int | None = None) -> np.ndarray:
    """The file's picture, uint8 (H, W), under `window`; `draft`: the size it is for (a JPEG may
    then be decoded at 1/2, 1/4 or 1/8 scale, see DRAFT_MARGIN). Raises Unreadable or DecoderMissing."""
    chosen = WINDOWS[window]
    grey = read_dicom(path, chosen.voi) if is_dicom(path) else read_pil(path, draft)
    low, high = chosen.bounds(grey)
    if grey.values.dtype == np.uint8 and (low, high) == (0, 255) and not grey.inverted:
        return grey.values  # an 8-bit image under the dicom window: as it is
    scale = 255 / (high - low) if high != low else 0.0
    picture = np.clip(np.rint((grey.values.astype(np.float32) - low) * scale), 0, 255).astype(np.uint8)
    return 255 - picture if grey.inverted else picture


def is_dicom(path: str) -> bool:
    """`.dcm`, or a file with the DICM preamble at byte 128 (exports often have no suffix, or a
    UID for a name)."""
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as file:
            file.seek(128)
            return file.read(4) == b"DICM"
    except OSError:
        return False


def read_pil(path: str, draft: int | None) -> Grey:
    try:
        with Image.open(path) as image:
            if draft:  # JPEG only (other formats ignore it)
                image.draft("L", (draft * DRAFT_MARGIN, draft * DRAFT_MARGIN))
            if image.mode in SIXTEEN_BIT_MODES:
                values = np.asarray(image)
                return Grey(values, *depth_range(values))
            if image.mode == "F":  # floating point: no depth to declare
                values = np.asarray(image)
                return Grey(values, float(values.min()), float(values.max()))
            return Grey(np.asarray(image.convert("L")), 0.0, 255.0)
    except Image.UnidentifiedImageError:
        raise Unreadable("not an image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise Unreadable(f"damaged image ({error})") from None


def depth_range(values: np.ndarray) -> tuple[float, float]:
    """0 .. 2^bits - 1 for the fewest of DEPTHS bits that hold the brightest value; values below 0
    or beyond 16 bits (a 32-bit TIFF) declare no depth: their own range."""
    darkest, brightest = int(values.min()), int(values.max())
    if darkest < 0 or brightest >= 2 ** DEPTHS[-1]:
        return float(darkest), float(brightest)
    bits = next(bits for bits in DEPTHS if brightest < 2**bits)
    return 0.0, float(2**bits - 1)


def read_dicom(path: str, voi: bool) -> Grey:
    """The image of a DICOM file through its modality LUT, and through its VOI LUT or window
    when `voi`; the range it then declares."""
    try:
        dataset = pydicom.dcmread(path, specific_tags=PIXEL_TAGS)
    except InvalidDicomError:
        raise Unreadable("not a DICOM file (no DICM preamble)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        raise Unreadable("damaged DICOM header") from None
    check_one_grey_image(dataset)
    stored = stored_values(dataset, path)
    try:
        values = apply_modality_lut(stored, dataset)
        low, high = stored_range(dataset)
        if voi:
            values, low, high = apply_voi(values, dataset, (low, high))
    except (ValueError, TypeError, AttributeError, NotImplementedError, IndexError) as error:
        raise Unreadable(f"unusable modality LUT, VOI LUT or window ({error})") from None
    return Grey(values, low, high, inverted=dataset.PhotometricInterpretation == "MONOCHROME1")


def check_one_grey_image(dataset: pydicom.Dataset) -> None:
    """One greyscale frame, or Unreadable saying what the file holds instead."""
    if "PixelData" not in dataset:  # a structured report, a presentation state, ... or a file cut short
        sop_class = dataset.get("SOPClassUID")
        raise Unreadable(f"no pixel data ({sop_class.name})" if sop_class else
                         "truncated or damaged DICOM file (no SOP class, no pixel data)")
    frames = int(dataset.get("NumberOfFrames") or 1)
    if frames > 1:
        raise Unreadable(f"{frames} frames (a file of one image is read)")
    photometric = str(dataset.get("PhotometricInterpretation", "")).strip()
    if dataset.get("SamplesPerPixel", 1) != 1 or photometric not in GREY:
        raise Unreadable(f"not greyscale ({photometric or 'no PhotometricInterpretation'})")


def stored_values(dataset: pydicom.Dataset, path: str) -> np.ndarray:
    """The stored pixel values (pydicom keeps BitsStored of BitsAllocated, sign-extended)."""
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise Unreadable("damaged DICOM header (no transfer syntax)")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise Unreadable(f"pixel data in {syntax.name}, which pydicom does not decode") from None
    if not decoder.is_available:
        raise DecoderMissing(f"{path}: its pixel data is {syntax.name}, and no decoder for it is installed "
                             f"({COMPRESSED_EXTRA} adds them)")
    try:
        return dataset.pixel_array
    except Exception as error:  # pydicom and its plugins raise many kinds for damaged data
        raise Unreadable(f"truncated or damaged pixel data ({type(error).__name__})") from None


def stored_range(dataset: pydicom.Dataset) -> tuple[float, float]:
    """The values BitsStored allows, through the modality LUT: the range a window is mapped onto
    (as pydicom's apply_windowing maps it), and the file's own range when it has no VOI."""
    if dataset.get("ModalityLUTSequence"):
        return 0.0, float(2 ** dataset.ModalityLUTSequence[0].LUTDescriptor[2] - 1)
    bits = dataset.BitsStored
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if dataset.PixelRepresentation else (0, 2**bits - 1)
    if "RescaleSlope" in dataset and "RescaleIntercept" in dataset:
        slope, intercept = float(dataset.RescaleSlope), float(dataset.RescaleIntercept)
        return low * slope + intercept, high * slope + intercept
    return float(low), float(high)


def apply_voi(values: np.ndarray, dataset: pydicom.Dataset,
              stored: tuple[float, float]) -> tuple[np.ndarray, float, float]:
    """The values through the VOI LUT (its output spans its entries' bits) or the window (mapped
    onto the stored range); unchanged, with the stored range, when the file has neither."""
    if dataset.get("VOILUTSequence"):
        # a LUT is indexed by whole numbers: rescaled values are, in files that carry a VOI LUT
        indices = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
        return apply_voi_lut(indices, dataset), 0.0, float(2 ** dataset.VOILUTSequence[0].LUTDescriptor[2] - 1)
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        return apply_voi_lut(values, dataset), *stored
    return values, *stored

