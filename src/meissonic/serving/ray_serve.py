"""`meissonic serve --ray`: the same app as a Ray Serve deployment, `--replicas` copies of the model across the
machines of a Ray cluster (`--ray-address`; a local instance without it).

Each replica builds the app of `meissonic serve` on its own worker (`serve.ingress` with a builder, evaluated on
the replica): its own engine, queue and batching, the same keys, limits and errors. Ray Serve's proxy listens on
`--host`/`--port` and spreads requests over the replicas; a replica takes at most `--max-batch + --max-queue`
requests at once (`max_ongoing_requests`), beyond which Ray holds them. A GPU machine gives each replica a GPU.
"""

from __future__ import annotations

import os
import signal

from ..cli_common import UsageError, reason


def replica_app(args, keys: list[str]):
    """The builder Ray Serve runs on each replica: the engine (the model loaded on its worker thread) and the app."""
    from functools import partial

    from .app import build_app, load_for_serving, make_engine

    engine = make_engine(args, partial(load_for_serving, args)).start()
    return build_app(engine, keys)


def serve_on_ray(args, keys: list[str]) -> int:
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise UsageError(f"--ray needs Ray Serve: pip install 'meissonic[cluster]' ({reason(err)})") from None

    gpus = 1 if args.device != "cpu" and _has_cuda() else 0
    ray.init(address=args.ray_address, ignore_reinit_error=True, include_dashboard=False,
             runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "MEISSONIC_API_KEY")
                                       if k in os.environ}})
    serve.start(http_options={"host": args.host, "port": args.port})
    def builder():  # a plain function: Ray Serve evaluates it on each replica (a partial would pass for an app)
        return replica_app(args, keys)

    deployment = serve.deployment(
        serve.ingress(builder)(), name="meissonic", num_replicas=args.replicas,
        ray_actor_options={"num_cpus": 1, "num_gpus": gpus},
        max_ongoing_requests=args.max_batch + args.max_queue)
    print(f"meissonic serve --ray: {args.model}, {args.replicas} replica(s), on http://{args.host}:{args.port} "
          f"(Ctrl+C to stop)", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop shuts the local Ray instance down too
    try:
        serve.run(deployment.bind(), name="meissonic", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
