"""Speed and peak memory of segmenting one session at 512 x 512 x 60 (T1 + fluid).

The images are a phantom session rendered at 1 mm and resampled to 0.5 mm in-plane (speed does
not depend on the sub-voxel detail). Each measurement runs `python -m pipeline.segment` in a
fresh process under /usr/bin/time, so imports and peak RSS are counted as in the workflow.

    python benchmarks/segment_speed.py [--work DIR] [--shrink 4]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.validation import phantom


def make_images(work: Path, n: int, slices: int) -> tuple[Path, Path]:
    spec = phantom.PhantomSpec(pixel_mm=1.0, slice_mm=4.0, n_slices=slices, matrix=(256, 256),
                               supersample_xy=1, supersample_z=2,
                               sessions=(phantom.SessionSpec(day=0, swelling=0.15, lesion_ml=6,
                                                             edema=0.6),))
    rendered = phantom.render_session(spec, spec.sessions[0])
    images = phantom.synthesize(spec, rendered, np.random.default_rng(0))
    paths = []
    for key in ("T1w", "STIR"):
        img = phantom.to_sitk(images[key].astype(np.float32), rendered["grid"])
        ref = sitk.Image([n, n, slices], sitk.sitkFloat32)
        ref.SetSpacing((256.0 / n, 256.0 / n, 4.0))
        ref.SetDirection(img.GetDirection())
        corner = -0.5 + 128.0 / n  # first fine voxel centre, in coarse voxel units
        ref.SetOrigin(img.TransformContinuousIndexToPhysicalPoint((corner, corner, 0)))
        big = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        path = work / f"{key}.nii"
        sitk.WriteImage(big, str(path))
        paths.append(path)
    return paths[0], paths[1]


def run(t1: Path, fluid: Path, work: Path, settings: dict[str, object]) -> dict[str, object]:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "pipeline.segment", "--t1", str(t1),
           "--fluid", str(fluid), "--out", str(work / "dseg.nii.gz"), "--qc",
           str(work / "qc.json"), "--settings-json", json.dumps(settings)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    assert wall is not None
    h, m, s = wall.groups()
    seconds = (int(h or 0) * 60 + int(m)) * 60 + float(s)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    qc = json.loads((work / "qc.json").read_text())
    return {"wall_s": seconds, "peak_rss_mb": rss / 1024, **qc["seconds"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=60)
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="limbtrack-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    t1, fluid = make_images(work, args.size, args.slices)
    print("| image | N4 shrink | wall s | N4 s | segment s | rest (I/O, imports) s | "
          "peak RSS MB |\n|---|---|---|---|---|---|---|")
    for shrink in (4, 8):
        r = run(t1, fluid, work, {"n4_shrink": shrink})
        rest = r["wall_s"] - r["n4"] - r["segment"]
        print(f"| {args.size}x{args.size}x{args.slices} x2 | {shrink} | {r['wall_s']:.1f} | "
              f"{r['n4']:.1f} | {r['segment']:.1f} | {rest:.1f} | {r['peak_rss_mb']:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
