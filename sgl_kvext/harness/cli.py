"""``sgl-kvext``: prepare the embedded model, check a config, run the demo or a fleet."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from sgl_kvext.config.settings import ConfigError, KVExtConfig
from sgl_kvext.harness.model_prep import (
    DTYPES,
    ModelPrepError,
    default_model_dir,
    prepare_smollm2,
    verify_checkpoint,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgl-kvext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="the embedded SmolLM2-135M-Instruct checkpoint")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    for name, text in (("prepare", "build (or reuse) the checkpoint and print its folder"),
                       ("path", "print the checkpoint folder if it is prepared and intact")):
        p = model_sub.add_parser(name, help=text)
        p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
        p.add_argument("--cache-dir", type=Path, default=None,
                       help="root cache folder (default $KVEXT_CACHE_DIR or ~/.cache/sgl_kvext)")
        if name == "prepare":
            p.add_argument("--force", action="store_true", help="rebuild even if verified")

    config = sub.add_parser("config", help="show the resolved configuration")
    config.add_argument("--config", type=Path, default=None, help="YAML config file")

    demo = sub.add_parser("demo", help="serve SmolLM2 with --enable-hierarchical-kv on this "
                                       "machine and show the cached-prefix speed-up")
    demo.add_argument("--model-path", type=Path, default=None,
                      help="checkpoint folder (default: the prepared SmolLM2)")
    demo.add_argument("--questions", type=int, default=4)
    demo.add_argument("--records", type=int, default=90, help="ledger lines in the context")
    demo.add_argument("--out", type=Path, default=Path("results"))

    fleet = sub.add_parser("fleet", help="N --enable-hierarchical-kv servers sharing one S3 "
                                         "prefix behind SGLang's router, on this machine, "
                                         "until Ctrl-C")
    fleet.add_argument("--servers", type=int, default=2)
    fleet.add_argument("--policy", default="cache_aware",
                       help="router policy: round_robin, cache_aware, random, power_of_two "
                       "(SGLang's router), tier_aware (sgl-kvext's lookup-based router)")
    fleet.add_argument("--model-path", type=Path, default=None,
                       help="checkpoint folder (default: the prepared SmolLM2)")
    fleet.add_argument("--s3-url", default=None,
                       help="shared s3://bucket/prefix (with --s3-endpoint and AWS_* "
                            "credentials); default: a SeaweedFS started here")
    fleet.add_argument("--s3-endpoint", default=None)
    fleet.add_argument("--log-dir", type=Path, default=Path("results/fleet"))
    fleet.add_argument("server_args", nargs=argparse.REMAINDER,
                       help="after --: flags for every server")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, ModelPrepError) as exc:
        print(f"sgl-kvext: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "model" and args.model_command == "prepare":
        prepared = prepare_smollm2(args.dtype, args.cache_dir, force=args.force)
        state = "verified, reused" if prepared.reused else "built and verified"
        print(f"{prepared.path}  ({state})", file=sys.stderr)
        print(prepared.path)
        return 0
    if args.command == "model":
        path = default_model_dir(args.dtype, args.cache_dir)
        problem = verify_checkpoint(path)
        if problem:
            print(f"sgl-kvext: not prepared: {problem}; run `sgl-kvext model prepare`",
                  file=sys.stderr)
            return 1
        print(path)
        return 0
    if args.command == "config":
        print(json.dumps(KVExtConfig.load(config_file=args.config).to_dict(), indent=2))
        return 0
    if args.command == "fleet":
        return _fleet(args)
    from sgl_kvext.harness.demo import run_demo

    if args.questions < 2 or args.records < 8:
        raise ConfigError("demo needs --questions >= 2 and --records >= 8")
    model_path = args.model_path or prepare_smollm2().path
    run_demo(model_path, args.out, records=args.records, questions=args.questions)
    return 0


def _one_machine_defaults(extra: Sequence[str], servers: int) -> list[str]:
    """Memory flags so ``servers`` servers fit one machine, unless ``extra`` sets them: each
    sizes its KV pool from a share of free memory (SGLang's default takes 72% per server, so
    a second one is killed for memory), and a 1 GiB host tier."""
    out: list[str] = []
    if "--mem-fraction-static" not in extra and "--max-total-tokens" not in extra:
        out += ["--mem-fraction-static", f"{0.5 / servers:.3f}"]
    if "--kvext-host-size" not in extra:
        out += ["--kvext-host-size", "1GiB"]
    return out


def _fleet(args: argparse.Namespace) -> int:
    """Serve a fleet until SIGINT / SIGTERM; every process is stopped by id on the way out."""
    import contextlib
    import signal
    import threading
    import uuid

    from sgl_kvext.harness.fleet import POLICIES, Fleet
    from sgl_kvext.harness.seaweedfs import SeaweedFS

    if args.servers < 1 or args.policy not in POLICIES:
        raise ConfigError(f"fleet needs --servers >= 1 and --policy one of {', '.join(POLICIES)}")
    extra = [a for a in args.server_args if a != "--"]
    model_path = args.model_path or prepare_smollm2().path
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        url, endpoint = args.s3_url, args.s3_endpoint
        if url is None:
            weed = stack.enter_context(SeaweedFS(args.log_dir / "seaweed",
                                                 log_path=args.log_dir / "seaweed.log"))
            url, endpoint = f"s3://kvext-fleet/{uuid.uuid4().hex[:8]}", weed.endpoint
            env = {"AWS_ACCESS_KEY_ID": weed.credentials["aws_access_key_id"],
                   "AWS_SECRET_ACCESS_KEY": weed.credentials["aws_secret_access_key"]}
        # wait_complete: S3 carries each user's history between the servers (docs/fleet.md);
        # flags after `--` come last, so they override it.
        server_args = ["--enable-hierarchical-kv", "--kvext-s3-url", url, "--enable-metrics",
                       "--kvext-prefetch-policy", "wait_complete",
                       *(["--kvext-s3-endpoint", endpoint] if endpoint else []),
                       *_one_machine_defaults(extra, args.servers), *extra]
        fleet = stack.enter_context(Fleet(model_path, args.servers, server_args,
                                          log_dir=args.log_dir, policy=args.policy, env=env))
        print(f"router {fleet.url} ({args.policy}) -> "
              f"{', '.join(s.url for s in fleet.servers)}; S3 {url}; Ctrl-C stops all",
              flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
