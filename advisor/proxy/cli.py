"""`advisor proxy` (serve) and `advisor proxy report` (write the ledger's report)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from pathlib import Path

from advisor.task import TaskError


def _load(args: argparse.Namespace):
    from advisor.proxy.config import load_proxy_config

    return load_proxy_config(args.config)


def cmd_proxy(args: argparse.Namespace) -> int:
    if getattr(args, "proxy_command", None) == "report":
        return cmd_report(args)
    from advisor.engine.serving.auth import open_host_refusal
    from advisor.proxy.config import check_keys

    try:
        cfg = _load(args)
        check_keys(cfg, str(args.config))
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    refusal = open_host_refusal(
        "advisor proxy",
        args.host,
        cfg.auth is not None,
        args.allow_unauthenticated,
        f"add auth: {{master_key_env: NAME}} to {args.config}",
    )
    if refusal:
        print(refusal, file=sys.stderr)
        return 2
    import uvicorn

    from advisor.engine.listen import ListenError, listen
    from advisor.proxy.app import UVICORN_OPTIONS, build_app
    from advisor.proxy.router import Router

    try:  # before anything is printed or opened: a taken port is one line, not an address it never serves
        sock = listen(args.host, args.port)
    except ListenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    router = Router(cfg)
    app = build_app(router)
    # the process is the proxy's: its start-up objects (modules, config) are frozen out of the cyclic
    # GC, and a young generation of 10k objects (not 700) lets a request's objects die by refcount
    # before a collection traverses them (at 700, the collections cost a fifth of a request's CPU)
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    print(
        f"advisor proxy on http://{args.host}:{args.port} (OpenAI: /v1/chat/completions, Anthropic: /v1/messages; "
        f"models {', '.join(cfg.models)}; sessions in {cfg.sessions_dir}; "
        f"{'keys required' if cfg.auth else 'no auth'})",
        file=sys.stderr,
    )
    uvicorn.Server(uvicorn.Config(app, **UVICORN_OPTIONS)).run(sockets=[sock])
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from advisor.proxy.report import headline, write_report
    from advisor.proxy.sessions import SessionStore

    try:
        cfg = _load(args)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    store = SessionStore(
        cfg.escalation,
        cfg.endpoints[cfg.frontier.endpoint].price if cfg.frontier else None,
        has_frontier=cfg.frontier is not None,
        directory=cfg.sessions_dir,
        ttl_s=cfg.sessions.ttl_s,
        max_sessions=cfg.sessions.max_sessions,
        read_only=True,
    )
    spent = None
    if cfg.auth is not None or cfg.storage.url_env or (cfg.sessions_dir / cfg.storage.file).is_file():
        from advisor.proxy.auth import store_for
        from advisor.proxy.report import spend

        async def read() -> dict:
            db = await store_for(cfg).open(serve=False)
            try:
                return await spend(db)
            finally:
                await db.close()

        spent = asyncio.run(read())
    out = args.out or cfg.sessions_dir
    res = write_report(store, Path(out), spent)
    print(headline(res))
    print(f"wrote {Path(out) / 'report.md'} and report.html")
    return 0


def add_proxy_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proxy", help="serve Advisor Mode to an existing harness (OpenAI / Anthropic API)")
    p.add_argument(
        "--config", type=Path, default=Path("proxy.yaml"), help="proxy.yaml (default: ./proxy.yaml)"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=4000, help="port (default: 4000)")
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen beyond loopback (--host) with no auth: block in proxy.yaml, on purpose",
    )
    p.set_defaults(func=cmd_proxy)
    inner = p.add_subparsers(dest="proxy_command")
    from advisor.proxy.keys_cli import add_keys_parser

    add_keys_parser(inner)
    r = inner.add_parser("report", help="write report.md / report.html / results.json of every session")
    r.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="proxy.yaml")
    r.add_argument("--out", type=Path, default=None, help="output folder (default: the sessions directory)")
    r.set_defaults(func=cmd_report)
