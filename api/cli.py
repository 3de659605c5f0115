"""The ``nds`` command-line tool.

Catalog commands (``db``, ``datasets``, ``jobs``, ``plugins``) work on the catalog the
settings point at, directly, like ``alembic`` or ``fiftyone`` do: in the embedded default
they run jobs in this process with a progress bar; in server mode they queue them on
the Celery workers and follow their progress. ``serve`` runs the REST API and ``worker``
a Celery worker. ``score`` and ``query`` are the client's commands (:mod:`nds_client.cli`,
also the ``nds-client`` tool), added to this app as they are.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from nds.catalog.index_options import INDEX_LIMITS, IndexRequest  # light: the index command's defaults and limits
from nds.catalog.settings import Settings, load_settings
from nds_client.console import SafeTable as Table  # escapes every title, header and string cell: names and labels are untrusted
from nds_client.console import err, error_handler, fail, out, safe
from nds_client.errors import InvalidInputError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False, help="Neural Data Server: find the source data worth pre-training on.")
db_app = typer.Typer(no_args_is_help=True, help="Create, upgrade and inspect the catalog schema.")
datasets_app = typer.Typer(no_args_is_help=True, help="Register, list, show and remove source datasets.")
jobs_app = typer.Typer(no_args_is_help=True, help="Inspect jobs.")
plugins_app = typer.Typer(no_args_is_help=True, help="Installed plugins.")
experts_app = typer.Typer(no_args_is_help=True, help="The experts clients download.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys: create (shown once), list, revoke.")
artifacts_app = typer.Typer(no_args_is_help=True, help="The artifact store: remove the files no catalog row refers to.")
app.add_typer(db_app, name="db")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.add_typer(plugins_app, name="plugins")
app.add_typer(experts_app, name="experts")
app.add_typer(keys_app, name="keys")
app.add_typer(artifacts_app, name="artifacts")


def _settings_error(exc: Exception) -> tuple[str, str] | None:
    """An invalid ``NDS_*`` setting (pydantic's ValidationError of :class:`nds.catalog.settings.Settings`)
    as (message, hint) naming the variables; never their values, which may be secrets."""
    if "pydantic" not in sys.modules:
        return None
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError) or exc.title != "Settings":
        return None
    problems = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        variable = "NDS_" + str(error["loc"][0]).upper() if error.get("loc") else "an NDS_* setting"
        msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(msg if msg.startswith(variable) else f"{variable}: {msg}")
    return "invalid setting: " + "; ".join(problems), "fix or unset it in the environment (or the .env file)"


def _database_unavailable(exc: Exception) -> tuple[str, str | None] | None:
    """The catalog database's connection errors, as :func:`nds.catalog.db.unavailable_database`
    translates them (looked up only once a command has loaded it: every command that opens the
    catalog has, and the others start without sqlalchemy)."""
    if "nds.catalog.db" not in sys.modules:
        return None
    from nds.catalog.db import unavailable_database

    unavailable = unavailable_database(exc)
    return None if unavailable is None else (unavailable.message, unavailable.hint)


#: the catalog commands: the project's errors, invalid NDS_* settings and an unreachable database
handles_errors = error_handler(_settings_error, _database_unavailable)


def settings() -> Settings:
    return load_settings()


@contextmanager
def open_ctx(check: bool = True) -> Iterator[Any]:
    from nds.catalog.context import CatalogContext

    ctx = CatalogContext.open(settings(), check=check)
    try:
        yield ctx
    finally:
        ctx.close()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------- db


@db_app.command("upgrade")
@handles_errors
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Create or upgrade the catalog schema (the only way tables are made)."""
    from nds.catalog.db import upgrade

    s = settings()
    rev = upgrade(s, revision)
    out.print(f"catalog at revision [bold]{safe(rev)}[/] ({safe(_safe_url(s.sqlalchemy_url))})")


@db_app.command("downgrade")
@handles_errors
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. 'base' or '-1'.")]) -> None:
    """Downgrade the catalog schema (drops data of the tables removed)."""
    from nds.catalog.db import downgrade

    rev = downgrade(settings(), revision)
    out.print(f"catalog at revision [bold]{safe(rev or 'base')}[/]")


@db_app.command("current")
@handles_errors
def db_current() -> None:
    """Print the schema revision of the catalog and the one this code expects."""
    from nds.catalog.db import create_db_engine, current_revision, head_revision

    engine = create_db_engine(settings())
    try:
        out.print(f"current: {safe(current_revision(engine) or 'none')}  head: {safe(head_revision())}", highlight=False)
    finally:
        engine.dispose()


@db_app.command("copy-to")
@handles_errors
def db_copy_to(
    database_url: Annotated[str, typer.Option(help="SQLAlchemy URL of the target catalog, e.g. postgresql+psycopg://nds:PW@host/nds (an empty database).")],
    artifacts_dir: Annotated[Path, typer.Option(help="Target artifact directory (the one every server-mode process shares).")],
    qdrant_url: Annotated[str | None, typer.Option(help="Target Qdrant server; without it the vectors go to Qdrant Edge under --home.")] = None,
    qdrant_api_key: Annotated[str | None, typer.Option(envvar="NDS_TARGET_QDRANT_API_KEY", help="API key of the target Qdrant.")] = None,
    home: Annotated[Path | None, typer.Option(help="Target NDS_HOME (needed without --qdrant-url).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Copy this catalog (rows, vectors, artifacts) into an empty server-mode deployment.

    The source is the catalog the NDS_* settings point at (usually the embedded default
    under NDS_HOME); stop the processes that write to it first."""
    from nds.catalog.context import CatalogContext
    from nds.catalog.db import upgrade
    from nds.catalog.transfer import copy_catalog

    if qdrant_url is None and home is None:
        raise fail("give --qdrant-url (server mode) or --home (Qdrant Edge under that folder) for the vectors")
    src_settings = settings()
    target = load_settings(
        database_url=database_url, qdrant_url=qdrant_url, qdrant_api_key=qdrant_api_key, artifacts_dir=artifacts_dir,
        home=home or src_settings.home, broker_url=None, data_roots=src_settings.data_roots,
        qdrant_shards=src_settings.qdrant_shards, qdrant_replication_factor=src_settings.qdrant_replication_factor,
    )
    if target.sqlalchemy_url == src_settings.sqlalchemy_url:
        raise fail("the target database is the source database", "point --database-url at the new, empty catalog")
    revision = upgrade(target)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), console=err, disable=as_json, transient=True)
    with CatalogContext.open(src_settings) as source, CatalogContext.open(target) as dest, progress:
        task = progress.add_task("copying", total=1)
        report = copy_catalog(source, dest, progress=lambda stage, done, total: progress.update(task, description=safe(stage), completed=done, total=max(total, 1)))
    data = {"target": _safe_url(target.sqlalchemy_url), "revision": revision, "rows": report.rows, "points": report.points,
            "files": report.files, "bytes": report.bytes, "files_kept": report.files_kept}
    if as_json:
        print_json(data)
        return
    table = Table(title=f"copied into {data['target']} (revision {revision})")
    for col in ("what", "count"):
        table.add_column(col)
    for name, n in report.rows.items():
        table.add_row(f"rows: {name}", f"{n:,}")
    for name, n in report.points.items():
        table.add_row(f"vectors: {name}", f"{n:,}")
    table.add_row("artifact files", f"{report.files:,} ({report.bytes / 2**20:.1f} MiB); {report.files_kept} already there")
    out.print(table)
    out.print("next: point NDS_DATABASE_URL, NDS_QDRANT_URL and NDS_ARTIFACTS_DIR of the server-mode processes at the target", highlight=False)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# --------------------------------------------------------------------------- datasets


@datasets_app.command("add")
@handles_errors
def datasets_add(
    name: Annotated[str, typer.Argument(help="A unique name for the dataset.")],
    path: Annotated[str, typer.Argument(help="An image folder, a manifest, shards ('shards/{000..099}.tar', a glob), Parquet files, "
                                                 "a COCO JSON; local or s3://.")],
    source: Annotated[str, typer.Option(help="Source plugin: imagefolder, manifest, webdataset, parquet, coco, or another installed one.")] = "imagefolder",
    label_field: Annotated[str | None, typer.Option("--label-field", help="webdataset: the JSON field that holds the label; "
                                                                          "parquet: the label column.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-O", help="A source option KEY=VALUE (repeatable), e.g. -O images=/data/coco/train2017.")] = None,
    license: Annotated[str | None, typer.Option(help="License of the data.")] = None,
    description: Annotated[str | None, typer.Option(help="What the dataset holds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Register a source dataset: scan it, store one row per image, print a summary."""
    from nds.catalog.registration import RegistrationRequest, start_registration

    options = parse_options(option or [])
    if label_field is not None:
        options["label_field"] = label_field
    with open_ctx() as ctx:
        dataset, job = start_registration(
            ctx, RegistrationRequest(name=name, path=path, source=source, description=description, license=license, options=options)
        )
        finished = run_with_progress(ctx, job, f"registering {name}", quiet=as_json)
        if finished.status.value != "succeeded":
            raise fail(f"registering {name!r} failed: {finished.error}", "nothing was stored; fix the source and run it again")
        result = finished.result or {}
        if as_json:
            print_json({**result, "job_id": job.id})
            return
        table = Table(title=f"registered {name}", show_header=False)
        table.add_row("samples", str(result.get("num_samples")))
        table.add_row("labels", str(result.get("num_labels")))
        table.add_row("skipped", str(result.get("skipped")))
        for reason, count in (result.get("skipped_reasons") or {}).items():
            table.add_row(f"  {reason}", str(count))
        out.print(table)
        print_skips(result)


@datasets_app.command("sync")
@handles_errors
def datasets_sync(
    name: Annotated[str, typer.Argument(help="Dataset name, or id (an all-digit argument is an id).")],
    wait: Annotated[bool, typer.Option("--wait", help="Server mode: follow the job until it ends (the embedded default always does).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Register the files or shards added to the dataset's source since, remove the samples of those
    removed, and place the new samples in the nearest clusters of its index (no expert is retrained)."""
    from sqlmodel import Session

    from nds.catalog.datasets import find_dataset
    from nds.catalog.sync import start_sync

    with open_ctx() as ctx:
        with Session(ctx.engine) as session:
            dataset_id = find_dataset(session=session, ref=name).id
        job = start_sync(ctx, dataset_id)
        if ctx.settings.broker_url and not wait:
            queue_on_workers(ctx, job)
            out.print(f"queued sync job {job.id}; follow it with 'nds jobs show {job.id}'")
            return
        finished = run_with_progress(ctx, job, f"syncing {name}", quiet=as_json)
        if finished.status.value != "succeeded":
            raise fail(f"syncing {name!r} failed: {finished.error}", "nothing changed: the dataset is as it was before the sync")
        result = finished.result or {}
        if as_json:
            print_json({**result, "job_id": job.id})
            return
        print_sync_summary(name, result)


def print_sync_summary(name: str, result: dict) -> None:
    """A sync's job result as a table, the re-index advice and what it skipped."""
    parts = result.get("parts") or {}
    version = result.get("index_version") or 0
    previous = result.get("previous_index_version")
    table = Table(title=f"synced {name}" + ("" if result.get("changed") else ": nothing changed"), show_header=False)
    table.add_row("added", str(result.get("added", 0)))
    table.add_row("removed", str(result.get("removed", 0)))
    table.add_row("samples now", str(result.get("num_samples")))
    table.add_row("skipped", str(result.get("skipped", 0)))
    for reason, count in (result.get("skipped_reasons") or {}).items():
        table.add_row(f"  {reason}", str(count))
    table.add_row("skipped parts", str(len(result.get("skipped_parts") or [])))
    table.add_row("parts", f"{parts.get('now', 0)} now: {parts.get('new', 0)} new, {parts.get('vanished', 0)} vanished, "
                           f"{parts.get('unchanged', 0)} unchanged")
    if version:
        table.add_row("index version", f"{version}" + (f" (was {previous})" if previous else ""))
        table.add_row("placed in clusters", str(result.get("placed", 0)))
        if result.get("undecodable"):
            table.add_row("undecodable", str(result["undecodable"]))
    else:
        table.add_row("index", "not indexed")
    distance = result.get("distance") or {}
    for which, label in (("new", "distance to centroid, new"), ("indexed", "distance to centroid, indexed")):
        stats = distance.get(which)
        if stats:
            table.add_row(label, f"mean {stats['mean']:.4f}, p90 {stats['p90']:.4f} ({stats['n']} samples)")
    out.print(table)
    advice = result.get("reindex") or {}
    if advice.get("reason"):
        out.print(("[yellow]" if advice.get("advised") else "") + safe(advice["reason"]) + ("[/yellow]" if advice.get("advised") else ""),
                  highlight=False)
    for part in (result.get("vanished_parts") or [])[:10]:
        out.print(f"  removed part {safe(part)}", highlight=False)
    print_skips(result)


def parse_options(pairs: list[str]) -> dict[str, str]:
    """``-O key=value`` pairs as a dict; a pair without '=' is an error naming it."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(f"--option {pair!r} is not KEY=VALUE", field="options", hint="e.g. -O images=/data/coco/train2017")
        options[key.strip()] = value
    return options


def print_skips(result: dict) -> None:
    """The unreadable parts (shards) and files a registration or sync skipped, the first ten of each."""
    for part in result.get("skipped_parts") or []:
        out.print(f"  [red]skipped part[/red] {safe(part['part'])}: {safe(part['reason'])}", highlight=False)
    for skip in (result.get("skipped_files") or [])[:10]:
        out.print(f"  skipped {safe(skip['uri'])}: {safe(skip['reason'])}", highlight=False)


def run_with_progress(ctx: Any, job: Any, label: str, *, quiet: bool = False) -> Any:
    """Run a job (inline in the embedded default, on a worker in server mode) with a progress bar."""
    import nds.catalog.job_kinds  # noqa: F401 - every job kind registered, for the inline runner
    from nds.catalog.db import session_scope
    from nds.catalog.jobs import InlineDispatcher, get_job

    progress = Progress(
        TextColumn("[bold]{task.description}"), TextColumn("{task.fields[step]}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
        console=err, disable=quiet, transient=False,
    )
    with progress:
        task = progress.add_task(safe(label), total=1.0, step="")
        listener = lambda step, frac: progress.update(task, completed=frac, step=safe(step or ""))  # noqa: E731
        if ctx.settings.broker_url:
            queue_on_workers(ctx, job)
            while True:
                with session_scope(ctx.engine) as session:
                    current = get_job(session, job.id)
                listener(current.step, current.progress)
                if current.status.value in ("succeeded", "failed"):
                    break
                time.sleep(0.5)
        else:
            InlineDispatcher(ctx, listener=listener).submit(job)
        with session_scope(ctx.engine) as session:
            finished = get_job(session, job.id)
        if finished.status.value == "succeeded":
            listener("done", 1.0)
    return finished


def queue_on_workers(ctx: Any, job: Any) -> None:
    """Server mode: send the job to the workers; when it cannot be queued (broker down) the
    job fails, what starting it did is undone, and the error is raised."""
    from nds.api.dispatch import CeleryDispatcher
    from nds.catalog.jobs import submit_or_undo

    dispatcher = CeleryDispatcher(ctx.settings.broker_url)
    try:
        submit_or_undo(ctx, dispatcher, job)
    finally:
        dispatcher.close()


def _dataset_json(dataset: Any) -> dict:
    from nds.catalog.tables import DatasetPublic

    return DatasetPublic.model_validate(dataset).model_dump(mode="json")


@datasets_app.command("list")
@handles_errors
def datasets_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON (the REST API's field names).")] = False) -> None:
    """List registered datasets."""
    from sqlmodel import Session

    from nds.catalog.datasets import list_datasets

    with open_ctx() as ctx, Session(ctx.engine) as session:
        rows, count = list_datasets(session=session, offset=0, limit=2**31)
        if as_json:
            print_json({"data": [_dataset_json(d) for d in rows], "count": count})
            return
        table = Table(title=f"{count} datasets")
        for col in ("id", "name", "source", "status", "samples", "labels", "created"):
            table.add_column(col)
        for d in rows:
            table.add_row(str(d.id), d.name, d.source, d.status.value, str(d.num_samples), str(d.num_labels), d.created_at.isoformat())
        out.print(table)


@datasets_app.command("show")
@handles_errors
def datasets_show(
    name: Annotated[str, typer.Argument(help="Dataset name, or id (an all-digit argument is an id).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one dataset."""
    from sqlmodel import Session

    from nds.catalog.datasets import find_dataset

    with open_ctx() as ctx, Session(ctx.engine) as session:
        data = _dataset_json(find_dataset(session=session, ref=name))
        if as_json:
            print_json(data)
            return
        table = Table(title=data["name"], show_header=False)
        for key, value in data.items():
            table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
        out.print(table)


@datasets_app.command("rm")
@handles_errors
def datasets_rm(name: Annotated[str, typer.Argument(help="Dataset name, or id (an all-digit argument is an id).")]) -> None:
    """Remove a dataset's catalog rows and vectors (its files on disk are left alone)."""
    from sqlmodel import Session

    from nds.catalog.datasets import delete_dataset, find_dataset

    with open_ctx() as ctx:
        with Session(ctx.engine) as session:
            dataset_id = find_dataset(session=session, ref=name).id
        delete_dataset(ctx=ctx, dataset_id=dataset_id)
        out.print(f"removed dataset {safe(name)}", highlight=False)


@datasets_app.command("restrict")
@handles_errors
def datasets_restrict(
    name: Annotated[str, typer.Argument(help="Dataset name, or id (an all-digit argument is an id).")],
    key: Annotated[list[str], typer.Option("--key", help="A key (name or id) that may see the dataset; repeat for several.")] = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Restrict a dataset to the named keys (admins always see it); other keys neither see it nor get its samples."""
    _set_access(name, restricted=True, keys=key, as_json=as_json)


@datasets_app.command("unrestrict")
@handles_errors
def datasets_unrestrict(
    name: Annotated[str, typer.Argument(help="Dataset name, or id (an all-digit argument is an id).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Open a restricted dataset to every key again."""
    _set_access(name, restricted=False, keys=[], as_json=as_json)


def _set_access(name: str, *, restricted: bool, keys: list[str], as_json: bool) -> None:
    from nds.catalog.access import set_access
    from nds.catalog.datasets import find_dataset
    from nds.catalog.db import session_scope

    with open_ctx() as ctx, session_scope(ctx.engine) as session:
        dataset, granted = set_access(session=session, dataset_id=find_dataset(session=session, ref=name).id, restricted=restricted, keys=keys)
        data = {"dataset": dataset.name, "dataset_id": dataset.id, "restricted": dataset.restricted, "keys": [k.name for k in granted]}
    if as_json:
        print_json(data)
    elif restricted:
        out.print(f"{safe(data['dataset'])} is restricted to: {safe(', '.join(data['keys']) or 'admins only')}", highlight=False)
    else:
        out.print(f"{safe(data['dataset'])} is visible to every key", highlight=False)


# --------------------------------------------------------------------------- keys


@keys_app.command("create")
@handles_errors
def keys_create(
    name: Annotated[str, typer.Option(help="A unique name: who or what uses the key.")],
    role: Annotated[str, typer.Option(help="admin (register, index, delete, manage keys) or client (read, download experts, query).")] = "client",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (the key included).")] = False,
) -> None:
    """Create an API key and print it once: only its hash is stored."""
    from nds.catalog.access import create_key
    from nds.catalog.db import session_scope
    from nds.catalog.tables import ApiKeyCreated, ApiKeyPublic

    with open_ctx() as ctx, session_scope(ctx.engine) as session:
        key, secret = create_key(session=session, name=name, role=role)
        created = ApiKeyCreated(**ApiKeyPublic.model_validate(key).model_dump(), key=secret)
    if as_json:
        print_json(created.model_dump(mode="json"))
        return
    out.print(f"created {created.role.value} key {safe(repr(created.name))} (id {created.id}); it is shown this once:", highlight=False)
    sys.stdout.write(secret + "\n")
    sys.stdout.flush()


@keys_app.command("list")
@handles_errors
def keys_list(
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List API keys (names, roles, prefixes; never the keys)."""
    from sqlmodel import Session

    from nds.catalog.access import list_keys
    from nds.catalog.tables import ApiKeyPublic

    with open_ctx() as ctx, Session(ctx.engine) as session:
        keys = [ApiKeyPublic.model_validate(k).model_dump(mode="json") for k in list_keys(session=session, include_revoked=include_revoked)]
    if as_json:
        print_json({"data": keys, "count": len(keys)})
        return
    table = Table(title=f"{len(keys)} API keys")
    for col in ("id", "name", "role", "prefix", "created", "revoked"):
        table.add_column(col)
    for k in keys:
        table.add_row(str(k["id"]), k["name"], k["role"], k["prefix"] + "...", k["created_at"], k["revoked_at"] or "")
    out.print(table)


@keys_app.command("revoke")
@handles_errors
def keys_revoke(name: Annotated[str, typer.Argument(help="Key name, or id (an all-digit argument is an id).")]) -> None:
    """Revoke a key: it stops working at once and loses its dataset grants."""
    from nds.catalog.access import active_admin_keys, revoke_key
    from nds.catalog.db import session_scope

    with open_ctx() as ctx, session_scope(ctx.engine) as session:
        key = revoke_key(session=session, ref=name)
        out.print(f"revoked key {safe(repr(key.name))} ({safe(key.prefix)}...)", highlight=False)
        if active_admin_keys(session=session) == 0:
            err.print("note: no admin key is left; the API stays closed (it never reopens once a key has existed) and "
                      "accepts client keys only; 'nds keys create --role admin --name NAME' here, or NDS_ADMIN_KEY, gives admin access back",
                      highlight=False)


# --------------------------------------------------------------------------- index


@app.command("index")
@handles_errors
def index(
    name: Annotated[str, typer.Argument(help="Dataset name, or id (an all-digit argument is an id).")],
    clusters: Annotated[int, typer.Option(help=INDEX_LIMITS["clusters"].cli_help)] = IndexRequest.clusters,
    partition: Annotated[str, typer.Option(help="kmeans (on embeddings) or labels (one cluster per label).")] = IndexRequest.partition,
    backbone: Annotated[str, typer.Option(help="default, torchvision:<arch> or onnx:<file>.")] = IndexRequest.backbone,
    weights: Annotated[str | None, typer.Option(help="Local weights file for a torchvision backbone.")] = IndexRequest.weights,
    image_size: Annotated[int, typer.Option(help=INDEX_LIMITS["image_size"].cli_help)] = IndexRequest.image_size,
    epochs: Annotated[int, typer.Option(help=INDEX_LIMITS["epochs"].cli_help)] = IndexRequest.epochs,
    width: Annotated[int, typer.Option(help=INDEX_LIMITS["width"].cli_help)] = IndexRequest.width,
    seed: Annotated[int, typer.Option(help=INDEX_LIMITS["seed"].cli_help)] = IndexRequest.seed,
    min_steps: Annotated[int, typer.Option(help=INDEX_LIMITS["min_steps"].cli_help)] = IndexRequest.min_steps,
    wait: Annotated[bool, typer.Option("--wait", help="Server mode: follow the job until it ends (the embedded default always does).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job result as JSON.")] = False,
) -> None:
    """Embed, cluster, train rotation experts and a label classifier, export them to ONNX."""
    from sqlmodel import Session

    from nds.catalog.datasets import find_dataset
    from nds.catalog.indexing import start_indexing

    request = IndexRequest(clusters=clusters, partition=partition, backbone=backbone, weights=weights,
                           image_size=image_size, epochs=epochs, width=width, seed=seed, min_steps=min_steps)
    with open_ctx() as ctx:
        with Session(ctx.engine) as session:
            dataset_id = find_dataset(session=session, ref=name).id
        job = start_indexing(ctx, dataset_id, request)
        if ctx.settings.broker_url and not wait:
            queue_on_workers(ctx, job)
            out.print(f"queued index job {job.id}; follow it with 'nds jobs show {job.id}'")
            return
        finished = run_with_progress(ctx, job, f"indexing {name}", quiet=as_json)
        if finished.status.value != "succeeded":
            raise fail(f"indexing {name!r} failed: {finished.error}", "the previous index (if any) is still the active one")
        result = finished.result or {}
        if as_json:
            print_json({**result, "job_id": job.id})
            return
        table = Table(title=f"{name}: index version {result['index_version']}, backbone {result['backbone']['version']}")
        for col in ("cluster", "label", "size", "expert held-out rotation acc."):
            table.add_column(col)
        for c in result["clusters"]:
            table.add_row(str(c["cluster"]), str(c["label"] or ""), str(c["size"]), f"{c['heldout_accuracy']:.3f}")
        out.print(table)
        if result.get("classifier"):
            cls = result["classifier"]
            out.print(f"label classifier: {len(cls['labels'])} labels, held-out accuracy {cls['heldout_accuracy']:.3f}")
        out.print("seconds per step: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()), highlight=False)


@experts_app.command("list")
@handles_errors
def experts_list(
    dataset: Annotated[str | None, typer.Option(help="Only this dataset's experts (name or id).")] = None,
    kind: Annotated[str | None, typer.Option(help="rotation or classifier.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (the REST API's field names).")] = False,
) -> None:
    """List the experts of every dataset's active index."""
    from sqlmodel import Session

    from nds.catalog.datasets import find_dataset, list_datasets
    from nds.catalog.experts import list_experts
    from nds.catalog.tables import ExpertKind, ExpertPublic

    try:
        kind_value = ExpertKind(kind) if kind else None
    except ValueError:
        raise InvalidInputError(f"unknown kind {kind!r}", field="kind", hint="rotation or classifier") from None
    with open_ctx() as ctx, Session(ctx.engine) as session:
        dataset_id = find_dataset(session=session, ref=dataset).id if dataset else None
        rows, count = list_experts(session=session, dataset_id=dataset_id, kind=kind_value, limit=2**31)
        names = {d.id: d.name for d in list_datasets(session=session, limit=2**31)[0]}
        if as_json:
            print_json({"data": [ExpertPublic.model_validate(e).model_dump(mode="json") for e in rows], "count": count})
            return
        table = Table(title=f"{count} experts")
        for col in ("id", "kind", "dataset", "cluster", "input", "held-out acc.", "KB", "sha256"):
            table.add_column(col)
        for e in rows:
            table.add_row(str(e.id), e.kind.value, names.get(e.dataset_id, str(e.dataset_id)), "" if e.cluster is None else str(e.cluster),
                          str(e.input_size), f"{e.metrics.get('heldout_accuracy', 0):.3f}", f"{e.byte_size / 1024:.0f}", e.sha256[:12])
        out.print(table)


# --------------------------------------------------------------------------- jobs


@jobs_app.command("show")
@handles_errors
def jobs_show(
    job_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON (what GET /v1/jobs/ID returns).")] = False,
) -> None:
    """Show a job: status, step, progress and error, and, for a job that runs as tasks over the workers, each task's state, worker and seconds."""
    from sqlmodel import Session

    from nds.catalog.jobs import get_job
    from nds.catalog.task_graph import job_view

    with open_ctx() as ctx, Session(ctx.engine) as session:
        view = job_view(session, get_job(session, job_id))
    if as_json:
        print_json(view.model_dump(mode="json"))
        return
    out.print(f"job {view.id} ({view.kind}, dataset {view.dataset_id}): {view.status.value}, {view.progress:.0%}"
              + (f", step {view.step}" if view.step else "") + (f"\n  error: {view.error}" if view.error else ""), highlight=False)
    if view.tasks:
        table = Table(title=f"{len(view.tasks)} tasks")
        for column in ("task", "state", "worker", "tries", "seconds", "progress", "error"):
            table.add_column(column, justify="right" if column in ("tries", "seconds", "progress") else "left")
        for t in view.tasks:
            table.add_row(t.name, t.state.value, t.worker or "", str(t.attempts), "" if t.seconds is None else f"{t.seconds:.1f}",
                          f"{t.progress:.0%}", t.error or "")
        out.print(table)


@jobs_app.command("cancel")
@handles_errors
def jobs_cancel(job_id: str) -> None:
    """Cancel a queued or running job: what has not run is revoked and the dataset is left as it was before it."""
    from nds.catalog.jobs import cancel_job

    with open_ctx() as ctx:
        job = cancel_job(ctx, job_id, by="the command line")
    out.print(f"job {job.id} ({job.kind}) {job.status.value}", highlight=False)


# --------------------------------------------------------------------------- artifacts


@artifacts_app.command("gc")
@handles_errors
def artifacts_gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be removed.")] = False,
    grace: Annotated[float | None, typer.Option("--grace", min=0, help="Keep unreferenced files younger than this many seconds (default 3600): a writer may not have committed its row yet.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Remove the expert, backbone and query files that no catalog row refers to, and dead writers' temp files.

    Safe while the server and workers run: files younger than the grace period, and those of datasets being indexed, are kept."""
    from nds.catalog.artifact_gc import DEFAULT_GRACE_SECONDS, gc

    with open_ctx() as ctx:
        report = gc(ctx, dry_run=dry_run, grace_seconds=DEFAULT_GRACE_SECONDS if grace is None else grace)
    if as_json:
        print_json(report.as_dict())
        return
    verb = "would remove" if dry_run else "removed"
    out.print(f"{verb} {report.removed:,} files ({report.removed_bytes / 2**20:.1f} MiB; {report.temp_removed:,} of them temp files); "
              f"kept {report.kept:,} referenced ({report.kept_bytes / 2**20:.1f} MiB) and {report.young:,} unreferenced "
              f"younger than {report.grace_seconds:g} s ({report.young_bytes / 2**20:.1f} MiB)", highlight=False)


# --------------------------------------------------------------------------- plugins


@plugins_app.command("list")
@handles_errors
def plugins_list(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the installed source, backbone and exporter plugins."""
    from nds.plugins.registry import all_registries

    infos = [info for registry in all_registries() for info in registry.infos()]
    if as_json:
        print_json([info.__dict__ for info in infos])
        return
    table = Table(title="plugins")
    for col in ("group", "name", "object", "package"):
        table.add_column(col)
    for info in infos:
        table.add_row(info.group, info.name, info.value, info.distribution or "")
    out.print(table)


# --------------------------------------------------------------------------- serve / worker


@app.command("serve")
@handles_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    workers: Annotated[int, typer.Option(help="Uvicorn worker processes (server mode only).")] = 1,
    log_level: Annotated[str, typer.Option(help="Uvicorn log level.")] = "info",
    insecure: Annotated[bool, typer.Option("--insecure", help="Serve on a non-loopback address even though no API key exists (anyone who reaches it is an admin).")] = False,
) -> None:
    """Serve the REST API under /v1 (OpenAPI docs at /docs)."""
    import uvicorn

    s = settings()
    if workers > 1 and not s.broker_url:
        raise fail("several workers need server mode", "the embedded store is single-process: set NDS_DATABASE_URL, NDS_QDRANT_URL and NDS_BROKER_URL")
    from sqlmodel import Session

    from nds.catalog.access import api_is_open
    from nds.catalog.context import CatalogContext
    from nds.catalog.db import check_schema

    probe = CatalogContext(s)
    try:
        check_schema(probe.engine)
        with Session(probe.engine) as session:
            closed = not api_is_open(session=session, auth=s.auth, admin_key=s.admin_key)
    finally:
        probe.close()
    if not closed and not insecure and not _is_loopback(host):
        raise fail(
            f"refusing to serve on {host} with no API key: anyone who reaches it would be an admin",
            "create a key first ('nds keys create --role admin --name NAME'), set NDS_ADMIN_KEY, bind to 127.0.0.1, or pass --insecure",
        )
    mode = "server mode" if s.broker_url else f"embedded mode (catalog and vectors under {s.resolved_home})"
    err.print(f"nds serving on http://{safe(host)}:{port} in {safe(mode)}; docs at /docs", highlight=False)
    if not closed:
        err.print("[bold yellow]warning:[/] the API is open: no API key exists, so every request acts as an admin "
                  "('nds keys create --role admin --name NAME' closes it)", highlight=False)
    if workers > 1:
        uvicorn.run("nds.api.app:create_app", factory=True, host=host, port=port, workers=workers, log_level=log_level)
    else:
        from nds.api.app import create_app

        uvicorn.run(create_app(s), host=host, port=port, log_level=log_level)


def _is_loopback(host: str) -> bool:
    from nds.api.hosts import host_name, is_loopback

    return is_loopback(host_name(host))


@app.command("worker")
@handles_errors
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues to consume: cpu, gpu.")] = "cpu,gpu",
    concurrency: Annotated[int, typer.Option(help="Tasks run at once (1 per GPU).")] = 1,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
) -> None:
    """Run a Celery worker for server mode (needs NDS_BROKER_URL)."""
    s = settings()
    if not s.broker_url:
        raise fail("NDS_BROKER_URL is not set", "workers are for server mode; the embedded default runs jobs in-process")
    argv = [
        sys.executable, "-m", "celery", "-A", "nds.workers.celery_app", "worker",
        "--queues", queues, "--concurrency", str(concurrency), "--prefetch-multiplier", "1",
        "--loglevel", loglevel, "--without-gossip", "--without-mingle", "--hostname", f"nds{os.getpid()}@%h",  # one name per worker
    ]
    os.execv(sys.executable, argv)


def _register_client_commands() -> None:
    """``nds score`` and ``nds query`` are the client's own commands (``nds-client score``,
    ``nds-client query``): the same functions, added to this app."""
    from nds_client.cli import register

    register(app)


_register_client_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
