"""Convert a released CropFormer / Mask2Former checkpoint (qqlu/Entity) for entityseg.

``python -m entityseg.convert_release SRC.pth|SRC.pkl CONFIG.yaml OUT.ckpt`` writes a checkpoint
that ``predict``, ``evaluate`` (``ckpt_path=OUT.ckpt``) and fine-tuning (``model.init_from=``)
use as it is: the network's configuration, read from the release's yaml, is stored inside.
Any tensor that does not map is listed in one error line and nothing is written.
"""

from __future__ import annotations

import argparse
import sys

from entityseg.interop.release import ReleaseConversionError, convert_release


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m entityseg.convert_release", description=__doc__.splitlines()[0]
    )
    parser.add_argument("weights", help="release checkpoint: model_final.pth or a detectron2 .pkl")
    parser.add_argument("config", help="the detectron2 config.yaml it was trained from")
    parser.add_argument("out", help="entityseg checkpoint to write (.ckpt)")
    args = parser.parse_args(argv)
    try:
        summary = convert_release(args.weights, args.config, args.out)
    except ReleaseConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kind = "backbone only" if summary["backbone_only"] else summary["architecture"]
    print(
        f"wrote {args.out}: {summary['tensors']} tensors, {summary['values'] / 1e6:.1f} M values "
        f"({kind}, backbone {summary['backbone']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
