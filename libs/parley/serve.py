"""Ray Serve glue shared by the service deployments (`services/*/deployment.py`).

Serve's gRPC ingress calls a deployment method named like the rpc
(`Tts/Synthesize` → `TtsDeployment.Synthesize`) with the request, or with a
`gRPCInputStream` for client/bidirectional streams, and `grpc_context=` a
`RayServegRPCContext`; the application is picked by the `application` metadata
key. Our servicers expect a `grpc.aio.ServicerContext`, so `ServeContext`
adapts Serve's: `abort` sets the status code and details on Serve's context
and raises, which is how Serve sends a status other than INTERNAL (the replica
wraps the exception with the code it finds set on the context).

`load_config` / `deploy` run the one Serve config file
(`deploy/helm/parley/files/serve-config.yaml`, the same schema as KubeRay's `serveConfigV2`) the
way `serve run CONFIG` does.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
import yaml
from pydantic import BaseModel

from parley.errors import InvalidInput
from parley.rpc import MAX_MESSAGE_BYTES

#: The Serve config shipped with Parley (`parley serve` and the Helm chart read the same file).
DEFAULT_CONFIG = (
    Path(__file__).resolve().parents[2]
    / "deploy"
    / "helm"
    / "parley"
    / "files"
    / "serve-config.yaml"
)


log = logging.getLogger(__name__)


class Aborted(Exception):
    """Raised by `ServeContext.abort`: the call ends with `code` and `details`.

    Picklable (it crosses Ray's process boundary when a handle call fails).
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


class ServeContext:
    """The part of `grpc.aio.ServicerContext` our servicers use, over Serve's gRPC context.

    `grpc_context` is None when a deployment is called through a Serve handle
    rather than the gRPC ingress; `abort` then raises `Aborted` for the caller.
    """

    def __init__(self, grpc_context: Any | None = None, requests: Any | None = None) -> None:
        self._ctx = grpc_context
        self._requests = requests

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> NoReturn:
        if self._ctx is not None:
            self._ctx.set_code(code)
            self._ctx.set_details(details)
            if trailing_metadata:
                self._ctx.set_trailing_metadata(list(trailing_metadata))
        raise Aborted(code, details)

    def cancelled(self) -> bool:
        """True once the client went away (Serve ends the request stream early then)."""
        is_cancelled = getattr(self._requests, "is_cancelled", None)
        return bool(is_cancelled()) if is_cancelled is not None else False

    def done(self) -> bool:
        return self.cancelled()

    def set_code(self, code: grpc.StatusCode) -> None:
        if self._ctx is not None:
            self._ctx.set_code(code)

    def set_details(self, details: str) -> None:
        if self._ctx is not None:
            self._ctx.set_details(details)

    def code(self) -> grpc.StatusCode | None:
        return self._ctx.code() if self._ctx is not None else None

    def details(self) -> str | None:
        return self._ctx.details() if self._ctx is not None else None

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self._ctx.invocation_metadata()) if self._ctx is not None else []

    def peer(self) -> str:
        return self._ctx.peer() if self._ctx is not None else ""


#: Where every Ray container finds the Redis of API keys (the Helm chart sets it from a
#: Secret; `parley serve` passes its gateway's), and the prefix of their keys.
REDIS_URL_ENV = "PARLEY_REDIS_URL"
KEY_PREFIX_ENV = "PARLEY_REDIS_PREFIX"


