"""The demo behind `make demo`: the main job end to end on the embedded default.

Run from an empty folder (the Makefile uses ./demo-output): it builds small source
datasets of several visual domains from images that ship inside installed packages,
then drives the `nds` CLI exactly as a user would, printing each command first.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console()
NDS = str(Path(sys.executable).with_name("nds"))
DOMAINS = ("digits", "textures", "photos", "glyphs", "faces")


def nds(*args: str) -> None:
    console.print(f"\n[bold cyan]$ nds {shlex.join(args)}[/]", highlight=False)
    started = time.perf_counter()
    done = subprocess.run([NDS, *args])
    if done.returncode != 0:
        console.print(f"[bold red]demo failed at 'nds {shlex.join(args)}' (exit {done.returncode})[/]")
        raise SystemExit(done.returncode)
    console.print(f"[dim]({time.perf_counter() - started:.1f} s)[/]")


def main() -> int:
    from catalog.sample_domains import build_pool, build_target

    here = Path.cwd()
    console.rule("Neural Data Server demo (embedded default: SQLite + Qdrant Edge + in-process jobs)")
    console.print(f"building {len(DOMAINS)} source domains from packaged images under {here / 'sources'} ...")
    pool = build_pool(here / "sources", per_domain=300, size=32, seed=0, domains=DOMAINS)
    target = build_target(here / "target", "digits", n=120, size=32, seed=1)
    console.print(f"held-out target (never registered): {target}")
    nds("db", "upgrade")
    for name, folder in pool.items():
        nds("datasets", "add", name, str(folder.relative_to(here)), "--description", f"sample domain: {name}")
    nds("datasets", "list")
    console.rule("[green]demo finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
