"""What installing the client costs, against installing the whole server.

    .venv/bin/python -m benchmarks.client_install [--skip-server] [--no-cache] [--out DIR]

Each install goes into a fresh venv under a temp folder, made by the interpreter .venv was
made from, from a copy of this repository's sources (so no build writes into the checkout):

- (a) the client alone: ``pip install './client[cpu]'`` (nds-client with onnxruntime);
- (b) the whole server: ``pip install ./client '.[samples]'`` (torch, torchvision,
  onnxruntime-gpu, FastAPI, Celery, SQLModel, Qdrant, ... ; torch from this machine's disk).

For each: the wall time of ``pip install``, the size of site-packages (``du -sk``), the
number of distributions installed, whether torch and onnxruntime-gpu are among them, and
the start-up time of the command-line tool (``nds-client --help``, ``nds --help``). pip's
wheel cache is used as a user's second install would (``--no-cache``: cold, everything
downloaded or read from the local mirrors again). The server's install is several GB:
it is measured once. Prints a table and writes ``results.md`` (default
``benchmarks/results/client_install``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 160)
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "client_install"
#: what the server's wheel is built from (benchmarks, tests and local state are left out)
SOURCES = ("catalog", "api", "workers", "plugins", "migrations", "samples", "client", "pyproject.toml", "README.md", "constraints.txt")
IGNORED = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".nds")


@dataclass
class Install:
    name: str
    command: str
    seconds: float
    site_packages_mib: float
    distributions: int
    torch: bool
    onnxruntime: str | None
    onnxruntime_gpu: str | None
    cli: str
    cli_seconds: float


def base_python() -> str:
    """The interpreter .venv was made from (python3 on PATH if that cannot be told)."""
    return getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def copy_sources(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=IGNORED)
        else:
            shutil.copy2(src, dest / name)
    return dest


def measure(name: str, work: Path, src: Path, requirements: list[str], cli: str, *, no_cache: bool) -> Install:
    venv = work / f"venv-{name}"
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, env=clean_env(), timeout=300)
    python = venv / "bin" / "python"
    # the tested pins, as make install uses them (pip cannot resolve the boto3/aiobotocore ranges alone)
    args = [str(python), "-m", "pip", "install", "--quiet", "-c", "constraints.txt", *(["--no-cache-dir"] if no_cache else []), *requirements]
    console.print(f"[bold]{name}[/]: pip install {escape(' '.join(requirements))}", highlight=False)
    start = time.perf_counter()
    done = subprocess.run(args, cwd=src, env=clean_env(), capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"pip install failed for {name}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    site = next((venv / "lib").glob("python3*/site-packages"))
    kib = int(subprocess.run(["du", "-sk", str(site)], check=True, capture_output=True, text=True).stdout.split()[0])
    listed = json.loads(subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], check=True, env=clean_env(),
                                       capture_output=True, text=True).stdout)
    versions = {d["name"].lower(): d["version"] for d in listed}
    start = time.perf_counter()
    subprocess.run([str(venv / "bin" / cli), "--help"], check=True, env=clean_env(), cwd=work, capture_output=True, timeout=300)
    cli_seconds = time.perf_counter() - start
    shutil.rmtree(venv)  # several GB for the server: gone before the next one
    return Install(
        name=name, command="pip install " + " ".join(requirements), seconds=seconds, site_packages_mib=kib / 1024,
        distributions=len(listed), torch="torch" in versions, onnxruntime=versions.get("onnxruntime"),
        onnxruntime_gpu=versions.get("onnxruntime-gpu"), cli=cli, cli_seconds=cli_seconds,
    )


def table(results: list[Install]) -> Table:
    out = Table(title="install cost, each in a fresh venv")
    out.add_column("")
    for r in results:
        out.add_column(r.name, justify="right")
    rows = [
        ("command", [r.command for r in results]),
        ("pip install, wall time", [f"{r.seconds:.1f} s" for r in results]),
        ("site-packages (du)", [f"{r.site_packages_mib:,.0f} MiB" for r in results]),
        ("distributions installed", [str(r.distributions) for r in results]),
        ("torch", ["yes" if r.torch else "no" for r in results]),
        ("onnxruntime / onnxruntime-gpu", [f"{r.onnxruntime or '-'} / {r.onnxruntime_gpu or '-'}" for r in results]),
        ("command-line start-up", [f"{r.cli} --help: {r.cli_seconds:.2f} s" for r in results]),
    ]
    for label, cells in rows:
        out.add_row(label, *(escape(c) for c in cells))  # "./client[cpu]" is no markup
    return out


def markdown(results: list[Install], *, no_cache: bool) -> str:
    lines = [
        "# Client install",
        "",
        f"Machine: {platform.machine()} with {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"pip wheel cache {'off (--no-cache)' if no_cache else 'on (warm where earlier installs filled it)'}",
        "",
        "Each install in a fresh venv (`python -m venv`), from a copy of the repository's sources; "
        "`.venv/bin/python -m benchmarks.client_install`.",
        "",
        "| | " + " | ".join(r.name for r in results) + " |",
        "|---|" + "---|" * len(results),
        "| command | " + " | ".join(f"`{r.command}`" for r in results) + " |",
        "| pip install, wall time | " + " | ".join(f"{r.seconds:.1f} s" for r in results) + " |",
        "| site-packages (du) | " + " | ".join(f"{r.site_packages_mib:,.0f} MiB" for r in results) + " |",
        "| distributions installed | " + " | ".join(str(r.distributions) for r in results) + " |",
        "| torch | " + " | ".join("yes" if r.torch else "no" for r in results) + " |",
        "| onnxruntime / onnxruntime-gpu | " + " | ".join(f"{r.onnxruntime or '-'} / {r.onnxruntime_gpu or '-'}" for r in results) + " |",
        "| command-line start-up | " + " | ".join(f"`{r.cli} --help` {r.cli_seconds:.2f} s" for r in results) + " |",
    ]
    if len(results) == 2:
        a, b = results
        lines += ["", f"- the client alone is {b.site_packages_mib / a.site_packages_mib:.0f}x smaller on disk and installs "
                      f"{b.seconds / a.seconds:.1f}x faster than the whole server"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-server", action="store_true", help="measure the client alone (the server's install is several GB)")
    parser.add_argument("--no-cache", action="store_true", help="pip --no-cache-dir: a cold install")
    parser.add_argument("--out", type=Path, default=OUT, help="where results.md goes")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nds-bench-install-") as tmp:
        work = Path(tmp)
        src = copy_sources(work / "src")
        results = [measure("client", work, src, ["./client[cpu]"], "nds-client", no_cache=args.no_cache)]
        if not args.skip_server:
            results.append(measure("server", work, src, ["./client", ".[samples]"], "nds", no_cache=args.no_cache))
    console.print(table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(markdown(results, no_cache=args.no_cache), encoding="utf-8")
    console.print(f"wrote {args.out / 'results.md'}", highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
