"""DICOM and 16-bit images, decoded against the 8-bit picture they were written from; bad DICOM
input skipped with its reason; patients from DICOM headers only as salted hashes; the RSNA layout.

Every DICOM here is written with pydicom (cxr.bench.images.save_dicom) from a real radiograph of
$CXR_SHARED_DATA/cxr-real, its greys as PIL decodes the JPEG: the oracle is that picture, and the
windows are checked against arithmetic done here on it.
"""

import hashlib
import hmac
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import BasicTextSRStorage, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1

from cxr.bench.images import save_dicom
from cxr.config import ConfigError, validate
from cxr.data import LAYOUTS, DataError, load_dataset
from cxr.data.splits import DICOM_HEADER, PER_IMAGE, SALT_FILE, layout_patients
from cxr.decoding import decode_image, decode_split, load_split
from cxr.pixels import read_picture
from tests.conftest import REPO

SIZE = 64
RESCALE = (0.5, -1024.0)  # a CT-like RescaleSlope/Intercept: stored 0..4095 -> -1024..1023.5
CLASSES = ("NORMAL", "PNEUMONIA")


def source_pictures(shared_data: Path, count: int = 1, split: str = "test") -> list[tuple[str, np.ndarray]]:
    """(class, greys) of the first `count` images of each class of cxr-real/<split>, at full size."""
    pictures = []
    for label in CLASSES:
        for path in sorted((shared_data / "cxr-real" / split / label).iterdir())[:count]:
            with Image.open(path) as image:
                pictures.append((label, np.asarray(image.convert("L"))))
    return pictures


@pytest.fixture(scope="module")
def picture(shared_data) -> np.ndarray:
    return source_pictures(shared_data)[0][1]


def resized(picture: np.ndarray) -> np.ndarray:
    """The oracle of decode_image on a copy of `picture`: PIL's bilinear squash to SIZE x SIZE."""
    return np.asarray(Image.fromarray(picture).resize((SIZE, SIZE), Image.BILINEAR))


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


def window_over(low: float, high: float, bits: int, monochrome1: bool) -> tuple[float, float]:
    """WindowCenter/Width that map the picture's greys low..high onto the whole output range, by
    the LINEAR function of PS3.3 C.11.2.1.2.1 (x <= c - 0.5 - (w - 1)/2 -> bottom, x > c - 0.5 +
    (w - 1)/2 -> top), in the units RESCALE gives the stored values."""
    top = 2**bits - 1

    def modality(grey: float) -> float:
        stored = grey * top / 255
        return (top - stored if monochrome1 else stored) * RESCALE[0] + RESCALE[1]

    a, b = sorted((modality(low), modality(high)))
    return (a + b) / 2 + 0.5, b - a + 1


# ---------------------------------------------------------------------------------------------
# 16-bit PNG and TIFF


def test_sixteen_bit_png_and_tiff_decode_as_the_eight_bit_image(picture, tmp_path):
    """The same picture at 8 bits, at 16 (x 257) and as a 12-bit detector's values in a 16-bit PNG
    decodes to the same greys within 1 level. PIL's convert("L") clipped the 16-bit ones at 255."""
    wide = picture.astype(np.uint16)
    files = {"eight.png": picture, "sixteen.png": wide * 257, "sixteen.tif": wide * 257,
             "twelve.png": np.rint(picture * (4095 / 255)).astype(np.uint16)}
    for name, pixels in files.items():
        Image.fromarray(pixels).save(tmp_path / name)
    eight = decode_image(str(tmp_path / "eight.png"), SIZE)
    assert np.array_equal(eight, resized(picture))
    for name in ("sixteen.png", "sixteen.tif", "twelve.png"):
        with Image.open(tmp_path / name) as image:
            assert image.mode.startswith("I;16"), name  # a real 16-bit file
        assert max_difference(read_picture(str(tmp_path / name)), picture) <= 1, name
        assert max_difference(decode_image(str(tmp_path / name), SIZE), eight) <= 1, name


