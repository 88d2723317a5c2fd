"""What every suite takes from the command line: its scale as options, the common options (--out,
--device, --work, --quick), and its scratch folder.

A suite's scale is a frozen dataclass with two instances, FULL (the figures quoted in the docs)
and QUICK (seconds, for tests and a first try); each field is an option of the same name, and an
option given on the command line wins over either, so `--quick --count 48` is QUICK with 48.
"""

import argparse
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def _is_list(value) -> bool:
    """A scale field holding several values (jobs per GPU: 1,2,4), given as a comma list."""
    return type(value) is tuple


def _show(value) -> str:
    return ",".join(map(str, value)) if _is_list(value) else str(value)


def _list_of(kind: type):
    return lambda text: tuple(kind(part) for part in text.split(","))


def add_scale(parser: argparse.ArgumentParser, full, quick, helps: dict[str, str]) -> None:
    """An option per field of the scale dataclass, its help naming both defaults."""
    for field in dataclasses.fields(full):
        default, small = getattr(full, field.name), getattr(quick, field.name)
        kind = _list_of(type(default[0])) if _is_list(default) else type(default)
        parser.add_argument("--" + field.name.replace("_", "-"), type=kind, default=None,
                            help=f"{helps[field.name]} (default {_show(default)}; --quick {_show(small)})")


def scale_of(args: argparse.Namespace, full, quick):
    """QUICK with --quick, else FULL, with the fields given on the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(full) if getattr(args, f.name) is not None}
    return dataclasses.replace(quick if args.quick else full, **given)


def add_common(parser: argparse.ArgumentParser, suite: str, quick_help: str, device: bool = True) -> None:
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=Path(f"outputs/bench/{suite}.json"),
                        help=f"where its JSON goes (default outputs/bench/{suite}.json)")
    if device:
        parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder, kept afterwards (default: a temporary one, removed at the end)")


def add_images(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=Path, default=None,
                        help="folder of <class>/ subfolders of images (default: $CXR_SHARED_DATA/cxr-fullres, "
                        "else generated chest-like JPEGs of its sizes)")


@dataclass
class Work:
    path: Path
    kept: bool  # left in place at the end (--work given, or a suite that wants it looked at)


@contextmanager
def work_folder(given: Path | None, suite: str) -> Iterator[Work]:
    """--work (created if needed, kept), else a temporary folder removed at the end unless the
    suite sets `kept`."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
    work = Work(given.resolve() if given else Path(tempfile.mkdtemp(prefix=f"cxr-bench-{suite}-")), given is not None)
    try:
        yield work
    finally:
        if not work.kept:
            shutil.rmtree(work.path, ignore_errors=True)
