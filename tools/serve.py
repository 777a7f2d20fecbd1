"""`pangu serve MODEL`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import replace
from pathlib import Path

from . import tensor_parallel


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over OpenAI's HTTP API (continuous batching)")
    p.add_argument("model", help="model folder or preset name (random weights)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | npu | auto (default cpu)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored; fp32 for presets)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed for a preset's random weights")
    p.add_argument("--scheme", default=None, help="quantize on load: int8 | int4 | fp16 | bf16")
    p.add_argument("--draft", default=None, metavar="PATH|self|lookup",
                   help="decode speculatively, as `pangu generate --draft`: a draft model folder, 'self' / 'self:N', "
                        "'lookup' / 'lookup:N', or 'lookup+' before a folder or self")
    p.add_argument("--k", type=int, default=4, help="tokens drafted per decoding row and step (default 4)")
    p.add_argument("--draft-dtype", default=None, help="dtype of a draft model (default: --dtype, else as stored)")
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: MODEL's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed when ready)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--max-batch", type=int, default=16, help="KV-cache slots: requests decoded together")
    p.add_argument("--max-len", type=int, default=None, help="prompt + max_tokens of a request at most "
                                                             "(default: the context, less 2 when batch-invariant)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens a request prefills per step")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--queue-timeout", type=float, default=None, help="seconds a request may wait for a slot (503)")
    p.add_argument("--prefix-cache", type=int, default=2048,
                   help="prompt positions the prefix cache holds (default 2048; 0 turns it off)")
    p.add_argument("--no-invariant", action="store_true",
                   help="faster steps whose last bits may depend on the batch (see docs/serve.md)")
    p.add_argument("--seed", type=int, default=0, help="seeds the seeds of requests that bring none")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; "
                                                             "with --tp, per rank: the cores shared out)")
    tensor_parallel.add_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.tp > 1 and not tensor_parallel.is_rank():
        return tensor_parallel.start(args, threads=args.threads)  # N ranks; rank 0 serves, the rest follow
    import uvicorn

    from pangu_fn.serve.app import ServerOptions, create_app
    from pangu_fn.serve.engine import EngineSettings

    from .common import resolve_model

    def load():
        import pangu_fn as pf
        from pangu_fn.serve.app import Served
        from pangu_fn.serve.chat import ChatTemplate, chat_template_for
        from pangu_fn.tokenizer import find_tokenizer, load_tokenizer

        if args.tp > 1:
            params, cfg, _ = tensor_parallel.rank_model(args)
        else:
            params, cfg, _ = resolve_model(args.model, args.device, args.dtype, args.weights_seed)
        if args.scheme:
            params = pf.quantize(params, pf.QuantRecipe(scheme=args.scheme), cfg)
        folder = Path(args.model) if Path(args.model).is_dir() else None
        tok = load_tokenizer(folder) if folder is not None and find_tokenizer(folder) is not None else None
        template = None
        if tok is not None:
            template = ChatTemplate(chat_template_for(folder, tok), bos_token=_piece(tok, tok.bos_id),
                                    eos_token=_piece(tok, tok.eos_id))
        drafter = None
        if args.draft:
            from pangu_fn.speculative import load_drafter

            drafter = load_drafter(args.draft, params["tok_embed"]["weight"].device, args.draft_dtype or args.dtype)
        return Served(name, params, cfg, tok, template, drafter, args.k)

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    name = args.served_model_name or (Path(args.model).name if Path(args.model).exists() else args.model)
    settings = EngineSettings(args.max_batch, args.max_len, args.prefill_chunk, args.max_queue,
                              args.prefix_cache, not args.no_invariant)
    ready, failed = threading.Event(), []

    def on_ready(error: Exception | None) -> None:
        if error is not None:
            failed.append(error)
            server.should_exit = True
        ready.set()

    options = ServerOptions(settings, args.api_key, args.queue_timeout, args.seed)
    if args.tp > 1:
        from pangu_fn.serve import tensor_parallel as mirrored

        if not tensor_parallel.is_lead():
            mirrored.follow_served(load(), options)
            return 0
        options = replace(options, runner=mirrored.MirroredRunner)
    app = create_app(load, options, on_ready)
    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:  # SIGINT / SIGTERM: end open streams, then stop
            app.state.stop_engine()
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a clean shutdown exits 0 (uvicorn would re-raise the signal)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                   timeout_graceful_shutdown=5))

    def announce() -> None:
        ready.wait()
        while not failed and not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started and not failed:
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            print(f"pangu serve: {name} ready at http://{host}:{port}/v1", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run()
    if failed:
        raise failed[0]  # printed on one line by the CLI (exit 2) when it is a PanguError
    print("pangu serve: stopped", file=sys.stderr)
    return 0


def _piece(tok, token_id: int | None) -> str:
    return "" if token_id is None or not hasattr(tok, "sp") else tok.sp.id_to_piece(token_id)
