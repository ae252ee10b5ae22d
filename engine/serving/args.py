"""`advisor serve`'s arguments (apart from the server, so `advisor --help` needs neither torch nor uvicorn)."""

from __future__ import annotations

import argparse


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a checkpoint directory or a shipped model name (step-nano, ...)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument(
        "--api-key",
        default=None,
        help="every route but /health needs Authorization: Bearer KEY (default: $ADVISOR_API_KEY)",
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="listen beyond loopback (--host) with no API key, on purpose",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences in one batch (default: 64)")
    p.add_argument("--kv-blocks", type=int, default=None, help="KV pool size in blocks of 16 tokens")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the config's)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL)")
    p.add_argument(
        "--speculative",
        choices=["mtp", "off"],
        default="off",
        help="speculative decoding: mtp drafts with the checkpoint's MTP layers (default: off)",
    )
    p.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="drafts per verify step with --speculative mtp (default: all the MTP layers)",
    )
