"""``nds-client``: the client half of the method on the command line, ``score`` and ``query``.

``score`` downloads the server's experts (cached, sha256-checked), runs them on the target
images locally, prints a ranked table of experts and writes the scores as plain JSON
(:meth:`nds_client.scores.Scores.save`). ``query`` sends those scores (and label priors) to
the server and writes the training manifest it selects: csv, jsonl or parquet as the server
streams it (img2dataset: the url list of a url-based selection), ``--format webdataset``, a
folder of tar shards of the selected images read by the server (``--shard-size`` samples
each), or ``--format imagefolder``, a folder of links to (or copies of) the selected local
files, one subfolder per label (:mod:`nds_client.imagefolder`). The target images never
leave this machine.

The server's ``nds`` has the very same ``score`` and ``query``: ``api/cli.py`` adds these
functions to its app with::

    from nds_client.cli import register
    register(app)

Only the light client modules are imported here (the SDK, typer, rich), and the SDK only
when a command runs, so the command starts fast; this module never imports the server.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from nds_client.console import SafeTable as Table  # escapes every title, header and string cell: the server's names are untrusted
from nds_client.console import clean, err, handles_errors, out, safe
from nds_client.manifests import format_for_path

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Neural Data Server client: score a server's experts on your own images, locally, and fetch the training manifest it selects.")

STAGES = {"download": "downloading experts", "preprocess": "preprocessing images", "score": "scoring experts", "priors": "label priors"}


class _Bars:
    """A rich progress bar per stage, on stderr, fed by the SDK's ``progress(stage, done, total)``."""

    def __init__(self, quiet: bool) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err, disable=quiet, transient=False,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> _Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(STAGES.get(stage) or safe(stage), total=max(total, 1))
        self.progress.update(self.tasks[stage], completed=done, total=max(total, 1))


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.3f}"


