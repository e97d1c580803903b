"""The `treadle` console script: `treadle serve` loads a model and serves the OpenAI API over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys

from . import bench_serve
from .serve_config import API_KEY_ENV, ConfigError, ServeConfig, build_serve_config

log = logging.getLogger("treadle.server")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """Flags default to None so that only the ones given override configs/<device>.yaml and --config."""
    p.add_argument("--model", help="GGUF file or HF-style directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--config", metavar="YAML", help="a YAML file of options (the keys of configs/cpu.yaml)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on; 0 picks a free one (default 8000)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available); picks configs/<device>.yaml")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights and KV-cache dtype")
    p.add_argument("--served-model-name", help="the model name clients send (default: derived from the file)")
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer <key>' on every route but /health "
                                     f"(default: ${API_KEY_ENV})")
    p.add_argument("--page-size", type=int, help="tokens per KV-cache page")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument("--num-pages", type=int, help="KV-cache pages, overriding the size options below")
    pool.add_argument("--kv-cache-gb", type=float, help="KV-cache size in GiB (CPU)")
    pool.add_argument("--kv-memory-fraction", type=float, help="share of free GPU memory for the KV cache (CUDA)")
    p.add_argument("--max-num-seqs", type=int, help="sequences in a running batch at most")
    p.add_argument("--max-num-batched-tokens", type=int, help="tokens in one forward pass at most (prefill chunk)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--max-waiting-requests", type=int, help="queued requests before new ones get 429")
    p.add_argument("--max-logprobs", type=int, help="largest top_logprobs a request may ask for")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_const", const=False,
                   help="do not reuse the KV of shared prompt prefixes")
    p.add_argument("--seed", type=int, help="seed of the sampler for requests that send none")
    p.add_argument("--tool-call-parser", choices=["hermes", "llama3_json", "mistral"],
                   help="the model's tool-call format (default: recognised from the chat template, else hermes)")
    p.add_argument("--grammar-compile-timeout", type=float, metavar="SECONDS",
                   help="compile budget of a request's structured-output grammar; over it the request gets a 400 "
                        "(default 5)")
    p.add_argument("--quantization", choices=["wNa16"],
                   help="quantize the linear layers' weights to --bits bits at load time (activations stay 16-bit)")
    p.add_argument("--bits", dest="quant_bits", type=int, choices=[2, 3, 4, 5, 6, 8], help="N of wNa16 (default 4)")
    p.add_argument("--quant-group-size", type=int, help="weights sharing one scale and zero point (default 128)")
    p.add_argument("--grammar-workers", type=int, metavar="N",
                   help="processes that build structured-output token masks beside the engine; 0 = a thread of the "
                        "server (default: 4 on cuda, 0 on cpu)")
    p.add_argument("--num-threads", type=int, help="torch threads on CPU (default: all cores)")
    p.add_argument("--weights-cache-dir", help="where converted weights are cached (default ~/.cache/treadle)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--uvicorn-log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's own logging; 'info' adds an access log line per request")


_NOT_CONFIG = {"command", "config", "log_level", "uvicorn_log_level"}


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
    return build_serve_config(flags, args.config)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _serve(server, sock: socket.socket, banner: str) -> bool:
    """Run uvicorn on `sock`, printing the banner once it accepts requests; False if startup failed."""
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        print(banner, flush=True)
    await task
    return server.started


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from treadle.engine.async_engine import AsyncEngine

    from .app import build_app

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    cfg = serve_config_from_args(args)
    try:
        engine = AsyncEngine(cfg.engine, progress=True, multiverse_tags=cfg.multiverse_tags)
    except (OSError, ValueError) as exc:
        print(f"treadle: error: cannot load the model: {exc}", file=sys.stderr)
        return 1
    try:
        sock = socket.create_server((cfg.host, cfg.port), family=socket.AF_INET6 if ":" in cfg.host else
                                    socket.AF_INET)
    except OSError as exc:
        print(f"treadle: error: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    app = build_app(engine, api_key=cfg.api_key, max_logprobs=cfg.engine.max_logprobs,
                    tool_call_parser=cfg.tool_call_parser, grammar_compile_timeout=cfg.grammar_compile_timeout,
                    parallel=cfg.parallel)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=5))
    banner = f"treadle: serving {engine.model_name} on {_url(cfg.host, port)} (OpenAI API at /v1)"
    if cfg.api_key:
        banner += "; API key required"
    return 0 if asyncio.run(_serve(server, sock, banner)) else 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treadle", description="An OpenAI-compatible LLM serving engine.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(commands.add_parser("serve", help="serve a model over the OpenAI API",
                                            description="Serve a model over the OpenAI API. Defaults come from "
                                            "configs/cpu.yaml or configs/cuda.yaml (by --device), then --config, "
                                            "then these flags."))
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    bench_serve.add_arguments(bench.add_parser("serve", help="load-test an OpenAI-compatible server",
                                               description="Load-test an OpenAI-compatible server with streaming "
                                               "requests; metrics as vLLM's bench serve defines them."))
    kernels = commands.add_parser("kernels", help="GPU kernel registry").add_subparsers(dest="kernels_command",
                                                                                      required=True)
    kernels.add_parser("bench", help="evaluate every kernel solution on every workload (treadle kernels bench "
                                     "--help lists its options)", add_help=False)
    return parser


def kernels_bench(argv: list[str]) -> int:
    """Imported only when asked for: the kernel registry needs torch and triton, which serving on CPU does not."""
    from treadle.kernels import bench_cli

    parser = argparse.ArgumentParser(prog="treadle kernels bench", description=bench_cli.__doc__.splitlines()[0])
    bench_cli.add_arguments(parser)
    return bench_cli.main(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["kernels", "bench"]:
        return kernels_bench(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_serve.main(args)
    try:
        return serve(args)
    except ConfigError as exc:
        print(f"treadle serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
