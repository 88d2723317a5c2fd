"""`python -m cxr.bench SUITE [options]`: where the time goes, measured side by side on the same
images. Each suite writes outputs/bench/<suite>.json (--out); docs/benchmark.md lists every option
and JSON key, docs/gpu-check.md the GPU check. `python -m cxr.bench SUITE --help` for a suite's
options; `--quick` runs a suite at toy size (seconds to minutes on a CPU).
"""

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

SUITES = ("loader", "train", "sweep", "gpu", "cache", "index")
# what the suites (and the sweeps they start) import -> the package that provides it
REQUIRED = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "PIL": "pillow",
            "sklearn": "scikit-learn", "scipy": "scipy", "matplotlib": "matplotlib", "tensorboard": "tensorboard",
            "tqdm": "tqdm", "hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime"}
LAUNCHER = {"joblib": "joblib", "hydra_plugins.hydra_joblib_launcher": "hydra-joblib-launcher"}  # the gpu sweeps'
CARRIED = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "hydra-joblib-launcher")  # what `make wheels` builds
RENAMED = {"--gpu-suite": "gpu", "--cache-suite": "cache", "--index-suite": "index"}  # the flags before subcommands


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def missing_message(packages: list[str]) -> str:
    """One line: what is missing, and the command that installs it (offline, from carried wheels,
    when it is all Hydra)."""
    names = " ".join(packages)
    if all(name in CARRIED for name in packages):
        how = (f"copy .whl/ (`make wheels` on a machine with a network) beside the checkout and run `make gpu-check`, "
               f"or: {sys.executable} -m pip install --no-index --find-links .whl {names}")
    else:
        how = f"{sys.executable} -m pip install {names}"
    return f"{', '.join(packages)} {'is' if len(packages) == 1 else 'are'} not importable by {sys.executable}: {how}"


def build_parser(suites: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cxr.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, module in suites.items():
        module.add_arguments(commands.add_parser(name, help=module.HELP, description=module.__doc__,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))
    everything = commands.add_parser("all", help="every suite in turn, each at its defaults (gpu where CUDA is)")
    everything.add_argument("--quick", action="store_true", help="every suite at its --quick scale")
    everything.add_argument("--out-dir", type=Path, default=Path("outputs/bench"), help="where the JSON files go")
    everything.add_argument("--device", default="auto", help="for the suites that take one (default auto)")
    everything.add_argument("--images", type=Path, help="for the suites that read image files")
    return parser


def run_all(args: argparse.Namespace, parser: argparse.ArgumentParser, suites: dict) -> list[dict]:
    """Each suite with the options of `all` it takes (the others are dropped), into --out-dir."""
    import torch

    reports = []
    for name in SUITES:
        if name == "gpu" and not (torch.cuda.is_available() and args.device in ("auto", "cuda")):
            print("gpu: skipped, no CUDA device (its rehearsal on a CPU: python -m cxr.bench gpu --quick)")
            continue
        argv = [name, "--out", str(args.out_dir / f"{name}.json"), "--device", args.device,
                *(["--images", str(args.images)] if args.images else []), *(["--quick"] if args.quick else [])]
        suite_args, _ = parser.parse_known_args(argv)  # a suite without --device or --images ignores it
        reports.append(suites[name].run(suite_args))
    return reports


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in RENAMED:
        print(f"error: {argv[0]} is now a subcommand: python -m cxr.bench {RENAMED[argv[0]]}", file=sys.stderr)
        return 2
    absent = [package for module, package in REQUIRED.items() if not importable(module)]
    if {"gpu", "all"} & set(argv):
        absent += [package for module, package in LAUNCHER.items() if not importable(module)]
    if absent:
        print(f"error: {missing_message(absent)}", file=sys.stderr)
        return 2
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from cxr.config import ConfigError
    from cxr.data import DataError
    from cxr.runtime import DeviceError

    suites = {name: importlib.import_module(f"cxr.bench.{name}") for name in SUITES}
    parser = build_parser(suites)
    args = parser.parse_args(argv)
    try:
        reports = run_all(args, parser, suites) if args.suite == "all" else [suites[args.suite].run(args)]
    except (ConfigError, DataError, DeviceError, HydraException, OmegaConfBaseException) as error:
        print(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}", file=sys.stderr)
        return 2
    # 1: a sweep job or a section of the GPU check failed (its JSON says which and why)
    return 1 if any(r.get("all_jobs_ok") is False or r.get("failed_sections") for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