class StageKeys:
    """API keys on a stage's own gRPC service (`parley.v1.Asr`, `Tts`, ...) on Serve.

    Serve puts every application on one gRPC port, so a stage is as reachable as the
    sessions API: with $PARLEY_REDIS_URL set, a direct call must carry a valid API key
    (`authorization: Bearer <key>` or `x-api-key`), like the sessions API, or ends
    UNAUTHENTICATED. Without it the stages are open, as the gateway is then (a warning;
    only for a cluster nobody else reaches). The sessions gateway calls the stages
    through Serve handles, not this port, and is not asked for a key.
    """

    def __init__(self, service: str, tenancy: Any | None) -> None:
        self.service = service
        self.tenancy = tenancy

    @classmethod
    def from_env(cls, service: str) -> StageKeys:
        from parley.tenancy import DEFAULT_PREFIX, TenancyStore

        url = os.environ.get(REDIS_URL_ENV, "")
        if not url:
            log.warning("%s: no $%s: its gRPC service takes calls without an API key",
                        service, REDIS_URL_ENV)  # fmt: skip
            return cls(service, None)
        prefix = os.environ.get(KEY_PREFIX_ENV, "") or DEFAULT_PREFIX
        return cls(service, TenancyStore.from_url(url, prefix=prefix))

    async def check(self, context: ServeContext) -> None:
        """Abort the call unless it carries a valid API key (when keys are on)."""
        if self.tenancy is None:
            return
        from redis.exceptions import RedisError

        from parley.tenancy import Unauthenticated, api_key_from_headers

        try:
            headers = [(k, v) for k, v in context.invocation_metadata() if isinstance(v, str)]
            await self.tenancy.authenticate(api_key_from_headers(headers))
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{self.service}: {exc}")
        except RedisError:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"{self.service}: the API key store is unreachable"
            )

    async def aclose(self) -> None:
        if self.tenancy is not None:
            await self.tenancy.aclose()


async def close_keys(deployment: object) -> None:
    """A stage deployment's `__del__`: close its `StageKeys` (absent if `__init__` failed)."""
    keys = getattr(deployment, "keys", None)
    if isinstance(keys, StageKeys):
        await keys.aclose()


def deployment_args(args: Mapping[str, Any] | None, model: type[BaseModel]) -> BaseModel:
    """Validate an application's `args.config` (from the Serve config) as the service's config."""
    config = dict((args or {}).get("config") or {})
    try:
        return model.model_validate(config)
    except Exception as exc:
        raise InvalidInput(f"invalid {model.__name__} in the Serve config: {exc}") from exc


def check_audio(audio: object, *, max_s: float, sample_rate: int = 16_000) -> np.ndarray:
    """Audio passed through a Serve handle: 1-D, finite, float32, at most `max_s` long."""
    if not isinstance(audio, np.ndarray) or audio.ndim != 1:
        raise InvalidInput("audio must be a 1-D numpy array of samples")
    if not np.issubdtype(audio.dtype, np.floating):
        raise InvalidInput(f"audio must hold float samples, not {audio.dtype}")
    if len(audio) > max_s * sample_rate:
        raise InvalidInput(f"audio of {len(audio) / sample_rate:.1f} s exceeds {max_s:.1f} s")
    samples = audio.astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise InvalidInput("audio contains NaN or infinite samples")
    return samples


# --- running the config file -------------------------------------------------------------


@dataclass(slots=True)
class ServeAddresses:
    grpc: str
    http: str
    applications: list[str]


def load_config(
    path: str | Path = DEFAULT_CONFIG,
    *,
    grpc_port: int | None = None,
    http_port: int | None = None,
    http_host: str | None = None,
    applications: Iterable[str] | None = None,
) -> Any:
    """Read and validate a Serve config file (`ServeDeploySchema`), with local overrides.

    `applications` keeps only the named ones (the gRPC servicer list stays whole:
    the proxy needs it to decode a request before it knows the application).
    """
    from ray.serve.schema import ServeDeploySchema

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"cannot read Serve config {p}: {exc}") from exc
    if grpc_port is not None:
        data.setdefault("grpc_options", {})["port"] = grpc_port
    if http_port is not None:
        data.setdefault("http_options", {})["port"] = http_port
    if http_host is not None:
        data.setdefault("http_options", {})["host"] = http_host
    if applications is not None:
        wanted = set(applications)
        unknown = wanted - {a.get("name") for a in data.get("applications", [])}
        if unknown:
            raise InvalidInput(f"no application named {sorted(unknown)} in {p}")
        data["applications"] = [a for a in data["applications"] if a.get("name") in wanted]
    try:
        return ServeDeploySchema.model_validate(data)
    except Exception as exc:
        raise InvalidInput(f"Serve config {p} is invalid:\n{exc}") from exc


