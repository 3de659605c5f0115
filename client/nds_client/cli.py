"""``nds score``: the client half of the method, on the command line.

Downloads the server's experts (cached, sha256-checked), runs them on the target images
locally, prints a ranked table of experts and writes the scores as plain JSON
(:meth:`nds_client.client.Scores.save`), which ``nds query --scores`` reads. The images never
leave this machine.

``api/cli.py`` adds the command with::

    from nds_client.cli import register
    register(app)

Only the light client modules are imported here (the SDK, typer, rich), so the command
starts fast and this module never imports ``nds.api.cli`` (no import cycle).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nds_client.console import SafeTable as Table  # escapes every title, header and string cell: the server's names are untrusted
from nds_client.console import err, handles_errors, out, safe

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

    def __exit__(self, *exc: object) -> None:
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
    from nds_client.client import METHODS, ClientInputError, NDSClient, TargetError, read_labels_csv

    if method not in METHODS:
        raise ClientInputError(f"unknown method {method!r}", field="method", hint=f"one of: {', '.join(METHODS)}")
    if labels is not None and imagefolder:
        raise ClientInputError("--labels and --imagefolder are exclusive", field="labels", hint="pick one source of labels")
    if method == "linear-probe" and labels is None and not imagefolder:
        raise TargetError("--method linear-probe needs labels", field="labels", hint="--labels CSV (path,label) or --imagefolder")
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


def register(app: typer.Typer) -> None:
    """Add ``nds score`` to the ``nds`` app (idempotent: a second call changes nothing)."""
    for command in app.registered_commands:
        if command.name == "score" or command.callback is score:
            return
    app.command("score")(score)
