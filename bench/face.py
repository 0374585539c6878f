"""The held-out figures inside the face (issue 20): `pvp eval --mask face` on a bench/prior.py fit — PSNR, SSIM
and the sharpness ratio over each frame's face (the landmarks' convex hull: no hair, neck or background), the
probes' sharpness over the region most training frames' faces cover — as bench/prior.py's rows.

    python bench/face.py [--preset tiny] [--clips lp_d3 lp_d12] [--variant preset]

Writes bench/results/face_<preset>.json (a rerun replaces its clips' rows of that variant). An evaluation already
in the fit's eval_face/ is read, not run again.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import (  # noqa: E402
    RESULTS,
    evaluate,
    fitted_avatar_args,
    held_out_split,
    kept_rows,
    print_table,
    write_results,
)
from bench.prior import COLUMNS, DATA, machine, score  # noqa: E402


def main(argv=None):
    args = fitted_avatar_args(__doc__, "preset", argv)
    os.chdir(ROOT)
    out_json = args.out or RESULTS / f"face_{args.preset}.json"
    rows = kept_rows(out_json, args)
    for clip in args.clips:
        video = DATA / f"{clip}.mp4"
        _, held_out = held_out_split(video)
        fit = args.work / args.preset / clip / args.variant
        earlier = fit / "eval_face" / "summary.json"
        summary = (json.loads(earlier.read_text()) if earlier.is_file()
                   else evaluate(fit, video, held_out, fit / "eval_face", "bench/face.py", "--mask", "face"))
        for method, values in score(summary).items():
            rows.append({"clip": clip, "variant": args.variant, "held_out": held_out, "mask": "face",
                         "method": method, **values})
        write_results(f"face_{args.preset}", machine(), rows, out_json)
    print_table(rows, ["clip", "variant", "method", *COLUMNS, "sharpness_sweeps", "sharpness_recombined"])


if __name__ == "__main__":
    main()
