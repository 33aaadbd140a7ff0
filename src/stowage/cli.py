"""The ``stowage`` command line."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import platform as host_platform
import sqlite3
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import click
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from stowage import __version__
from stowage.agent.config import AgentSettings
from stowage.oci.manifest import Platform
from stowage.oci.reference import InvalidReference, Reference, parse_reference
from stowage.operator.config import OperatorSettings
from stowage.settings import ClusterSettings, ConfigError, Settings, load_layered, load_settings
from stowage.units import format_size

if TYPE_CHECKING:  # the store is imported only by the commands that use it
    from stowage.store.blobs import BlobStore
    from stowage.store.index import Index
from stowage.upstream.auth import AuthFileError

F = TypeVar("F", bound=Callable[..., Any])
FIELDS = Settings.model_fields


def _help(name: str) -> str:
    field = FIELDS[name]
    default = (
        "" if field.default_factory or field.default is None else f" [default: {field.default}]"
    )
    return f"{field.description}{default} [env: STOWAGE_{name.upper()}]"


def _config_option(f: F) -> F:
    return click.option(
        "--config",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar="STOWAGE_CONFIG",
        help="YAML file of options (keys as the long flags, e.g. tag-ttl: 60). "
        "[env: STOWAGE_CONFIG]",
    )(f)


def _data_option(f: F) -> F:
    return click.option(
        "--data", type=click.Path(path_type=Path, file_okay=False), help=_help("data")
    )(f)


def _settings(**flags: Any) -> Settings:
    try:
        return load_settings(**flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stowage")
def main() -> None:
    """stowage: a container-image cache for Kubernetes."""


@main.command()
@click.option("--listen", metavar="HOST:PORT", help=_help("listen"))
@_data_option
@_config_option
@click.option(
    "--insecure-registry", multiple=True, metavar="HOST[:PORT]", help=_help("insecure_registry")
)
@click.option(
    "--auth-file", type=click.Path(path_type=Path, dir_okay=False), help=_help("auth_file")
)
@click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False), help=_help("ca_file"))
@click.option("--tag-ttl", type=float, metavar="SECONDS", help=_help("tag_ttl"))
@click.option("--default-registry", metavar="HOST", help=_help("default_registry"))
@click.option("--connect-timeout", type=float, metavar="SECONDS", help=_help("connect_timeout"))
@click.option("--read-timeout", type=float, metavar="SECONDS", help=_help("read_timeout"))
@click.option(
    "--revalidate-timeout", type=float, metavar="SECONDS", help=_help("revalidate_timeout")
)
@click.option("--cache-retry", type=float, metavar="SECONDS", help=_help("cache_retry"))
@click.option("--auth-cache-ttl", type=float, metavar="SECONDS", help=_help("auth_cache_ttl"))
@click.option(
    "--admin-token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help=_help("admin_token_file"),
)
@click.option("--log-format", type=click.Choice(["plain", "json"]), help=_help("log_format"))
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    help=_help("log_level"),
)
@click.option("--max-size", metavar="SIZE|PCT%", help=_help("max_size"))
@click.option("--high-watermark", type=float, metavar="PCT", help=_help("high_watermark"))
@click.option("--low-watermark", type=float, metavar="PCT", help=_help("low_watermark"))
@click.option("--gc-interval", type=float, metavar="SECONDS", help=_help("gc_interval"))
@click.option("--gc-grace", type=float, metavar="SECONDS", help=_help("gc_grace"))
@click.option("--parent", metavar="URL", help=_help("parent"))
def serve(config: Path | None, **flags: Any) -> None:
    """Run the pull-through caching registry proxy.

    Pull through it host-prefixed (localhost:7439/ghcr.io/org/app:1, a port
    written host-port) or name it as containerd's mirror in hosts.toml.
    """
    from stowage import logs
    from stowage.proxy.admin import AdminTokenError
    from stowage.proxy.server import run

    settings = _settings(config_file=config, **flags)
    logs.configure(settings.log_format, settings.log_level)
    try:
        run(settings)
    except (AuthFileError, AdminTokenError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(
            f"cannot serve on {settings.listen} with data {settings.data}: {exc.strerror or exc}"
        ) from None


@main.group()
def cache() -> None:
    """Inspect and manage the cache in a data directory."""


def _open(data: Path | None, config: Path | None) -> tuple[BlobStore, Index]:
    from stowage.store.index import open_index
    from stowage.store.reindex import inspect_index

    settings = _settings(config_file=config, data=data)
    if not (settings.data / "index.db").exists():
        raise click.ClickException(f"no stowage cache in {settings.data} (use --data)")
    state, problem = inspect_index(settings.data / "index.db")
    if state == "corrupt":
        raise click.ClickException(
            f"the index in {settings.data} is unreadable ({problem}): "
            "run stowage cache reindex (stowage serve rebuilds it at start-up)"
        )
    return open_index(settings.data)


def _console() -> Console:
    """Names are never cut short: piped output is as wide as it needs to be."""
    console = Console()
    return console if console.is_terminal else Console(width=10_000)


@cache.command("ls")
@_data_option
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cache_ls(data: Path | None, config: Path | None, as_json: bool) -> None:
    """List cached images: repository, tag, digest, size, last used, pinned."""
    from stowage.store.gc import pinned_digests

    _, index = _open(data, config)
    rows = index.images()
    pinned = pinned_digests(index.db)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "registry": r.registry,
                        "repository": r.repository,
                        "tag": r.tag,
                        "digest": r.digest,
                        "media_type": r.media_type,
                        "size": r.size,
                        "last_used": dt.datetime.fromtimestamp(r.last_access, dt.UTC).isoformat(),
                        "pinned": r.digest in pinned,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    table = Table(box=None)
    for column in ("IMAGE", "TAG", "DIGEST", "SIZE", "LAST USED", "PIN"):
        table.add_column(column, no_wrap=True)
    for r in rows:
        used = dt.datetime.fromtimestamp(r.last_access).strftime("%Y-%m-%d %H:%M")
        table.add_row(
            f"{r.registry}/{r.repository}",
            r.tag or "<none>",
            r.digest[:19],
            format_size(r.size),
            used,
            "pinned" if r.digest in pinned else "",
        )
    _console().print(table)


@cache.command("rm")
@click.argument("image")
@_data_option
@_config_option
def cache_rm(image: str, data: Path | None, config: Path | None) -> None:
    """Remove IMAGE (name:tag or name@digest) and the content only it used."""
    from stowage.oci.digest import Digest

    store, index = _open(data, config)
    ref = _cached_ref(index, image)
    removed = index.remove_image(ref.registry, ref.repository, ref.tag, ref.digest)
    from stowage.store.gc import drop_pins

    drop_pins(index.db, ref.registry, ref.repository, [ref.tag, ref.digest], removed)
    index.close()
    freed = 0
    for digest in removed:
        parsed = Digest.parse(digest)
        freed += store.size(parsed) or 0
        store.remove(parsed)
    click.echo(f"removed {ref}: {len(removed)} files, {format_size(freed)} freed")


@cache.command("pin")
@click.argument("image")
@_data_option
@_config_option
def cache_pin(image: str, data: Path | None, config: Path | None) -> None:
    """Keep IMAGE (name:tag or name@digest) however full the cache: never evicted.

    A pinned tag keeps whatever it points at, also after it moved upstream.
    """
    from stowage.store.gc import pin

    _, index = _open(data, config)
    ref = _cached_ref(index, image)
    added = pin(index.db, ref.registry, ref.repository, ref.ref)
    index.close()
    click.echo(f"pinned {ref}" if added else f"{ref} was already pinned")


@cache.command("unpin")
@click.argument("image")
@_data_option
@_config_option
def cache_unpin(image: str, data: Path | None, config: Path | None) -> None:
    """Let IMAGE be evicted again when it is the least recently used."""
    from stowage.store.gc import unpin

    _, index = _open(data, config)
    ref = _parse_image(image)
    removed = unpin(index.db, ref.registry, ref.repository, ref.ref)
    index.close()
    if not removed:
        raise click.ClickException(f"{ref} is not pinned")
    click.echo(f"unpinned {ref}")


def _parse_image(image: str, platform: str | None = None) -> Reference:
    """IMAGE (and --platform) as given on the command line; a usage error if malformed."""
    try:
        if platform is not None:
            Platform.parse(platform)
        return parse_reference(image)
    except (InvalidReference, ValueError) as exc:
        raise click.UsageError(str(exc)) from None


def _cached_ref(index: Index, image: str) -> Reference:
    ref = _parse_image(image)
    if not index.holds(ref.registry, ref.repository, ref.tag, ref.digest):
        index.close()
        raise click.ClickException(f"{ref} is not in the cache")
    return ref


@cache.command("stats")
@_data_option
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cache_stats(data: Path | None, config: Path | None, as_json: bool) -> None:
    """Hits, misses, stale serves and bytes served from cache."""
    _, index = _open(data, config)
    stats = {**index.stats(), "cache_size": index.total_size(), "images": len(index.images())}
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    table = Table("STAT", "VALUE", box=None)
    for name, value in stats.items():
        shown = format_size(value) if name.startswith(("bytes", "cache_size")) else str(value)
        table.add_row(name.replace("_", " "), shown)
    _console().print(table)


class _CannotVerify(click.ClickException):
    exit_code = 2  # 1 means "corrupt content removed"


@cache.command("verify")
@_data_option
@_config_option
def cache_verify(data: Path | None, config: Path | None) -> None:
    """Rehash every cached file; remove the corrupt ones and their index entries.

    Removed content (and the tags of a removed manifest) is fetched again from
    upstream on the next request. Safe while stowage serves the directory.
    Exit status: 0 all content verified, 1 something was removed, 2 the cache
    could not be checked.
    """
    from stowage.store.verify import verify

    try:
        store, index = _open(data, config)
        try:
            report = verify(store, index)
        finally:
            index.close()
    except click.ClickException as exc:
        raise _CannotVerify(exc.message) from None
    except (OSError, sqlite3.Error) as exc:
        raise _CannotVerify(f"cannot verify the cache: {exc}") from None
    for f in report.findings:
        what = "removed" if f.problem == "corrupt" else "index entry dropped"
        click.echo(f"{f.problem} {f.kind} {f.digest}: {f.detail} ({what})")
        for tag in f.tags:
            click.echo(f"  tag {tag} dropped with it")
    corrupt = sum(f.problem == "corrupt" for f in report.findings)
    missing = len(report.findings) - corrupt
    click.echo(
        f"verified {report.files} files ({format_size(report.bytes)}): "
        f"{corrupt} corrupt removed, {missing} index entries without a file dropped"
    )
    if not report.clean:
        click.echo("removed content is fetched again from upstream on the next request")
        raise SystemExit(1)


@cache.command("reindex")
@_data_option
@_config_option
def cache_reindex(data: Path | None, config: Path | None) -> None:
    """Rebuild the index from the content on disk.

    Every file under blobs/ is indexed again, manifests with their references.
    A corrupt index is moved aside (index.db.corrupt-<time>) and rebuilt from
    nothing; then tags and repository names are lost, since content does not
    record them: content stays served by digest and a pull by tag restores the
    tag. A readable index keeps its tags. stowage serve does this by itself at
    start-up when the index is lost or unreadable.
    """
    from stowage.store.reindex import LOST_NOTE, reindex

    settings = _settings(config_file=config, data=data)
    if not ((settings.data / "blobs").is_dir() or (settings.data / "index.db").exists()):
        raise click.ClickException(f"no stowage cache in {settings.data} (use --data)")
    try:
        report = reindex(settings.data)
    except (OSError, sqlite3.Error) as exc:
        raise click.ClickException(f"cannot rebuild the index in {settings.data}: {exc}") from None
    if report.moved_aside is not None:
        click.echo(f"index unreadable ({report.reason}): moved aside to {report.moved_aside}")
    elif report.reason:
        click.echo(f"no index ({report.reason})")
    for digest in report.corrupt_removed:
        click.echo(f"corrupt manifest {digest} removed")
    click.echo(
        f"indexed {report.blobs} blobs and {report.manifests} manifests "
        f"({format_size(report.bytes)}); {report.tags_kept} tags kept, "
        f"{report.tags_dropped} dropped"
    )
    if report.reason:
        click.echo(f"note: {LOST_NOTE}")


def _host_platform() -> str:
    machine = host_platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)
    return f"linux/{arch}"


def _url_option(purpose: str) -> Callable[[F], F]:
    return click.option(
        "--url",
        default="http://127.0.0.1:7439",
        show_default=True,
        help=f"Address of the running stowage to {purpose}.",
    )


def _platform_option(f: F) -> F:
    return click.option(
        "--platform",
        "platform_",
        default=_host_platform,
        show_default="host platform",
        metavar="OS/ARCH[/VARIANT]",
        help="Platform to pull from a multi-arch index.",
    )(f)


@cache.command("warm")
@click.argument("image")
@_url_option("fill")
@_platform_option
def cache_warm(image: str, url: str, platform_: str) -> None:
    """Fill the cache with IMAGE by pulling it through a running stowage."""
    from stowage.pull import PullError, pull

    ref = _parse_image(image, platform_)
    plat = Platform.parse(platform_)
    name = ref.prefixed_name
    base = url.rstrip("/")

    async def go() -> None:
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=Console(stderr=True),
        ) as progress:
            task = progress.add_task(str(ref), total=None)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=60)) as s:
                result = await pull(
                    s,
                    base,
                    name,
                    ref.ref or "latest",
                    plat,
                    on_manifest=lambda total: progress.update(task, total=total),
                    on_bytes=lambda n: progress.advance(task, n),
                )
        click.echo(
            f"cached {ref} ({result.manifest_digest}): {len(result.blobs)} blobs, "
            f"{format_size(result.total_bytes)} in {result.seconds:.1f}s"
        )

    try:
        asyncio.run(go())
    except PullError as exc:
        raise click.ClickException(str(exc)) from None
    except aiohttp.ClientError as exc:
        raise click.ClickException(f"cannot reach stowage at {url}: {exc}") from None
    except TimeoutError:
        raise click.ClickException(f"stowage at {url} timed out") from None


@main.command("bench")
@click.argument("image")
@_url_option("pull through")
@_platform_option
@click.option(
    "--insecure", is_flag=True, help="Reach IMAGE's registry over plain HTTP for the direct pull."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench(image: str, url: str, platform_: str, insecure: bool, as_json: bool) -> None:
    """Time pulling IMAGE directly from its registry and through a running stowage.

    Pulls it three times, blob by blob, as containerd does: directly, through
    stowage (cold, when stowage did not have it yet: detected from stowage's
    /metrics) and through stowage again (warm). "cold" is only measured for
    an image stowage has not cached yet; otherwise the report says "warm only".
    """
    from stowage import bench as bench_

    ref = _parse_image(image, platform_)
    plat = Platform.parse(platform_)
    err = Console(stderr=True)
    try:
        report = bench_.run(
            ref, plat, url, insecure=insecure, say=lambda m: err.print(m, style="dim")
        )
    except bench_.BenchError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        bench_.render(report, Console())


def _settings_options(model: type[BaseModel], env_prefix: str = "STOWAGE_") -> Callable[[F], F]:
    """One click option per settings field: --field-name, repeatable for lists, help from
    the field's description (what `--help` says is what the settings accept)."""

    def decorate(f: F) -> F:
        for name, info in reversed(model.model_fields.items()):
            origin = typing.get_origin(info.annotation)
            args = typing.get_args(info.annotation)
            kwargs: dict[str, Any] = {}
            if origin is list or list in (typing.get_origin(a) for a in args):
                kwargs["multiple"] = True
            elif origin is typing.Literal:
                kwargs["type"] = click.Choice(list(args))
            elif info.annotation in (Path, Path | None):
                kwargs["type"] = click.Path(path_type=Path)
            elif info.annotation is int:
                kwargs["type"] = int
            elif info.annotation is bool:
                kwargs.update(is_flag=True, default=None)
            default = (
                ""
                if info.default_factory or info.default is None
                else f" [default: {info.default:g}]"
                if isinstance(info.default, float)
                else f" [default: {info.default}]"
            )
            help_ = f"{info.description}{default} [env: {env_prefix}{name.upper()}]"
            f = click.option(f"--{name.replace('_', '-')}", name, help=help_, **kwargs)(f)
        return f

    return decorate


