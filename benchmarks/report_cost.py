"""Cost of ``report.html`` on the demo run, and screenshots of it in headless Chromium.

Runs ``tiahnm run --demo`` (the full demo) into OUT (``--runs`` times, from scratch),
then reads from each run:

* the wall time of the whole run (``run_pipeline``, data drawing included),
* the time ``write_html_report`` took inside it (``report_files/timings.json``),
* the report folder's size;

then re-times ``write_html_report`` on the finished run (``--repeats``, interleaved
with re-timing ``write_report`` (report.md) as a reference), and with ``--screenshots
DIR`` saves screenshots of the page (overview, viewer zoomed in on a tumour slide,
a gallery, the mined galleries) with Debian's chromium + chromedriver.

    python benchmarks/report_cost.py --output-path /tmp/demo --runs 2 \
        --screenshots docs/img --json benchmarks/results/report_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-path", required=True, type=Path)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="Demo runs from scratch (OUT/run<i>); each gives its own share.",
    )
    p.add_argument("--screenshots", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--screenshots-only",
        action="store_true",
        help="Only take the screenshots of the finished run in --output-path.",
    )
    return p.parse_args()


def folder_size(path: Path) -> tuple[int, int]:
    """``(bytes, files)`` under ``path``."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def screenshots(run: Path, out: Path) -> dict[str, str]:
    """Overview, zoomed viewer, a gallery and the mined galleries as PNGs."""
    from tests.evaluation import browser

    out.mkdir(parents=True, exist_ok=True)
    shots = {}
    with browser.chromium(1280, 1000) as d:
        d.get((run / "report.html").resolve().as_uri())
        browser.wait_for(d, "window.tiahnmProbe && window.tiahnmProbe.opened >= 1")
        browser.wait_for(d, "window.tiahnmViewer.world.getItemAt(0).getFullyLoaded()")
        d.save_screenshot(str(out / "report_overview.png"))
        shots["overview"] = "report_overview.png"
        # a tumour slide, zoomed in on its highest-scoring patch
        idx = d.execute_script(
            "var s = window.TIAHNM_REPORT.slides;"
            "for (var i = 0; i < s.length; i++) {"
            "  if (s[i].title.indexOf('label tumour') >= 0) { return i; } } return 0;"
        )
        d.execute_script("window.tiahnmOpenSlide(arguments[0]);", idx)
        browser.wait_for(d, "window.tiahnmProbe.opened >= 2")
        browser.wait_for(d, "window.tiahnmViewer.world.getItemAt(0).getFullyLoaded()")
        before = d.execute_script("return window.tiahnmProbe.maxLevel;")
        d.execute_script(
            "var s = window.TIAHNM_REPORT.slides[arguments[0]], g = s.grid, W = s.level0[0];"
            "var best = -1e9, at = 0; g.values.forEach(function (v, i) {"
            "  if (v !== null && v > best) { best = v; at = i; } });"
            "var cx = g.x + ((at % g.cols) + 0.5) * g.w / g.cols;"
            "var cy = g.y + (Math.floor(at / g.cols) + 0.5) * g.h / g.rows;"
            "var v = window.tiahnmViewer;"
            "v.viewport.zoomTo(3, new OpenSeadragon.Point(cx / W, cy / W), true);"
            "v.viewport.panTo(new OpenSeadragon.Point(cx / W, cy / W), true);",
            idx,
        )
        browser.wait_for(d, f"window.tiahnmProbe.maxLevel > {before}")
        browser.wait_for(d, "window.tiahnmViewer.world.getItemAt(0).getFullyLoaded()")
        time.sleep(0.5)
        el = d.find_element("id", "viewer-section")
        d.execute_script("arguments[0].scrollIntoView();", el)
        el.screenshot(str(out / "report_viewer_zoomed.png"))
        shots["viewer_zoomed"] = "report_viewer_zoomed.png"
        gal = d.execute_script(
            "var ds = document.querySelectorAll('#galleries details');"
            "for (var i = 0; i < ds.length; i++) {"
            "  if (ds[i].textContent.indexOf('label tumour') >= 0) {"
            "    ds[i].open = true; ds[i].scrollIntoView(); return ds[i]; } }"
        )
        time.sleep(1.0)  # lazy images
        gal.screenshot(str(out / "report_gallery.png"))
        shots["gallery"] = "report_gallery.png"
        mined = d.find_element("id", "mined")
        d.execute_script("arguments[0].scrollIntoView();", mined)
        time.sleep(0.3)
        mined.screenshot(str(out / "report_mined.png"))
        shots["mined"] = "report_mined.png"
        errors = browser.console_errors(d)
    shots["console_errors"] = errors
    return shots


