"""Run the operator: certificates, kopf settings (webhook server, peering), handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import signal
import tempfile
from pathlib import Path

import aiohttp
import kopf
import structlog

from stowage.kubeclient import KubeConfigError, api_client
from stowage.operator import certs
from stowage.operator.config import OperatorSettings
from stowage.operator.controller import Pacer, Runtime, register
from stowage.operator.rewrite import RewritePolicy
from stowage.settings import split_listen
from stowage.timing import wait_any

log = structlog.get_logger("stowage.operator")


class OperatorError(RuntimeError):
    """The operator cannot start; the message names the problem."""


def _kopf_settings(settings: OperatorSettings, cert_dir: Path) -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    host, port = split_listen(settings.webhook_listen)
    s.admission.server = kopf.WebhookServer(
        addr=host,
        port=port,
        certfile=str(cert_dir / "tls.crt"),
        pkeyfile=str(cert_dir / "tls.key"),
        file_check_interval=10.0,
    )
    s.admission.managed = None  # the chart owns the webhook configuration
    s.peering.name = settings.peering
    s.peering.clusterwide = True
    s.peering.mandatory = True
    # Equal priorities make kopf pause every replica; a random one elects exactly one.
    s.peering.priority = random.randint(1, 2**31 - 1)
    s.peering.lifetime = settings.peering_lifetime
    # Our own objects only: pods are watched without any mark on them (index + events).
    s.persistence.finalizer = "stowage.dev/operator"
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="stowage.dev")
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="stowage.dev")
    s.posting.enabled = False  # no k8s Events for every handler run
    s.watching.server_timeout = 300
    return s


async def run_operator(settings: OperatorSettings) -> None:
    # kopf speaks through the standard logging module. Keep its leadership changes
    # ("Pausing operations in favour of ...", "Resuming ...") and its warnings; its
    # per-handler chatter is for --log-level debug.
    logging.getLogger("kopf").setLevel(
        logging.DEBUG if settings.log_level == "debug" else logging.WARNING
    )
    logging.getLogger("kopf._core.engines.peering").setLevel(logging.INFO)
    try:
        policy = RewritePolicy.build(
            settings.proxy_address,
            settings.ignored_namespaces,
            settings.include,
            settings.exclude,
        )
    except ValueError as exc:
        raise OperatorError(str(exc)) from None
    token = None
    if settings.cache_token_file is not None:
        try:
            token = settings.cache_token_file.read_text().strip()
        except OSError as exc:
            raise OperatorError(
                f"--cache-token-file {settings.cache_token_file}: {exc.strerror or exc}"
            ) from None
    try:
        api = await api_client(settings.kubeconfig)
    except KubeConfigError as exc:
        raise OperatorError(str(exc)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    with tempfile.TemporaryDirectory(prefix="stowage-webhook-") as tmp:
        tasks: list[asyncio.Task[None]] = []
        if settings.cert_dir is not None:
            cert_dir = settings.cert_dir
            if not (cert_dir / "tls.crt").exists() or not (cert_dir / "tls.key").exists():
                raise OperatorError(f"--cert-dir {cert_dir} has no tls.crt and tls.key")
        else:
            cert_dir = Path(tmp)
            cfg = certs.CertConfig(
                namespace=settings.namespace,
                secret=settings.cert_secret,
                service=settings.webhook_service,
                webhook_config=settings.webhook_config,
                cert_dir=cert_dir,
                extra_sans=tuple(settings.webhook_host),
            )
            # The webhook cannot start without a certificate: wait for the first one
            # (keep_fresh retries and logs until then), or for a signal to stop.
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(certs.keep_fresh(api, cfg, stop=stop, ready=ready)))
            await wait_any(ready.wait, stop.wait, seconds=math.inf)
            if stop.is_set():
                await _cancel(tasks)
                await api.close()
                return

        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=60)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            rt = Runtime(
                settings, policy, api, http, Pacer(settings.registry_pace), cache_token=token
            )
            registry = kopf.OperatorRegistry()
            register(registry, rt)
            metrics_runner = await rt.metrics.serve(settings.metrics_listen)
            health_host, health_port = split_listen(settings.health_listen)
            log.info(
                "operator starting",
                namespace=settings.namespace,
                proxy=settings.proxy_address,
                cache=settings.cache_url,
                webhook=settings.webhook_listen,
                ignored_namespaces=settings.ignored_namespaces,
            )
            try:
                await kopf.operator(
                    registry=registry,
                    settings=_kopf_settings(settings, cert_dir),
                    clusterwide=True,
                    liveness_endpoint=f"http://{health_host}:{health_port}/healthz",
                    stop_flag=stop,
                )
            finally:
                await metrics_runner.cleanup()
                await _cancel(tasks)
                await api.close()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
