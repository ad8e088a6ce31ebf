"""prepare: turn a raw release into the R2Gen layout every entry point reads as `data`.

Reads: IU X-Ray (Open-i's `ecgen-radiology` XML reports, `NLMCXR_png` films) or MIMIC-CXR (the
report files, MIMIC-CXR-JPG's film tree, metadata and split CSVs). Writes into `--out`:
`annotation.json`, `left_out.csv` (each study left out, with its reason),
`prepare_summary.json`, and `images/` (a link to the release's films by default). Prints the
summary: studies per split, studies left out and why, the labels of the kept reports. No
MLflow run: the output is a data folder, which the training runs record as their `data`.
"""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.data.prepare import (FALLBACKS, IMAGE_MODES, format_summary, prepare_iu_xray,
                                   prepare_mimic_cxr, write_prepared)
from steps.common import one_line_errors

_FOLDER = click.Path(file_okay=False)


def _common(func):
    """The options both releases take."""
    for option in reversed([
            click.option("--reports", required=True, type=_FOLDER,
                         help="the report files' folder"),
            click.option("--images", required=True, type=_FOLDER, help="the films' folder"),
            click.option("--out", required=True, type=_FOLDER, help="the folder to write"),
            click.option("--fallback", type=click.Choice(FALLBACKS), default="none",
                         show_default=True,
                         help="impression: use the impression when a study has no findings"),
            click.option("--image_mode", "--image-mode", type=click.Choice(IMAGE_MODES),
                         default="link", show_default=True,
                         help="out/images: a link to --images, a copy of the films used, or "
                              "none (then pass image_dir when training)")]):
        func = option(func)
    return func


def _finish(prepared, out, image_mode) -> None:
    summary = write_prepared(prepared, out, image_mode)
    click.echo(format_summary(summary, Path(out)))


@click.group()
def main():
    """Write annotation.json (R2Gen layout) from a raw release.

    \b
    prepare iu-xray   --reports DIR --images DIR --out DIR [--fallback] [--min_views] [--seed]
    prepare mimic-cxr --reports DIR --images DIR --metadata CSV --split CSV --out DIR
    Both: --fallback none|impression, --image_mode link|copy|none.
    """


@main.command("iu-xray")
@_common
@click.option("--min_views", "--min-views", default=2, show_default=True,
              help="views a study needs (R2Gen: 2)")
@click.option("--seed", default=0, show_default=True, help="the 7:1:2 split's shuffle")
@one_line_errors
def iu_xray(reports, images, out, fallback, image_mode, min_views, seed):
    """IU X-Ray: Open-i's XML reports and PNG films; R2Gen's 7:1:2 seeded split."""
    prepared = prepare_iu_xray(reports, images, fallback=fallback, min_views=min_views,
                               seed=seed)
    _finish(prepared, out, image_mode)


@main.command("mimic-cxr")
@_common
@click.option("--metadata", required=True, type=click.Path(dir_okay=False),
              help="mimic-cxr-2.0.0-metadata.csv")
@click.option("--split", "split_csv", required=True, type=click.Path(dir_okay=False),
              help="mimic-cxr-2.0.0-split.csv")
@one_line_errors
def mimic_cxr(reports, images, out, fallback, image_mode, metadata, split_csv):
    """MIMIC-CXR: report files, MIMIC-CXR-JPG films and CSVs; the official split."""
    prepared = prepare_mimic_cxr(reports, images, metadata, split_csv, fallback=fallback)
    _finish(prepared, out, image_mode)


if __name__ == "__main__":
    main()