@handles_errors
def score(
    target: Annotated[Path, typer.Argument(help="Target images: a folder (searched recursively) or one image file.")],
    server: Annotated[str, typer.Option(envvar="NDS_SERVER", help="URL of the NDS server.")] = "http://127.0.0.1:8000",
    labels: Annotated[Path | None, typer.Option(help="CSV with columns path,label (paths relative to the CSV, or absolute).")] = None,
    imagefolder: Annotated[bool, typer.Option("--imagefolder", help="Labels from the folder layout TARGET/<label>/<image>.")] = False,
    method: Annotated[str, typer.Option(help="auto (embedding where the server publishes the datasets' backbone, else rotation), rotation (no labels), linear-probe (needs labels) or embedding (no labels: nearest cluster centroids in the backbone space).")] = "auto",
    priors: Annotated[bool, typer.Option("--priors", help="Also estimate the target's label distribution per source dataset.")] = False,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the label priors.")] = 2.0,
    cache_dir: Annotated[Path | None, typer.Option(help="Where downloaded experts are kept (default ~/.cache/nds/experts).")] = None,
    token: Annotated[str | None, typer.Option(envvar="NDS_TOKEN", help="API token, sent as a Bearer token.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the scores (JSON).")] = Path("scores.json"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Score the server's experts on local target images; print a ranked table; write the scores as JSON."""
    from nds_client.client import NDSClient
    from nds_client.errors import ClientInputError, TargetError
    from nds_client.methods import method_named
    from nds_client.targets import read_labels_csv

    named = method_named(method)  # ClientInputError for an unknown name; None for auto
    if labels is not None and imagefolder:
        raise ClientInputError("--labels and --imagefolder are exclusive", field="labels", hint="pick one source of labels")
    if named is not None and named.needs_labels and labels is None and not imagefolder:
        raise TargetError(f"--method {method} needs labels", field="labels", hint="--labels CSV (path,label) or --imagefolder")
    if not target.exists():
        raise TargetError(f"target {target} does not exist", field="target")
    label_arg: Any = None
    if labels is not None:
        label_arg = read_labels_csv(labels)
    elif imagefolder:
        label_arg = "imagefolder"

    with NDSClient(server, token=token, cache_dir=cache_dir) as client, _Bars(quiet) as bars:
        result = client.score(target, labels=label_arg, method=method, batch_size=batch_size, progress=bars,
                              priors=priors, temperature=temperature)
    result.save(output)

    chosen = f"{result.method} (auto)" if method == "auto" else result.method
    table = Table(title=f"{len(result.experts)} experts ranked by {chosen} score on {result.num_images} images")
    for col, justify in (("rank", "right"), ("expert", "right"), ("dataset", "left"), ("cluster", "right"), ("score", "right"), ("held-out acc.", "right")):
        table.add_column(col, justify=justify)
    for rank, e in enumerate(result.ranked(), start=1):
        table.add_row(str(rank), str(e["id"]), str(e["dataset"]), "" if e["cluster"] is None else str(e["cluster"]),
                      _fmt(e["score"]), _fmt(e.get("heldout_accuracy")))
    out.print(table)
    if result.label_priors is not None:
        if not result.label_priors:
            out.print("label priors: no source dataset has a label classifier")
        names = {e["dataset_id"]: e["dataset"] for e in result.experts}
        for dataset_id, dist in result.label_priors.items():
            top = sorted(dist.items(), key=lambda kv: -kv[1])[:5]
            shown = ", ".join(f"{safe(lab)} {p:.2f}" for lab, p in top)
            out.print(f"label priors for {safe(names.get(dataset_id, dataset_id))} (T={temperature:g}): {shown}", highlight=False)
    if result.skipped:
        err.print(f"[yellow]skipped {result.skipped} unreadable image(s)[/], e.g. {safe(result.skipped_files[0]['image'])}: "
                  f"{safe(result.skipped_files[0]['reason'])}", highlight=False)
    out.print(f"{result.num_images} images, {result.skipped} skipped, provider {safe(result.provider)}; wrote {safe(output)}", highlight=False)


@handles_errors
def query(
    server: Annotated[str, typer.Option(help="URL of the server, e.g. http://127.0.0.1:8000.")],
    scores: Annotated[Path, typer.Option(help="Scores file written by 'nds-client score' or 'nds score' (plain JSON).")],
    budget: Annotated[int, typer.Option(help="Number of samples to select.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="manifest.csv|.jsonl|.parquet|.tar, or a folder with --format imagefolder or webdataset.")],
    priors: Annotated[Path | None, typer.Option(help="Label priors JSON: {dataset_id: {label: p}} (default: those in the scores file).")] = None,
    no_replacement: Annotated[bool, typer.Option("--no-replacement", help="Elastic matcher: no sample twice.")] = False,
    seed: Annotated[int, typer.Option(help="Seed: the same request and seed give the same manifest.")] = 0,
    temperature: Annotated[float | None, typer.Option(help="Softmax temperature over normalised scores (default 0.1).")] = None,
    datasets: Annotated[str | None, typer.Option(help="Comma-separated dataset ids to select from.")] = None,
    format: Annotated[str | None, typer.Option(help="csv, jsonl, parquet, webdataset (tar shards of the images), img2dataset (url list) or imagefolder (default: from the output's suffix).")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="webdataset: samples per tar shard (DIR/shard-00000.tar, ...).")] = 10_000,
    copy: Annotated[bool, typer.Option("--copy", help="imagefolder: copy the images instead of symlinking them.")] = False,
    data_root: Annotated[Path | None, typer.Option(help="imagefolder: where this machine sees the server's data root (a client key's manifest names files relative to it).")] = None,
    token: Annotated[str | None, typer.Option(envvar="NDS_TOKEN", help="API key.")] = None,
) -> None:
    """Turn expert scores (and label priors) into a sampled training manifest."""
    from nds_client.client import NDSClient
    from nds_client.errors import InvalidInputError
    from nds_client.scores import Scores

    fmt = format or format_for_path(output)
    if fmt is None:
        raise InvalidInputError(f"cannot tell the format of {output.name}", field="output", hint="use .csv, .jsonl, .parquet, .tar or --format")
    loaded = Scores.load(scores)
    label_priors = loaded.label_priors
    if priors is not None:
        try:
            label_priors = {int(k): v for k, v in json.loads(priors.read_text()).items()}
        except (OSError, ValueError, AttributeError) as exc:
            raise InvalidInputError(f"cannot read priors from {priors}: {exc}", field="priors", hint="a JSON object {dataset_id: {label: p}}") from exc
    dataset_ids = [int(x) for x in datasets.split(",")] if datasets else None
    with NDSClient(server, token=token) as client:
        result = client.query(
            scores=loaded.scores, label_priors=label_priors, budget=budget, replacement=not no_replacement,
            temperature=temperature, datasets=dataset_ids, seed=seed, target_size=loaded.num_images, score_method=loaded.method,
        )
        if fmt == "imagefolder":
            from nds_client.imagefolder import JsonlRows, build_tree

            with tempfile.TemporaryDirectory() as tmp:
                manifest = client.manifest(result["id"], Path(tmp) / "manifest.jsonl")
                made = build_tree(JsonlRows(manifest), output, copy=copy, data_root=data_root)
            written = f"{output} ({made} files)"
        elif fmt == "webdataset" and output.suffix.lower() != ".tar":  # a folder of shards; OUT.tar is one tar of every row
            shards = client.webdataset(result["id"], output, shard_size=shard_size, total=int(result["summary"]["unique_samples"]))
            written = f"{output} ({len(shards)} shard{'s' if len(shards) != 1 else ''} of at most {shard_size} samples)"
        else:
            client.manifest(result["id"], output, format=fmt)
            written = str(output)
    print_query_summary(result)
    out.print(f"manifest: {safe(written)}", highlight=False)


def print_query_summary(result: dict) -> None:
    """The server's answer to a query: what was selected from each dataset and cluster, its
    notes, and the fine-tuning recipe it recommends."""
    summary = result["summary"]
    table = Table(title=f"query {result['id']}: {summary['selected']} selected, {summary['unique_samples']} unique, "
                        f"effective sample size {summary['effective_sample_size']}")
    for col in ("dataset", "cluster", "selected", "unique", "weight mass"):
        table.add_column(col)
    for ds in summary["datasets"]:
        table.add_row(Text(clean(ds["dataset"]), style="bold"), "all", str(ds["selected"]), str(ds["unique"]), f"{ds['mass']:.4f}")
        for cl in ds["clusters"]:
            if cl["selected"] or cl["mass"] > 1e-4:
                table.add_row("", str(cl["cluster"]), str(cl["selected"]), str(cl["unique"]), f"{cl['mass']:.4f}")
    out.print(table)
    for note in summary.get("notes", []):
        out.print(f"note: {safe(note)}", highlight=False)
    rec = summary["recommendation"]
    out.print(f"recommended recipe: [bold]{safe(rec['recipe'])}[/]: {safe(rec['reason'])}", highlight=False)


#: the client's commands, by name: ``nds-client`` has them, and ``nds`` adds them (:func:`register`)
COMMANDS: dict[str, Callable[..., Any]] = {"score": score, "query": query}


def register(app: typer.Typer) -> None:
    """Add ``score`` and ``query`` to a typer app, the ``nds`` one among them (idempotent: a
    command already there is left as it is)."""
    for name, callback in COMMANDS.items():
        if not any(c.name == name or c.callback is callback for c in app.registered_commands):
            app.command(name)(callback)


register(app)


def main() -> None:
    """The ``nds-client`` console script."""
    app()