C = TypeVar("C", bound=ClusterSettings)


def _cluster_settings(cls: type[C], config: Path | None, flags: dict[str, Any]) -> C:
    """Settings of a cluster command (flags, environment, file), logging set up."""
    from stowage import logs

    try:
        settings = load_layered(cls, config, **flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    logs.configure(settings.log_format, settings.log_level)
    return settings


@main.command("operator")
@_config_option
@_settings_options(OperatorSettings)
def operator(config: Path | None, **flags: Any) -> None:
    """Run the Kubernetes operator: the pod webhook that rewrites images to the node
    proxy, and the CachedImage controllers (prefetch, usage, expiry, freshness).

    Every replica serves the webhook; the replicas elect one (kopf peering) to run
    the controllers. Durations take s, m, h or d (30d); plain numbers are seconds.
    """
    from stowage.operator.main import OperatorError, run_operator

    settings = _cluster_settings(OperatorSettings, config, flags)
    try:
        asyncio.run(run_operator(settings))
    except OperatorError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("agent")
@_config_option
@_settings_options(AgentSettings)
def agent(config: Path | None, **flags: Any) -> None:
    """Run the node agent: containerd mirror config (hosts.toml) for --mirror registries,
    pre-pull of the ImageCaches that select this node through the CRI, and removal of
    the start-up taint once the node proxy is ready.

    With --uninstall it restores containerd's hosts.toml files and exits.
    """
    from stowage.agent.main import AgentError, run_agent, uninstall_mirror

    settings = _cluster_settings(AgentSettings, config, flags)
    try:
        if settings.uninstall:
            changes = uninstall_mirror(settings)
            click.echo(
                f"restored {len(changes.restored)}, removed {len(changes.removed)} hosts.toml "
                f"file(s) under {settings.containerd_config_path}"
            )
            return
        asyncio.run(run_agent(settings))
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None