def test_minmax_and_percentile_windows_set_the_range_from_the_image(tmp_path):
    """Hand-computed: half the pixels 1000, half 2000, one hot pixel 3000 (a 16-bit PNG)."""
    values = np.full((40, 40), 2000, np.uint16)
    values[:20] = 1000
    values[0, 0] = 3000
    path = tmp_path / "values.png"
    Image.fromarray(values).save(path)
    picture = {window: read_picture(str(path), window) for window in ("dicom", "minmax", "percentile")}
    # dicom: 3000 needs 12 bits, so 0..4095 -> 0..255
    assert (picture["dicom"][0, 0], picture["dicom"][30, 5], picture["dicom"][5, 5]) == (187, 125, 62)
    # minmax: 1000..3000 -> 0..255 (2000 -> 127.5, rounded to even)
    assert (picture["minmax"][0, 0], picture["minmax"][30, 5], picture["minmax"][5, 5]) == (255, 128, 0)
    # percentile: the 0.5th and 99.5th are 1000 and 2000; the hot pixel is clipped
    assert (picture["percentile"][0, 0], picture["percentile"][30, 5], picture["percentile"][5, 5]) == (255, 255, 0)


def test_the_window_is_part_of_the_cache_key_and_checked_by_the_config(picture, tmp_path, make_cfg):
    dim = picture.astype(np.float64) // 2 + 20
    path = tmp_path / "dim.png"
    Image.fromarray(dim.astype(np.uint16) * 257).save(path)
    items = [(str(path), 0)]
    dicom = load_split(items, SIZE, tmp_path / "cache", 0, "test")
    minmax = load_split(items, SIZE, tmp_path / "cache", 0, "test", window="minmax")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # one decode per file and window
    assert max_difference(dicom.images[0, 0].numpy(), resized(dim.astype(np.uint8))) <= 1
    stretched = np.rint((dim - dim.min()) * 255 / (dim.max() - dim.min())).astype(np.uint8)
    assert max_difference(minmax.images[0, 0].numpy(), resized(stretched)) <= 1
    with pytest.raises(ConfigError, match=r"data.window must be dicom\|minmax\|percentile, got gamma"):
        validate(make_cfg("data.window=gamma"))
    with pytest.raises(ConfigError, match=r"data.patient_source must be layout\|dicom"):
        validate(make_cfg("data.patient_source=name"))


# ---------------------------------------------------------------------------------------------
# DICOM pixels

VARIANTS = {  # name -> save_dicom's arguments (a window: the greys it spans)
    "8-bit MONOCHROME2": {"bits": 8},
    "12-bit rescaled": {"bits": 12, "rescale": RESCALE},
    "12-bit rescaled MONOCHROME1": {"bits": 12, "rescale": RESCALE, "monochrome1": True},
    "12-bit rescaled, window of the whole range": {"bits": 12, "rescale": RESCALE, "window": (0, 255)},
    "12-bit rescaled MONOCHROME1, narrow window": {"bits": 12, "rescale": RESCALE, "monochrome1": True,
                                                   "window": (40, 200)},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_dicom_decodes_as_its_source_picture(picture, tmp_path, variant):
    """Modality LUT, window, MONOCHROME1 (bone bright again): the picture it was written from, or
    (a narrow window) that picture's greys 40..200 stretched to 0..255, within 1 grey level."""
    arguments = dict(VARIANTS[variant])
    expected = picture
    if "window" in arguments:
        low, high = arguments["window"]
        arguments["window"] = window_over(low, high, arguments["bits"], arguments.get("monochrome1", False))
        expected = np.clip(np.rint((picture.astype(np.float64) - low) * 255 / (high - low)), 0, 255).astype(np.uint8)
    path = tmp_path / "image.dcm"
    save_dicom(picture, path, **arguments)
    assert max_difference(read_picture(str(path)), expected) <= 1
    assert max_difference(decode_image(str(path), SIZE), resized(expected)) <= 1


def test_bits_stored_is_respected_and_minmax_replaces_the_files_window(picture, tmp_path):
    """Stray bits above BitsStored (12 of 16; old overlays lived there) are not part of the value;
    data.window=minmax stretches the stored values' own range, not the file's window."""
    path = tmp_path / "overlay-bits.dcm"
    dataset = save_dicom(picture, path, bits=12, rescale=RESCALE, window=window_over(40, 200, 12, False))
    stored = np.frombuffer(dataset.PixelData, np.uint16).copy()
    stored[::3] |= 0xF000
    dataset.PixelData = stored.tobytes()
    dataset.save_as(path, enforce_file_format=True)
    narrow = np.clip(np.rint((picture.astype(np.float64) - 40) * 255 / 160), 0, 255)
    assert max_difference(read_picture(str(path)), narrow.astype(np.uint8)) <= 1
    own = np.rint(picture.astype(np.float64) * 4095 / 255)
    stretched = np.rint((own - own.min()) * 255 / (own.max() - own.min())).astype(np.uint8)
    assert max_difference(read_picture(str(path), "minmax"), stretched) <= 1


def test_compressed_dicom_decodes(picture, tmp_path):
    """JPEG baseline (decoded by Pillow, always there) within 1 level of PIL's decode of the same
    bytes; 12-bit JPEG 2000 lossless (written where pylibjpeg-openjpeg is installed) exactly."""
    jpeg = io.BytesIO()
    Image.fromarray(picture).save(jpeg, "JPEG", quality=90)
    dataset = save_dicom(picture, tmp_path / "jpeg.dcm")
    dataset.PixelData = encapsulate([jpeg.getvalue()])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    assert max_difference(read_picture(str(tmp_path / "jpeg.dcm")), np.asarray(Image.open(jpeg))) <= 1
    pytest.importorskip("openjpeg", reason="pylibjpeg-openjpeg (cxr[dicom-compressed]) writes JPEG 2000")
    dataset = save_dicom(picture, tmp_path / "j2k.dcm", bits=12, rescale=RESCALE, monochrome1=True)
    dataset.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    dataset.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "j2k.dcm").file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert max_difference(read_picture(str(tmp_path / "j2k.dcm")), picture) <= 1