def cutoffs(run: Path) -> list[dict]:
    """Per test slide: patches painted (and tumour patches among them) per cut-off.

    Cut-offs from the fold's validation reference: the 95th and 99th percentiles and
    the highest score of the negative validation slides' patches (the default).
    """
    import numpy as np

    from tiahnm.evaluation.reference import parse_reference
    from tiahnm.evaluation.scores import find_score_files, read_instance_scores

    rows = []
    for path in find_score_files(run):
        slides, attrs = read_instance_scores(path)
        ref = parse_reference(attrs.get("val_reference"))
        if ref is None:
            continue
        for s in slides:
            sc = s.scores.astype(np.float64)
            row = {"fold": path.parent.name, "slide": s.slide_id, "label": s.label}
            row["n_patches"] = int(sc.size)
            tumour = s.instance_labels == 1 if s.instance_labels is not None else None
            row["n_tumour_patches"] = None if tumour is None else int(tumour.sum())
            for q in (95, 99, 100):
                painted = sc > ref["negative"][q]
                row[f"painted_q{q}"] = round(float(painted.mean()), 3)
                if tumour is not None:
                    row[f"tumour_painted_q{q}"] = int((painted & tumour).sum())
            rows.append(row)
    return rows


def main() -> None:
    """Run the demo, time the report, write the JSON."""
    args = parse_args()
    import torch

    from tiahnm.config import load_config
    from tiahnm.demo import prepare_demo
    from tiahnm.evaluation.html_report import write_html_report
    from tiahnm.evaluation.report import load_run, write_report
    from tiahnm.pipeline import run_pipeline

    run = args.output_path
    if args.screenshots_only:
        print(screenshots(run, args.screenshots or Path()))
        return
    runs = []
    for i in range(args.runs):
        folder = run / f"run{i}" if args.runs > 1 else run
        t0 = time.perf_counter()
        config_path, _ = prepare_demo(folder)
        result = run_pipeline(load_config(config_path))
        run_s = time.perf_counter() - t0
        inside = json.loads((folder / "report_files" / "timings.json").read_text())
        stages = json.loads((folder / "stages.json").read_text())["stages"]
        runs.append(
            {
                "run_seconds": round(run_s, 2),
                "stage_seconds": {k: v.get("seconds") for k, v in stages.items()},
                "report_html_seconds_in_run": inside,
                "report_html_fraction_of_run": round(inside["total"] / run_s, 4),
            }
        )
    run = folder
    html_s, md_s = [], []
    for _ in range(args.repeats):  # interleaved
        t = time.perf_counter()
        write_html_report(run)
        html_s.append(time.perf_counter() - t)
        summary, folds = load_run(run)
        t = time.perf_counter()
        write_report(run, summary, folds)
        md_s.append(time.perf_counter() - t)
    size, n_files = folder_size(run / "report_files")
    gal_size, gal_files = folder_size(run / "galleries")
    doc = {
        "argv": sys.argv,
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        "runs": runs,
        "report_html_fraction_of_run": [r["report_html_fraction_of_run"] for r in runs],
        "report_html_seconds_rerun": [round(v, 3) for v in html_s],
        "report_md_seconds_rerun": [round(v, 3) for v in md_s],
        "report_files": {"bytes": size, "files": n_files},
        "galleries": {"bytes": gal_size, "files": gal_files},
        "n_test_slides": len(
            json.loads(
                (run / "report_files" / "data.js")
                .read_text()
                .split("= ", 1)[1]
                .rstrip(";\n")
            )["slides"]
        ),
        "exit_code": result.exit_code,
        "versions": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "openseadragon": "6.1.1",
        },
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
    }
    doc["cutoffs"] = cutoffs(run)
    if args.screenshots:
        doc["screenshots"] = screenshots(run, args.screenshots)
    print(json.dumps(doc, indent=2))
    if args.json:
        from tiahnm.utils.provenance import write_result

        write_result(args.json, doc)


if __name__ == "__main__":
    main()
