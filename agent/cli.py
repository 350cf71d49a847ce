"""``edge-agent``: run the agent, and talk to a running one."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

from edgefleet.agent.config import AgentConfig, load_config
from edgefleet.agent.enroll import add_arguments as add_enroll_arguments
from edgefleet.agent.enroll import cmd_enroll
from edgefleet.agent.formatting import format_prediction
from edgefleet.core import logs
from edgefleet.core.aio import event_loop_factory
from edgefleet.core.errors import ConfigError
from edgefleet.core.logs import LogFormat

DEFAULT_URL = "http://127.0.0.1:8470"
log = logging.getLogger("edgefleet.agent")


def _setup_logging(level: str, fmt: LogFormat = "text") -> None:
    logs.configure(level, fmt)  # stderr; text or JSON lines (core/logs.py)


def _load(args: argparse.Namespace) -> AgentConfig:
    config = load_config(Path(args.config))
    overrides: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    if getattr(args, "host", None) is not None:
        overrides["host"] = args.host
    if overrides:
        config = config.model_copy(update={"server": config.server.model_copy(update=overrides)})
    return config


def cmd_serve(args: argparse.Namespace) -> int:
    # Not aiohttp's run_app: its plain site has no header/body timeouts or connection
    # cap (agent/server/serve.py, agent/server/connections.py).
    from edgefleet.agent.server.serve import run

    config = _load(args)
    _setup_logging(config.logging.level, args.log_format or config.logging.format)
    loop = event_loop_factory(config.server.event_loop)()
    log.info("event loop: %s", type(loop).__module__.split(".")[0])
    run(config, loop)
    return 0


def _client_headers(args: argparse.Namespace) -> dict[str, str]:
    token = args.token or os.environ.get("EDGEFLEET_AGENT_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _request(
    args: argparse.Namespace, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with (
        aiohttp.ClientSession(timeout=timeout, headers=_client_headers(args)) as session,
        session.request(method, args.url.rstrip("/") + path, **kwargs) as resp,
    ):
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            body = {"error": (await resp.text())[:500]}
        return resp.status, body


def _call(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    import aiohttp

    try:
        status, body = asyncio.run(_request(args, method, path, **kwargs))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise SystemExit(f"cannot reach the agent at {args.url}: {exc}") from exc
    if status >= 400:
        raise SystemExit(f"agent answered {status}: {body.get('error', body)}")
    return body


def cmd_predict(args: argparse.Namespace) -> int:
    data = Path(args.image).read_bytes()
    path = f"/v1/predict/{args.model}"
    params = {"top_k": str(args.top_k)} if args.top_k else {}
    if args.version:
        params["version"] = args.version
    answer = _call(args, "POST", path, data=data, params=params)
    if args.json:
        import json

        print(json.dumps(answer, indent=2))
    else:
        print(format_prediction(answer))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    doc = _call(args, "GET", "/v1/models")
    rows = [("MODEL", "VERSION", "STATE", "LABELS", "RUNTIME", "PROVIDER", "SELF-TEST", "BATCHING")]
    for m in doc["models"]:
        for v in m["versions"]:
            state = "active" if v["active"] else ("loaded" if v["loaded"] else "installed")
            provider = v.get("provider", "-")
            if v.get("runtime_fallback"):
                provider += " (accelerator failed)"
            rows.append(
                (
                    m["name"],
                    v["version"],
                    state,
                    ",".join(v["labels"]) or "-",
                    v.get("runtime", "-"),
                    provider,
                    v.get("self_test", "-"),
                    _batching_cell(v.get("batching")),
                )
            )
        if m.get("last_error"):
            rows.append((m["name"], "", "error", m["last_error"], "", "", "", ""))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    try:
        system = _call(args, "GET", "/v1/system")
    except SystemExit:
        return 0  # an agent without /v1/system: the table is what was asked for
    found = system.get("accelerators", {}).get("accelerators")
    if found is not None:
        print(f"\naccelerators: {', '.join(found) or 'none (CPU only)'}")
    return 0


def _batching_cell(batching: dict[str, Any] | None) -> str:
    if not batching:
        return "-"
    if not batching.get("enabled"):
        return "off"
    if not batching.get("batched"):
        return "one by one"
    delay = batching.get("max_queue_delay_us", 0)
    return f"max {batching.get('max_batch_size')}" + (f", {delay} us" if delay else "")


def cmd_install(args: argparse.Namespace) -> int:
    data = Path(args.bundle).read_bytes()
    params = {"activate": "1"} if args.activate else {}
    doc = _call(args, "POST", "/v1/bundles", data=data, params=params)
    print(f"installed {doc['name']}:{doc['version']}" + (" (active)" if doc.get("active") else ""))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config))
    print(f"{args.config}: OK ({len(config.models)} model bundle(s), profile {config.profile})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from edgefleet.agent.demo import cloud_setup, collect_samples, run_demo

    config = _load(args)
    _setup_logging("WARNING" if not args.verbose else config.logging.level, config.logging.format)
    samples = collect_samples(Path(args.images))
    if not samples:
        print(f"no demo images in {args.images}: run `python -m models` first", file=sys.stderr)
        return 1
    # The cloud endpoint too, when cloud.yaml sits beside the config (python -m models).
    cloud = cloud_setup(Path(args.config), args.cloud_config, args.cloud_port)
    with asyncio.Runner(loop_factory=event_loop_factory(config.server.event_loop)) as runner:
        return runner.run(run_demo(config, samples, keep_serving=not args.exit, cloud=cloud))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-agent", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def client(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--url", default=os.environ.get("EDGEFLEET_AGENT_URL", DEFAULT_URL))
        sp.add_argument("--token", help="bearer token (or EDGEFLEET_AGENT_TOKEN)")
        sp.add_argument("--timeout", type=float, default=30.0)

    s = sub.add_parser("serve", help="run the agent")
    s.add_argument("--config", required=True)
    s.add_argument("--port", type=int)
    s.add_argument("--host")
    s.add_argument(
        "--log-format", choices=logs.FORMATS, help="text or json lines (default: logging.format)"
    )
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("predict", help="send an image to a running agent")
    s.add_argument("image")
    s.add_argument("--model", required=True)
    s.add_argument("--version", help="version or label (default: the active version)")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--json", action="store_true")
    client(s)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("models", help="list models, versions, labels, provider, self-test")
    client(s)
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("install", help="install a bundle into a running agent")
    s.add_argument("bundle")
    s.add_argument("--activate", action="store_true")
    client(s)
    s.set_defaults(func=cmd_install)

    s = sub.add_parser("check-config", help="validate a config file")
    s.add_argument("--config", required=True)
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("demo", help="start the agent, send it the sample images, print answers")
    s.add_argument("--config", required=True)
    s.add_argument("--port", type=int)
    s.add_argument(
        "--images",
        default="models/build/demo",
        help="folder with one sub-folder of images per model",
    )
    s.add_argument("--exit", action="store_true", help="stop after the demo requests")
    s.add_argument("--verbose", action="store_true")
    s.add_argument(
        "--cloud-config",
        help="cloud-profile config to start beside the agent"
        " (default: cloud.yaml next to --config, if present)",
    )
    s.add_argument(
        "--cloud-port",
        type=int,
        help="port for that cloud endpoint (the agent's fallback URL follows)",
    )
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("enroll", help="join a fleet with a one-time enrolment token")
    add_enroll_arguments(s)  # agent/enroll.py
    s.set_defaults(func=cmd_enroll)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
