"""``sgl-kvext``: prepare the embedded model, check a config, run the demo."""

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
    from sgl_kvext.harness.demo import run_demo

    if args.questions < 2 or args.records < 8:
        raise ConfigError("demo needs --questions >= 2 and --records >= 8")
    model_path = args.model_path or prepare_smollm2().path
    run_demo(model_path, args.out, records=args.records, questions=args.questions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