# ---------------------------------------------------------------------------------------------
# Bad input


def bad_dicoms(picture: np.ndarray, folder: Path, header: dict | None = None) -> dict[str, str]:
    """Files in `folder` that are not one greyscale image (the DICOM ones with `header`), each -> a
    phrase of its reason."""
    folder.mkdir(parents=True, exist_ok=True)
    report = save_dicom(picture[:8, :8], folder / "report.dcm", header=header)
    del report.PixelData
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    report.save_as(folder / "report.dcm", enforce_file_format=True)
    frames = save_dicom(np.tile(picture[:16, :16], (3, 1)), folder / "frames.dcm", header=header)
    frames.Rows, frames.NumberOfFrames = 16, 3
    frames.save_as(folder / "frames.dcm", enforce_file_format=True)
    colour = save_dicom(picture[:16, :16], folder / "colour.dcm", header=header)
    colour.SamplesPerPixel, colour.PhotometricInterpretation, colour.PlanarConfiguration = 3, "RGB", 0
    colour.PixelData = np.repeat(picture[:16, :16, None], 3, axis=2).tobytes()
    colour.save_as(folder / "colour.dcm", enforce_file_format=True)
    save_dicom(picture, folder / "cut.dcm", bits=12, header=header)
    whole = (folder / "cut.dcm").read_bytes()
    (folder / "cut.dcm").write_bytes(whole[: len(whole) // 2])
    (folder / "page.dcm").write_text("<html><body>404 Not Found</body></html>\n")
    return {"report.dcm": "no pixel data (Basic Text SR Storage)", "frames.dcm": "3 frames",
            "colour.dcm": "not greyscale (RGB)", "cut.dcm": "truncated or damaged pixel data",
            "page.dcm": "not a DICOM file"}


def test_bad_dicom_is_skipped_with_its_reason_and_a_suffixless_dicom_is_read(picture, tmp_path):
    reasons = bad_dicoms(picture, tmp_path / "in")
    save_dicom(picture, tmp_path / "in" / "1.2.840.99999.7", bits=12, rescale=RESCALE)  # a UID for a name
    save_dicom(picture, tmp_path / "in" / "SCAN0001", bits=12, rescale=RESCALE, monochrome1=True)
    (tmp_path / "in" / "README").write_text("exported by the PACS\n")
    reasons["README"] = "not an image file"
    items = [(str(path), 0) for path in sorted((tmp_path / "in").iterdir())]
    split = decode_split(items, SIZE, 0, "test")
    assert sorted(Path(path).name for path in split.paths) == ["1.2.840.99999.7", "SCAN0001"]
    for image in split.images:
        assert max_difference(image[0].numpy(), resized(picture)) <= 1
    assert {Path(path).name: reason for path, reason in split.skipped.items()}.keys() == reasons.keys()
    for path, reason in split.skipped.items():
        assert reason.startswith(reasons[Path(path).name]), (path, reason)


def kaggle_dicoms(shared_data: Path, root: Path, count: int, header=None) -> dict[str, str]:
    """root/{train,test}/{NORMAL,PNEUMONIA}/ of 12-bit MONOCHROME1 DICOMs from cxr-real, `count`
    of each class per split, named image-NNNN.dcm; `header(k)`: the elements of the k-th file.
    Each file's path -> its source's class."""
    written, k = {}, 0
    for split in ("train", "test"):
        for label, picture in source_pictures(shared_data, count, split):
            path = root / split / label / f"image-{k:04d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_dicom(picture, path, bits=12, rescale=RESCALE, monochrome1=True,
                       window=window_over(0, 255, 12, True), header=header(k) if header else None)
            written[str(path)], k = label, k + 1
    return written


def test_a_dataset_lists_bad_dicoms_with_reasons_and_a_split_of_them_only_is_one_line(
        shared_data, picture, tmp_path, make_cfg):
    root = tmp_path / "data"
    kaggle_dicoms(shared_data, root, 4)
    reasons = bad_dicoms(picture, root / "train" / "PNEUMONIA")
    cfg = make_cfg("debug=smoke", "data=chest_xray", f"data.root={root}", "data.image_size=32", "data.limit=null")
    dataset = load_dataset(cfg.data)
    assert {Path(path).name for path in dataset.skipped} == reasons.keys()
    assert all(dataset.skipped[str(root / "train" / "PNEUMONIA" / name)].startswith(reason)
               for name, reason in reasons.items())
    for path in (root / "test" / "NORMAL").iterdir():
        path.unlink()
    bad_dicoms(picture, root / "test" / "NORMAL")
    (root / "test" / "PNEUMONIA").rename(tmp_path / "aside")
    bad_dicoms(picture, root / "test" / "PNEUMONIA")
    with pytest.raises(DataError) as error:
        load_dataset(cfg.data)
    assert "\n" not in str(error.value)
    assert str(error.value).startswith(f"no readable images in {root / 'test'} (10 skipped; ")


def test_a_missing_decoder_plugin_stops_the_run_naming_the_extra(picture, tmp_path):
    """JPEG lossless pixel data where no decoder is importable (pylibjpeg-libjpeg and gdcm kept
    out of the process, as on a machine without the extra): one line naming the extra, no run."""
    root = tmp_path / "data"
    for split in ("train", "test"):
        for label in CLASSES:
            (root / split / label).mkdir(parents=True)
            for k in range(2):
                Image.fromarray(picture).save(root / split / label / f"IM-{k}{label[0]}-0001.jpeg")
    lossless = save_dicom(picture, root / "train" / "NORMAL" / "lossless.dcm")
    lossless.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64)])  # never decoded: no decoder
    lossless["PixelData"].VR = "OB"
    lossless.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    lossless.save_as(root / "train" / "NORMAL" / "lossless.dcm", enforce_file_format=True)
    hide = "import sys; sys.modules.update(dict.fromkeys(['pylibjpeg', 'libjpeg', 'openjpeg', 'rle', 'gdcm'])); "
    command = [sys.executable, "-c", hide + "from cxr.train import main; main()", "debug=smoke", "data=chest_xray",
               f"data.root={root}", "data.image_size=32", "data.limit=null", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1, done.stderr[-2000:]
    error = [line for line in (done.stdout + done.stderr).splitlines() if "ERROR" in line]
    assert len(error) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "lossless.dcm: its pixel data is JPEG Lossless" in error[0]
    assert "pip install 'cxr[dicom-compressed]'" in error[0]


# ---------------------------------------------------------------------------------------------
# Patients from DICOM headers


def test_dicom_patients_are_salted_hashes_of_patient_id(picture, tmp_path, make_cfg):
    folder = tmp_path / "images"
    folder.mkdir()
    ids = {"a.dcm": "MRN-0042", "b.dcm": "MRN-0042", "c.dcm": "MRN-0043", "d.dcm": None}
    for name, patient in ids.items():
        save_dicom(picture[:16, :16], folder / name, header={"PatientID": patient} if patient else None)
    Image.fromarray(picture).save(folder / "e.png")
    paths = [str(folder / name) for name in (*ids, "e.png")]
    hashes = {}
    for cache in ("one", "two"):
        cfg = make_cfg("data.patient_source=dicom", f"data.cache_dir={tmp_path / cache}")
        patients = layout_patients(cfg.data)
        for path in paths:
            patients.add(path)
        salt_file = tmp_path / cache / SALT_FILE
        salt = salt_file.read_bytes()
        assert len(salt) == 32 and salt_file.stat().st_mode & 0o777 == 0o600
        expected = {patient: hmac.new(salt, patient.encode(), hashlib.sha256).hexdigest()[:16]
                    for patient in ("MRN-0042", "MRN-0043")}
        assert [patients.of[path] for path in paths[:3]] == [expected["MRN-0042"]] * 2 + [expected["MRN-0043"]]
        assert [patients.of[path] for path in paths[3:]] == paths[3:]  # no PatientID: each its own
        assert patients.source == f"{DICOM_HEADER}, {PER_IMAGE} for 2 of 5 images"
        hashes[cache] = patients.of[paths[0]]
    assert hashes["one"] != hashes["two"]  # salted per cache dir


def test_dicom_patients_keep_a_patients_images_on_one_side(shared_data, tmp_path, make_cfg):
    """Training images of 6 patients, 4 each, under neutral file names: by PatientID no patient is
    in both train and validation; by file name (each image then its own patient) some are."""
    root = tmp_path / "data"
    written = kaggle_dicoms(shared_data, root, 12, header=lambda k: {"PatientID": f"P{k // 4 if k < 24 else k}"})
    patient = {path: pydicom.dcmread(path, specific_tags=["PatientID"]).PatientID for path in written}
    straddling = {}
    for source in ("dicom", "layout"):
        cfg = make_cfg("debug=smoke", "data=chest_xray", f"data.root={root}", "data.image_size=32", "data.limit=null",
                       "data.val_fraction=0.3", f"data.patient_source={source}")
        dataset = load_dataset(cfg.data)
        train, val = ({patient[path] for path in split.paths} for split in (dataset.train, dataset.val))
        straddling[source] = train & val
        assert dataset.patients == (DICOM_HEADER if source == "dicom" else PER_IMAGE)
    assert not straddling["dicom"] and straddling["layout"]


# ---------------------------------------------------------------------------------------------
# The RSNA layout


def rsna_folder(root: Path, boxes: dict[str, int], picture: np.ndarray) -> None:
    """stage_2_train_labels.csv with `boxes[patientId]` rows of Target 1 (none: one row of
    Target 0), and a DICOM per patientId."""
    (root / "stage_2_train_images").mkdir(parents=True)
    lines = ["patientId,x,y,width,height,Target"]
    for patient, count in boxes.items():
        lines += [f"{patient},{10 * k},20,30,40,1" for k in range(count)] or [f"{patient},,,,,0"]
        save_dicom(picture[:16, :16], root / "stage_2_train_images" / f"{patient}.dcm")
    (root / "stage_2_train_labels.csv").write_text("\n".join(lines) + "\n")


def test_rsna_layout_one_label_per_image_test_carved_by_patient(picture, tmp_path, make_cfg):
    rng = np.random.default_rng(0)
    boxes = {f"{rng.integers(16**12):012x}-{k:03d}": int(rng.choice([0, 0, 0, 1, 2, 3])) for k in range(60)}
    rsna_folder(tmp_path / "rsna", boxes, picture)
    cfg = make_cfg("data=rsna", f"data.root={tmp_path / 'rsna'}", "data.test_fraction=0.25")
    validate(cfg)
    listing = LAYOUTS["rsna"](cfg.data)
    assert listing.classes == ["NORMAL", "PNEUMONIA"] and listing.task.kind == "binary"
    listed = {Path(path).stem: label for split in ("train", "test") for path, label in listing.items[split]}
    assert listed == {patient: int(count > 0) for patient, count in boxes.items()}  # each image once
    assert all(Path(path).parent.name == "stage_2_train_images" for path, _ in listing.items["train"])
    assert listing.patients.source == "column patientId" and not listing.items["val"]
    assert listing.patient_of(listing.items["test"][0][0]) == Path(listing.items["test"][0][0]).stem
    assert 0.2 <= len(listing.items["test"]) / len(boxes) <= 0.3
    table = tmp_path / "rsna" / "stage_2_train_labels.csv"
    table.write_text(table.read_text().replace(",0\n", ",2\n", 1))
    with pytest.raises(DataError, match=r"stage_2_train_labels.csv line \d+: Target '2' is not 0 or 1"):
        LAYOUTS["rsna"](cfg.data)
