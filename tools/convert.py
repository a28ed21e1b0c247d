r"""JAX <-> PyTorch conversion of CLIPTeX models.

  # a run's checkpoint (latest, or --step) -> HF CLIPModel folder + task heads (+ open_clip file)
  python tools/convert.py export --workdir W [--step N] --out DIR [--open_clip FILE.safetensors]
  # a pre-trained CLIP (HF folder, OpenAI .pt, open_clip file) -> our params, for inspection
  python tools/convert.py import --source PATH --out params.npz|params.msgpack [--workdir W]
  # parity report: the run's checkpoint in JAX vs the exported folder in PyTorch
  python tools/convert.py check --workdir W --hf DIR [--step N] [--report parity.json]
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("EPATH_USE_TF", "false")  # gs:// workdirs: Orbax on gcsfs, as tools/train.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clipzoo_jax import cli  # noqa: E402

PARITY_TOLERANCE = 1e-4  # relative, fp32


def _tokenizer_dir(workdir: str, config) -> str | None:
  directory = config.get("tokenizer", {}).get("directory")
  if not directory:
    return None
  return directory if os.path.isabs(directory) else os.path.join(workdir, directory)


def _fp32(model_config):
  """Exported weights are float32 and parity is checked in float32, whatever the run used."""
  model_config = model_config.copy_and_resolve_references()
  model_config.dtype = "float32"
  return model_config


def export(args) -> dict:
  import jax
  from clipzoo_jax import checkpoint
  from clipzoo_jax import convert
  from clipzoo_jax.data import normalization
  params, config = checkpoint.restore_params(args.workdir, args.step)
  if jax.process_index() != 0:
    return {}
  files = convert.export_pretrained(
      params, _fp32(config.model), args.out, image_mean=normalization.CLIP_MEAN,
      image_std=normalization.CLIP_STD, tokenizer_dir=_tokenizer_dir(args.workdir, config),
      open_clip_path=args.open_clip)
  report = {"out": args.out, "files": files, "open_clip": args.open_clip}
  if "logit_bias" in params:  # SigLIP-trained: CLIPModel has no bias, config.json keeps it
    report["logit_bias"] = float(params["logit_bias"])
    report["note"] = ("config.json holds logit_bias: CLIPModel's logits_per_image leave it out; "
                      "SigLIP's sigmoid logits are logits_per_image + config.logit_bias")
  return report


def import_(args) -> dict:
  import numpy as np
  from clipzoo_jax import checkpoint
  from clipzoo_jax import convert
  from clipzoo_jax.convert import layout
  tokenizer_dir = None
  if args.workdir:
    config = checkpoint.load_config(args.workdir)
    model_config, tokenizer_dir = config.model, _tokenizer_dir(args.workdir, config)
    tokenizer_dir = tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir) else None
  else:
    model_config = convert.model_config_from_source(args.source, args.format)
  model_config.scan_layers = bool(args.scan or model_config.get("scan_layers"))
  params = convert.load_pretrained(args.source, model_config, args.format, tokenizer_dir)
  flat = layout.flatten(params)
  if args.out.endswith(".npz"):
    np.savez(args.out, **flat)
  elif args.out.endswith(".msgpack"):
    from flax import serialization
    with open(args.out, "wb") as f:
      f.write(serialization.msgpack_serialize(params))
  else:
    raise SystemExit(f"--out {args.out}: expected a .npz or .msgpack path")
  return {"out": args.out, "num_params": int(sum(v.size for v in flat.values())),
          "model_config": json.loads(model_config.to_json_best_effort())}


def check(args) -> dict:
  from clipzoo_jax import checkpoint
  from clipzoo_jax.convert import parity
  params, config = checkpoint.restore_params(args.workdir, args.step)
  errors = parity.compare(params, _fp32(config.model), args.hf, batch=args.batch)
  worst = max(errors.values())
  report = {"relative_errors": errors, "max": worst, "tolerance": args.tolerance,
            "ok": worst <= args.tolerance}
  if args.report:
    from clipzoo_jax import atomic_files
    atomic_files.write_text(args.report, json.dumps(report, indent=1) + "\n")
  return report


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("export", help="checkpoint -> HF CLIPModel folder + heads")
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="default: latest")
  p.add_argument("--out", required=True)
  p.add_argument("--open_clip", default=None, help="also write an open_clip state dict here")
  p = commands.add_parser("import", help="pre-trained CLIP -> our params (.npz/.msgpack)")
  p.add_argument("--source", required=True)
  p.add_argument("--format", default="auto", choices=("auto", "hf", "openai", "open_clip"))
  p.add_argument("--out", required=True)
  p.add_argument("--workdir", default=None, help="check against this run's model config")
  p.add_argument("--scan", action="store_true", help="write the scanned layout")
  p = commands.add_parser("check", help="parity of a checkpoint and an exported folder")
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--hf", required=True)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE)
  p.add_argument("--report", default=None, help="also write the parity report here (JSON)")
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse(argv)
  import transformers
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  report = {"export": export, "import": import_, "check": check}[args.command](args)
  print(json.dumps(report, indent=1))
  if args.command == "check" and not report["ok"]:
    raise SystemExit(f"parity check failed: max relative error {report['max']:.3g} > "
                     f"{args.tolerance}")
  return report


if __name__ == "__main__":
  cli.run_argparse(main)
