"""Run the node agent: containerd mirror config, start-up taint, pre-pull loop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import watch as k8s_watch

from stowage.agent import mirror
from stowage.agent.config import TAINT_KEY, AgentSettings
from stowage.agent.cri import CRIClient, CRIError
from stowage.agent.prepull import (
    GROUP,
    PLURAL,
    VERSION,
    AgentMetrics,
    PrePuller,
)
from stowage.kubeclient import MERGE_PATCH, KubeConfigError, api_client, describe
from stowage.metrics import serve_metrics
from stowage.settings import split_listen
from stowage.timing import backoff, wait_any

log = structlog.get_logger("stowage.agent")


class AgentError(RuntimeError):
    """The agent cannot start; the message names the problem."""


def uninstall_mirror(settings: AgentSettings) -> mirror.MirrorChanges:
    try:
        return mirror.uninstall(settings.containerd_config_path)
    except (OSError, mirror.MirrorConfigError) as exc:
        raise AgentError(f"cannot restore {settings.containerd_config_path}: {exc}") from None


def install_mirror(settings: AgentSettings) -> None:
    try:
        changes = mirror.install(
            settings.containerd_config_path, settings.mirror, settings.proxy_url
        )
    except (OSError, mirror.MirrorConfigError) as exc:
        raise AgentError(f"containerd mirror config: {exc}") from None
    log.info(
        "containerd mirror config",
        path=str(settings.containerd_config_path),
        registries=settings.mirror,
        written=[str(p) for p in changes.written],
        backed_up=[str(p) for p in changes.backed_up],
        released=[str(p) for p in changes.restored + changes.removed],
    )


READY_EVERY = 5.0  # seconds between two looks at the node proxy's /readyz
UNREADY_AFTER = 3  # failed looks in a row before the mirror config is withdrawn


async def proxy_ready(http: aiohttp.ClientSession, settings: AgentSettings) -> bool:
    try:
        async with http.get(
            f"{settings.proxy_url}/readyz", timeout=aiohttp.ClientTimeout(total=3)
        ) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def guard_mirror(
    settings: AgentSettings, http: aiohttp.ClientSession, stop: asyncio.Event
) -> None:
    """containerd's mirror config only while the node proxy is ready.

    containerd falls back to the registry when the mirror refuses connections or answers
    an error, but (1.6) waits forever on one that accepts and never answers: a wedged
    proxy would stall every mirrored pull on the node. So the hosts.toml files are written
    once the proxy answers /readyz, and withdrawn (originals restored) after a few failed
    looks in a row, until it is ready again."""
    installed = False
    failures = 0
    while not stop.is_set():
        if await proxy_ready(http, settings):
            failures = 0
            if not installed:
                install_mirror(settings)
                installed = True
        else:
            failures += 1
            if installed and failures >= UNREADY_AFTER:
                changes = uninstall_mirror(settings)
                installed = False
                log.warning(
                    "node proxy not ready: containerd mirror config withdrawn",
                    proxy=settings.proxy_url,
                    restored=[str(p) for p in changes.restored],
                    removed=[str(p) for p in changes.removed],
                )
        await wait_any(stop.wait, seconds=READY_EVERY)


async def lift_taint(
    api: k8s.ApiClient, settings: AgentSettings, http: aiohttp.ClientSession, stop: asyncio.Event
) -> None:
    """Remove the start-up taint from this node once the node proxy is ready."""
    while not stop.is_set() and not await proxy_ready(http, settings):
        await wait_any(stop.wait, seconds=1.0)
    core = k8s.CoreV1Api(api)
    failures = 0
    while not stop.is_set():
        try:
            node = await core.read_node(settings.node_name)
            taints = node.spec.taints or []
            kept = [t for t in taints if t.key != TAINT_KEY]
            if len(kept) == len(taints):
                return
            body = {
                # The resourceVersion makes this a compare-and-swap: taints written
                # meanwhile by others are not lost (409, read again).
                "metadata": {"resourceVersion": node.metadata.resource_version},
                "spec": {"taints": [api.sanitize_for_serialization(t) for t in kept] or None},
            }
            await core.patch_node(  # type: ignore[call-arg]
                settings.node_name, body, _content_type=MERGE_PATCH
            )
        except (k8s.ApiException, aiohttp.ClientError) as exc:
            if isinstance(exc, k8s.ApiException) and exc.status == 409:
                continue  # the node changed meanwhile: read it again
            failures += 1
            log.warning("start-up taint not removed yet", error=describe(exc))
            await wait_any(stop.wait, seconds=backoff(failures, 1.0, 60.0))
            continue
        log.info("start-up taint removed", node=settings.node_name, taint=TAINT_KEY)
        return


async def watch_changes(api: k8s.ApiClient, settings: AgentSettings, wake: asyncio.Event) -> None:
    """Wake the loop when an ImageCache or this node changes (the loop also runs on its
    interval, so a broken watch only makes it slower)."""
    objects = k8s.CustomObjectsApi(api)
    core = k8s.CoreV1Api(api)

    async def follow(list_fn: Any, *args: Any, **kwargs: Any) -> None:
        while True:
            try:
                async with k8s_watch.Watch() as w:
                    async for _ in w.stream(list_fn, *args, timeout_seconds=300, **kwargs):
                        wake.set()
            except Exception as exc:  # a watch that breaks is restarted, never fatal
                log.debug("watch restarted", error=str(exc))
                await asyncio.sleep(5)

    await asyncio.gather(
        follow(objects.list_cluster_custom_object, GROUP, VERSION, PLURAL),
        follow(core.list_node, field_selector=f"metadata.name={settings.node_name}"),
    )


async def _health(settings: AgentSettings, metrics: AgentMetrics) -> web.AppRunner:
    """GET /healthz and the Prometheus /metrics on --health-listen."""

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    host, port = split_listen(settings.health_listen)
    return await serve_metrics(metrics.registry, host, port, {"/healthz": ok})


async def run_agent(settings: AgentSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if not settings.mirror and mirror.managed_files(settings.containerd_config_path):
        # Mirror mode was turned off: give containerd its own configuration back.
        changes = uninstall_mirror(settings)
        log.info(
            "containerd mirror config removed (no --mirror)",
            restored=[str(p) for p in changes.restored],
            removed=[str(p) for p in changes.removed],
        )
    # Checked now, so that a bad --mirror is a start-up error, not a log line.
    try:
        mirrored = {mirror.MirroredRegistry.parse(spec).host for spec in settings.mirror}
        if settings.mirror:
            mirror.validate_proxy_url(settings.proxy_url)
    except mirror.MirrorConfigError as exc:
        raise AgentError(f"--mirror: {exc}") from None
    try:
        api = await api_client(settings.kubeconfig)
    except KubeConfigError as exc:
        raise AgentError(str(exc)) from None
    metrics = AgentMetrics()
    health = await _health(settings, metrics)
    wake = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    failed: list[str] = []

    def start(coro: Coroutine[Any, Any, None], name: str) -> None:
        """A side task of the agent; if it fails, the agent stops with its error (the
        DaemonSet restarts it) instead of running on without it."""

        def done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("agent task failed", task=name, error=str(task.exception()))
                failed.append(f"{name}: {task.exception()}")
                stop.set()

        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(done)
        tasks.append(task)

    try:
        async with CRIClient(settings.cri_socket) as cri, aiohttp.ClientSession() as http:
            try:
                version = await cri.version()
                log.info(
                    "agent starting",
                    node=settings.node_name,
                    runtime=f"{version.runtime_name} {version.runtime_version}",
                    proxy=settings.proxy_address,
                    mirrored=settings.mirror,
                )
            except CRIError as exc:
                log.error("runtime not reachable; retrying", error=str(exc))
            if settings.mirror:
                start(guard_mirror(settings, http, stop), "mirror guard")
            if settings.remove_taint:
                start(lift_taint(api, settings, http, stop), "start-up taint")
            start(watch_changes(api, settings, wake), "watch")
            puller = PrePuller(
                api,
                cri,
                node=settings.node_name,
                proxy_address=settings.proxy_address,
                mirrored=mirrored,
                disk_threshold=settings.disk_threshold,
                state_dir=settings.state_dir,
                metrics=metrics,
            )
            while not stop.is_set():
                wake.clear()
                try:
                    delay = min(settings.sync_interval, await puller.reconcile())
                except (k8s.ApiException, aiohttp.ClientError, CRIError, OSError) as exc:
                    log.warning("reconcile failed", error=str(exc))
                    delay = min(settings.sync_interval, 10.0)
                await wait_any(wake.wait, stop.wait, seconds=delay)
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await health.cleanup()
        await api.close()
    if failed:
        raise AgentError("; ".join(failed))
