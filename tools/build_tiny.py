"""Writes a tiny random-weights model folder of one family (mfpruner_lib.tiny_models), no download.

    python -m tools.build_tiny OUT [--family llava-1.5] [--stock] [--clip-text] [--seed 0]

The folder loads like a hub repo (AutoModelForImageTextToText / AutoProcessor with
trust_remote_code=True): a local model to try the API and the drawings (docs/visualization.md).
"""

from __future__ import annotations

from mfpruner_lib.cli import ArgumentParser, refusals_as_errors
from mfpruner_lib.families import FAMILIES


@refusals_as_errors
def main(argv=None):
    parser = ArgumentParser(prog="python -m tools.build_tiny", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="output folder (replaced)")
    parser.add_argument("--family", choices=list(FAMILIES), default="llava-1.5")
    parser.add_argument("--stock", action="store_true", help="a stock checkpoint of the family (the export's input)")
    parser.add_argument("--clip-text", action="store_true", help="add a tiny CLIP text tower (LLaVA families)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    extra = {"clip_text": True} if args.clip_text else {}
    print(FAMILIES[args.family].build_tiny(args.path, stock=args.stock, seed=args.seed, **extra))


if __name__ == "__main__":
    main()
