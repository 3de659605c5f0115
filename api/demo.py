"""The demo behind `make demo`: the main job end to end on the embedded default.

Run from an empty folder (the Makefile uses ./demo-output). It builds small source
datasets of five visual domains from images that ship inside installed packages and a
held-out target drawn from one of them (digits), then drives the `nds` CLI exactly as a
user would, printing each command first: register the sources, index them (embeddings,
clusters, rotation experts, label classifiers, ONNX), serve the API, score the target as
a client (only numbers leave the client), query, and write a manifest.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from nds.api.local_server import LocalServer

console = Console()
NDS = str(Path(sys.executable).with_name("nds"))
DOMAINS = ("digits", "textures", "photos", "glyphs", "faces")
TARGET_DOMAIN = "digits"


def nds(*args: str) -> None:
    console.print(f"\n[bold cyan]$ nds {shlex.join(args)}[/]", highlight=False)
    started = time.perf_counter()
    done = subprocess.run([NDS, *args])
    if done.returncode != 0:
        console.print(f"[bold red]demo failed at 'nds {shlex.join(args)}' (exit {done.returncode})[/]")
        raise SystemExit(done.returncode)
    console.print(f"[dim]({time.perf_counter() - started:.1f} s)[/]")


def main() -> int:
    from nds.samples.domains import build_pool, build_target

    here = Path.cwd()
    console.rule("Neural Data Server demo (embedded default: SQLite + Qdrant Edge + in-process jobs)")
    console.print(f"building {len(DOMAINS)} source domains from packaged images under {here / 'sources'} ...")
    pool = build_pool(here / "sources", per_domain=300, size=32, seed=0, domains=DOMAINS)
    target = build_target(here / "target", TARGET_DOMAIN, n=120, size=32, seed=1)
    console.print(f"held-out {TARGET_DOMAIN} target (never registered): {target.relative_to(here)}")

    nds("db", "upgrade")
    for name, folder in pool.items():
        nds("datasets", "add", name, str(folder.relative_to(here)), "--description", f"sample domain: {name}")
    nds("datasets", "list")
    for name in pool:
        nds("index", name, "--clusters", "3", "--epochs", "6", "--image-size", "32")
    nds("experts", "list")

    server = LocalServer(os.environ, here / "serve.log")
    console.print(f"\n[bold cyan]$ nds serve --port {server.port} &[/]", highlight=False)
    with server:
        url = server.url
        nds("score", str(target.relative_to(here)), "--server", url, "--imagefolder", "--priors", "--cache-dir", ".expert-cache", "-o", "scores.json")
        nds("query", "--server", url, "--scores", "scores.json", "--budget", "600", "--seed", "0", "-o", "manifest.csv")

    scores = json.loads(Path("scores.json").read_text())
    ranked = sorted(scores["experts"], key=lambda e: -e["score"])
    rows = list(csv.DictReader(open("manifest.csv")))
    share = sum(int(r["count"]) for r in rows if r["dataset"] == TARGET_DOMAIN) / max(sum(int(r["count"]) for r in rows), 1)
    console.rule("result")
    console.print(f"best expert: dataset [bold]{ranked[0]['dataset']}[/], cluster {ranked[0]['cluster']} (score {ranked[0]['score']:.3f})")
    console.print(f"share of the manifest drawn from the target's domain ({TARGET_DOMAIN}): [bold]{share:.2f}[/] "
                  f"(uniform sampling would give about {1 / len(DOMAINS):.2f})")
    console.print(f"manifest: {here / 'manifest.csv'} ({len(rows)} rows); scores: {here / 'scores.json'}")
    if ranked[0]["dataset"] != TARGET_DOMAIN:
        console.print(f"[bold red]the best expert is not a {TARGET_DOMAIN} expert[/]")
        return 1
    console.rule("[green]demo finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
