"""Register WebDataset shards of 10^5 and 10^6 small images, local and through an S3 API, against an image folder.

    .venv/bin/python -m benchmarks.shard_registration [--sizes 100000 1000000] [--per-shard 1000] [--no-s3] [--folder 100000]

Each variant is one `nds datasets add` as a user runs it (a new process, a fresh NDS_HOME):
its wall time, images per second and peak RSS: the VmHWM of the process's own memory, which
the child writes as it exits (not wait4's ru_maxrss: Linux carries the high-water mark of the
parent's memory, forked or vforked before the exec, into the child's, so a benchmark process
holding moto's objects reported them as the registration's). Registration streams: the peak
must stay flat from 10^5 to 10^6 samples. The S3 variant uploads the
shards to a moto server on loopback (``moto[server]``, an S3 API over HTTP: boto3 and s3fs
talk to it as to AWS) and registers ``s3://bench/shards/{00000..N}.tar``; each shard is read
with a few large sequential requests (the number of GETs the server saw is printed).
The baseline is the local image folder of the same images (one PNG file per sample).

Images: 32x32 PNGs, 64 base patterns, each made unique by 8 bytes after the PNG's end
(decoders ignore them; the sha256 differs), so writing 10^6 of them takes seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table


def base_pngs(n: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        x = np.zeros((32, 32, 3), np.uint8)
        x[:, :: 2 + i % 6] = rng.integers(0, 255, 3, dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def image(bases: list[bytes], i: int) -> bytes:
    return bases[i % len(bases)] + i.to_bytes(8, "little")


def write_shards(folder: Path, total: int, per_shard: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    bases = base_pngs()
    shards = -(-total // per_shard)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(total, (s + 1) * per_shard)):
                for name, data in ((f"{i:09d}.png", image(bases, i)), (f"{i:09d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return shards


def write_folder(folder: Path, total: int) -> None:
    bases = base_pngs()
    for i in range(total):
        sub = folder / f"class{i % 10}"
        if i < 10:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:09d}.png").write_bytes(image(bases, i))


# `nds ARGS...` as its console script runs it, writing the VmHWM of its own memory to a file at exit
_NDS_WITH_PEAK = """
import atexit, sys
def _peak(path=sys.argv[1]):
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    with open(path, "w") as out:
        out.write(str(kib))
atexit.register(_peak)
sys.argv = ["nds", *sys.argv[2:]]
from nds.api.cli import main
main()
"""


def run_add(env: dict[str, str], work: Path, tag: str, location: str, source: str) -> dict:
    home = work / f"home-{tag}"
    env = {**env, "NDS_HOME": str(home), "NDS_DATABASE_URL": "", "NDS_BROKER_URL": ""}
    nds = str(Path(sys.executable).with_name("nds"))
    subprocess.run([nds, "db", "upgrade"], env=env, check=True, capture_output=True)
    out_path, err_path, peak_path = work / f"{tag}.out", work / f"{tag}.err", work / f"{tag}.peak"
    start = time.perf_counter()
    with out_path.open("wb") as out, err_path.open("wb") as errs:
        proc = subprocess.Popen([sys.executable, "-c", _NDS_WITH_PEAK, str(peak_path), "datasets", "add", tag, location, "--source", source,
                                 "--json"], env=env, stdout=out, stderr=errs)
        _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: what this benchmark reported before (the parent's memory included)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{tag} failed: {err_path.read_text()[-2000:]}")
    result = json.loads(out_path.read_text())
    return {"seconds": seconds, "samples": result["num_samples"], "peak_mib": int(peak_path.read_text()) / 1024,
            "maxrss_mib": usage.ru_maxrss / 1024, "parent_mib": _own_rss_kib() / 1024}


def _own_rss_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--folder", type=int, default=100_000, help="images in the image-folder baseline (0: none)")
    parser.add_argument("--no-s3", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "NDS_DATA_ROOTS": f"{work},s3://bench"}
        if args.folder:
            write_folder(work / "folder", args.folder)
            r = run_add(env, work, "folder", str(work / "folder"), "imagefolder")
            rows.append(("image folder (local)", r))
        server = None
        if not args.no_s3:
            from moto.server import ThreadedMotoServer

            port = free_port()
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            s3env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                     "AWS_DEFAULT_REGION": "us-east-1"}
            os.environ.update(s3env)
            env.update(s3env)
            import boto3

            client = boto3.client("s3", endpoint_url=s3env["AWS_ENDPOINT_URL"])
            client.create_bucket(Bucket="bench")
        try:
            for total in args.sizes:
                folder = work / f"shards-{total}"
                shards = write_shards(folder, total, args.per_shard)
                pattern = f"{{00000..{shards - 1:05d}}}.tar"
                r = run_add(env, work, f"local{total}", str(folder / pattern), "webdataset")
                rows.append((f"{shards:,} shards (local)", r))
                if server is not None:
                    prefix = f"shards-{total}"
                    for p in sorted(folder.glob("*.tar")):
                        client.upload_file(str(p), "bench", f"{prefix}/{p.name}")
                    r = run_add(env, work, f"s3{total}", f"s3://bench/{prefix}/{pattern}", "webdataset")
                    rows.append((f"{shards:,} shards (S3 API, moto)", r))
                    for p in sorted(folder.glob("*.tar")):
                        client.delete_object(Bucket="bench", Key=f"{prefix}/{p.name}")
                for p in folder.glob("*.tar"):
                    p.unlink()
        finally:
            if server is not None:
                server.stop()
    table = Table(title=f"registration on {platform.machine()} with {os.cpu_count()} cores (32x32 PNGs, {args.per_shard} per shard)")
    for col in ("source", "samples", "seconds", "images/s", "peak RSS, own (MiB)", "wait4 ru_maxrss (MiB)", "benchmark's RSS (MiB)"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for name, r in rows:
        table.add_row(name, f"{r['samples']:,}", f"{r['seconds']:.1f}", f"{r['samples'] / r['seconds']:,.0f}", f"{r['peak_mib']:.0f}",
                      f"{r['maxrss_mib']:.0f}", f"{r['parent_mib']:.0f}")
    Console(width=160).print(table)
    Console(width=160).print("peak RSS, own: the registering process's VmHWM. wait4's ru_maxrss (the figure reported before) also "
                             "counts the benchmark process's memory at the fork (moto's stored objects among it): see its last column.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
