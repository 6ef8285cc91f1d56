"""python -m emsedit_fast.info: versions, build status of _C, Triton mode, and every op x backend with reasons."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys


def collect() -> dict:
    """Everything `info` prints, as a dict (also used by benchmark reports)."""
    import torch

    from emsedit_fast import _ext
    from emsedit_fast.ops import OPS_BY_STEM
    from emsedit_fast.ops._dispatch import CPP_ATEN_PATHS
    from emsedit_fast.ops._dispatch import availability
    from emsedit_fast.ops._dispatch import interpreting
    from emsedit_fast.version import __version__

    versions = {"emsedit_fast": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "datasets", "tokenizers", "safetensors", "peft"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except Exception as err:
            versions[name] = f"not available ({type(err).__name__})"
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    backends = {dev: availability(dev) for dev in devices}
    backends.setdefault("cuda", {"reference": "no CUDA device", "cpp": "no CUDA device", "triton": "no CUDA device"})
    record = _ext.build_record()
    return {
        "versions": versions,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpp_extension": {"loaded": _ext.load_error() is None, "error": _ext.load_error(), "build": _ext.build_info(),
                          "cuda_kernels": cuda_kernels_status(_ext.has_cuda(), torch.version.cuda,
                                                              torch.cuda.is_available(), record),
                          "build_record": record},
        "triton_mode": "interpreter (TRITON_INTERPRET=1)" if interpreting() else (
            "compiled (CUDA)" if torch.cuda.is_available() else "unavailable without a GPU or TRITON_INTERPRET=1"),
        "backends": backends,
        "ops": {dev: {op: _op_support(stem, op, dev, backends[dev]) for stem, names in OPS_BY_STEM.items()
                      for op in names} for dev in devices},
        "cpp_aten_paths": {f"{dev} {op}": what for (dev, op), what in CPP_ATEN_PATHS.items() if dev in devices},
    }


def cuda_kernels_status(has_cuda: bool, torch_cuda: str | None, gpu: bool, record: dict) -> str:
    """One line on the CUDA kernels of _C: "available", or why not, taken from the build's own record when it left
    one. A machine with a GPU but without them gets a line that says the kernels are lost."""
    if has_cuda:
        return "available"
    if torch_cuda is None:
        return "not built: this torch has no CUDA"
    if record.get("error"):
        why = f"the last build failed ({record['error']})"
    elif record.get("cuda_skipped"):
        why = record["cuda_skipped"]
    elif record.get("cuda"):
        why = "built with CUDA, but the loaded _C is not that build (rebuild: pip install -e . --no-build-isolation)"
    else:
        why = "no build record (emsedit_fast/_build.json); rebuild to see why"
    return ("LOST on this GPU machine: " if gpu else "not built: ") + why


def _op_support(stem: str, op: str, device: str, backends: dict) -> dict:
    """{backend: None or why it cannot serve `op` on `device`}."""
    from emsedit_fast.ops._dispatch import cpp_has_kernel

    out = {"reference": None}
    out["cpp"] = backends["cpp"] or (None if cpp_has_kernel(op, device) else f"no {device} kernel for {op} in _C")
    why = backends["triton"]
    if why is None:
        try:
            importlib.import_module(f"emsedit_fast.kernels.{stem}")
            import torch

            if not hasattr(torch.ops.emsedit_fast, f"triton_{op}"):
                why = f"emsedit_fast.kernels.{stem} registers no triton_{op}"
        except Exception as err:
            why = f"emsedit_fast.kernels.{stem} failed to import ({type(err).__name__}: {err})"
    out["triton"] = why
    return out


def format_report(info: dict) -> str:
    lines = ["emsedit_fast " + info["versions"]["emsedit_fast"], "", "versions:"]
    lines += [f"  {k:14s} {v}" for k, v in info["versions"].items()]
    lines += ["", f"cuda device:     {info['cuda_device'] or 'none'}"]
    cpp = info["cpp_extension"]
    lines.append(f"C++ extension:   {'loaded' if cpp['loaded'] else 'NOT loaded: ' + str(cpp['error'])}")
    if cpp["build"]:
        lines.append("  build:         " + ", ".join(f"{k}={v}" for k, v in cpp["build"].items()))
    lines.append(f"  CUDA kernels:  {cpp['cuda_kernels']}")
    rec = cpp.get("build_record") or {}
    if rec:
        lines.append(f"  last build:    {'built' if rec.get('built') else 'FAILED'} against torch {rec.get('torch')}, "
                     f"{rec.get('cxx_std')}, CUDA {'on' if rec.get('cuda') else 'off'}"
                     + (f" (CUDA_HOME={rec['cuda_home']}, arch {rec.get('arch_list')})" if rec.get("cuda") else ""))
        if rec.get("torch") and rec["torch"] != info["versions"]["torch"]:
            lines.append(f"  WARNING:       _C was built against torch {rec['torch']} but torch "
                         f"{info['versions']['torch']} is running: rebuild it")
    lines.append(f"Triton:          {info['triton_mode']}")
    lines += ["", "backends (available, or why not):"]
    for dev, table in info["backends"].items():
        for name, why in table.items():
            lines.append(f"  {dev:5s} {name:10s} {'available' if why is None else 'unavailable: ' + why}")
    for dev, table in info["ops"].items():
        lines += ["", f"ops on {dev} (backend: ok, or why not):"]
        for op, support in table.items():
            cells = [f"{b}: {'ok' if why is None else why}" for b, why in support.items()]
            lines.append(f"  {op:24s} " + "; ".join(cells))
    if info.get("cpp_aten_paths"):
        lines += ["", "where the cpp backend runs ATen (the fused kernel lost to it):"]
        lines += [f"  {where:28s} {what}" for where, what in info["cpp_aten_paths"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emsedit_fast.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