def deploy(config: Any, *, timeout_s: float = 300.0) -> ServeAddresses:
    """Start Serve (proxies, controller) on the connected Ray cluster and deploy `config`.

    Blocks until every application is RUNNING; raises with Serve's message if one fails.
    This is what `serve run CONFIG` does (Serve's CLI uses the same private client).
    """
    from ray.serve import status
    from ray.serve._private import api as _private_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ApplicationStatus

    client = _private_api.serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
    )
    client.deploy_apps(config, _blocking=False)
    names = [a.name for a in config.applications]
    deadline = time.monotonic() + timeout_s
    while True:
        apps = status().applications
        states = {n: apps[n].status if n in apps else None for n in names}
        failed = {
            n: _failure(apps[n])
            for n, s in states.items()
            if s in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY)
        }
        if failed:
            lines = "\n".join(f"  {name}: {why}" for name, why in failed.items())
            raise DeployFailed(f"Serve applications failed to deploy:\n{lines}")
        if all(s == ApplicationStatus.RUNNING for s in states.values()):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve applications not running after {timeout_s:.0f} s: {states}")
        time.sleep(0.2)
    grpc_opts = config.grpc_options
    http_opts = config.http_options
    addresses = ServeAddresses(
        grpc=f"127.0.0.1:{grpc_opts.port}",
        http=f"http://{http_opts.host}:{http_opts.port}",
        applications=names,
    )
    wait_for_grpc_proxy(addresses.grpc, names, timeout_s=max(5.0, deadline - time.monotonic()))
    return addresses


class DeployFailed(RuntimeError):
    """An application of the Serve config did not start (the message says why)."""


def _failure(app: Any) -> str:
    """An application's failure, with its deployments' messages (a replica's exception)."""
    reasons = [app.message] if app.message else []
    for name, deployment in (app.deployments or {}).items():
        message = (deployment.message or "").strip()
        if message:
            # A replica's traceback: its last line says what went wrong.
            last = [line for line in message.splitlines() if line.strip()][-1]
            reasons.append(f"deployment {name}: {last.strip()}")
    return "; ".join(reasons) or "no reason given"


def wait_for_grpc_proxy(address: str, names: Iterable[str], timeout_s: float = 30.0) -> None:
    """Wait until Serve's gRPC proxy routes to every application in `names`.

    An application is RUNNING before the proxy has its route (it learns routes
    by long polling the controller); calls in between get NOT_FOUND.
    """
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    wanted = set(names)
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = serve_pb2_grpc.RayServeAPIServiceStub(channel)
        while True:
            try:
                request = serve_pb2.ListApplicationsRequest()  # type: ignore[attr-defined]
                listed = stub.ListApplications(request, timeout=2)
                if wanted <= set(listed.application_names):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve's gRPC proxy at {address} does not route {wanted}")
            time.sleep(0.1)


def free_port() -> int:
    """A TCP port free on loopback right now (for the local cluster's listeners)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_local_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    """A small local Ray cluster for `parley serve` and tests (no dashboard)."""
    import ray

    # Serve's gRPC proxy would take messages up to 2 GiB; ours take 4 MiB (its actors
    # inherit this environment). The Helm chart sets the same in every Ray container.
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(MAX_MESSAGE_BYTES))
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("logging_level", "WARNING")
    kwargs.setdefault("log_to_driver", os.environ.get("PARLEY_RAY_LOGS", "") == "1")
    ray.init(num_cpus=num_cpus or os.cpu_count() or 2, namespace="serve", **kwargs)


def cluster_memory_mb() -> float:
    """Memory of this process and every process it started (the local Ray cluster), in MB.

    PSS (proportional set size): shared pages (Ray's object store, the models' mapped
    files) are split between the processes that map them, so the sum is not inflated.
    """
    import psutil

    me = psutil.Process()
    total = 0
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total / 2**20
