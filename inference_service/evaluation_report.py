"""An evaluation report (`inference_service.evaluate`) as Markdown: the tables that
docs/evaluation.md shows, the quality bars with their intervals, and the names of the metrics
a report holds."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from inference_service.metrics import reduction

# The metrics each block of a report holds, in the tables' order, and their column titles.
METRIC_NAMES = (
    "pa_mpjpe_mm",
    "mpjpe_mm",
    "mpjre_deg",
    "pa_mpjpe_mm_no_root",
    "mpjpe_mm_no_root",
    "mpjre_deg_no_root",
)
METRIC_LABELS = {
    "pa_mpjpe_mm": "PA-MPJPE (mm)",
    "mpjpe_mm": "MPJPE (mm)",
    "mpjre_deg": "MPJRE (°)",
    "pa_mpjpe_mm_no_root": "PA-MPJPE, no root",
    "mpjpe_mm_no_root": "MPJPE, no root",
    "mpjre_deg_no_root": "MPJRE, no root",
}


def _fmt(value: float, digits: int = 1) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def _pct(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f} %"


def _reduction_line(title: str, section: dict) -> str:
    reductions = section["reduction_vs_mean_pose"]
    return (
        f"{title}: "
        + ", ".join(f"{METRIC_LABELS[m]} {_pct(reductions[m])}" for m in METRIC_NAMES)
        + "."
    )


def _oracle_line(text: dict, oracle: str) -> str:
    overall = text["by_caption"]["all"]
    reductions = {m: reduction(overall[oracle][m], overall["mean_pose"][m]) for m in METRIC_NAMES}
    parts = (f"{METRIC_LABELS[m]} {_pct(reductions[m])}" for m in ("pa_mpjpe_mm", "mpjre_deg"))
    return "Its reduction vs the mean pose (all captions): " + ", ".join(parts) + "."


def figure_format(bar: dict) -> Callable[[float], str]:
    """How `bar`'s figures are written: reductions and accuracies in percent, distances in
    their unit."""
    name = bar["bar"]
    percent = "reduction" in name or "accuracy" in name or "left/right" in name
    return _pct if percent else _fmt


def _bars_table(bars: Sequence[dict]) -> list[str]:
    lines = [
        "### Quality bars",
        "",
        "| bar | value | 95 % interval | threshold | |",
        "|---|---|---|---|---|",
    ]
    for item in bars:
        show = figure_format(item)
        low, high = item.get("interval", (None, None))
        interval = f"{_pct(low)} – {_pct(high)}" if low is not None else ""
        lines.append(
            f"| {item['bar']} | {show(item['value'])} | {interval} | {show(item['threshold'])} | "
            f"{'pass' if item['pass'] else '**FAIL**'} |"
        )
    return lines


def _metrics_table(
    first: str, groups: Iterable[tuple[str, dict]], titles: dict[str, str]
) -> list[str]:
    """A table of the metrics of each predictor in `titles` that a group's block holds, the
    groups (label, block) one after the other."""
    lines = [
        f"| {first} | n | predictor | " + " | ".join(METRIC_LABELS[m] for m in METRIC_NAMES) + " |",
        "|---|---|---|" + "---|" * len(METRIC_NAMES),
    ]
    for label, block in groups:
        for key in [key for key in titles if key in block]:
            values = " | ".join(_fmt(block[key][m]) for m in METRIC_NAMES)
            lines.append(f"| {label} | {block['count']} | {titles[key]} | {values} |")
    return lines


def examples_markdown(report: dict) -> str:
    """An `evaluate_examples` report's tables as Markdown."""
    lines = [f"**Warning:** {warning}.\n" for warning in report["warnings"]]
    poses = report["poses"]
    without = report["without_pose"]
    skipped = f"; {without} examples without a pose left out" if without else ""
    lines += [f"### Poses ({poses['count']} in {report['examples']} examples{skipped})", ""]
    titles = {"model": "**model**", "tfidf": "TF-IDF retrieval", "mean_pose": "mean pose"}
    lines += _metrics_table("example kind", poses["by_kind"].items(), titles)
    lines += ["", _reduction_line("Reduction vs the mean pose (all poses)", poses), ""]
    lines += _bars_table(report["bars"])
    return "\n".join(lines) + "\n"


def markdown_summary(report: dict) -> str:
    """The report's tables as Markdown (what docs/evaluation.md shows)."""
    lines = [f"**Warning:** {warning}.\n" for warning in report.get("warnings", ())]
    text = report["text_to_pose"]
    lines += [f"### Text to pose ({report['split']} split, {text['count']} captions)", ""]
    titles = {
        "model": "**model**",
        "tfidf": "TF-IDF retrieval",
        "mean_pose": "mean pose",
        "action_oracle": "oracle: the action's mean pose",
        "caption_oracle": "oracle: the caption read perfectly",
    }
    kinds = (("all", "all"), ("action", "action phrasing"), ("auto", "automatic"))
    groups = [(label, text["by_caption"][kind]) for kind, label in kinds]
    lines += _metrics_table("caption kind", groups, titles)
    lines += [
        "",
        _reduction_line("Reduction vs the mean pose (all captions)", text),
        "",
        "The oracle knows which named action each pose comes from (a label no model sees, "
        "also for automatic captions of action poses) and answers that action's mean training "
        "pose, or the overall mean for poses of no action: a bound on how far the named "
        "actions let a predictor go below the mean pose. " + _oracle_line(text, "action_oracle"),
        "",
    ]
    if "caption_oracle" in text["by_caption"]["all"]:
        lines += [
            "The caption oracle reads every caption perfectly: the action oracle on the action "
            "phrasings, and on the automatic captions the mean of many sample poses with the "
            "same caption facts (`baselines.CaptionOracle`): a ceiling for any model of these "
            "captions. " + _oracle_line(text, "caption_oracle"),
            "",
        ]
    # Asked of the train split, the phrasings and poses are the ones the model trained on.
    held_out = "training" if report["split"] == "train" else "held-out"
    para = report["paraphrases"]
    lines += [
        f"### Paraphrases ({para['count']} {held_out} prompts of {para['actions']} named actions)",
        "",
        "| predictor | top-1 action accuracy |",
        "|---|---|",
        f"| **model** | {_pct(para['top1']['model'])} (each phrasing once: "
        f"{_pct(para['top1_per_phrasing'])}) |",
        f"| TF-IDF retrieval | {_pct(para['top1']['tfidf'])} |",
        f"| mean pose | {_pct(para['top1']['mean_pose'])} |",
        f"| chance | {_pct(para['chance'])} |",
        f"| oracle (a true pose of the action) | {_pct(para['top1']['oracle'])} |",
        "",
    ]
    if para["confusions"]:
        top = list(para["confusions"].items())[:6]
        lines += ["Most frequent confusions: " + "; ".join(f"{k} ({v})" for k, v in top) + ".", ""]
    if "images" in report:
        images = report["images"]
        lines += [
            f"### Mannequin images ({images['count']} {held_out} poses, random cameras)",
            "",
            "| predictor | " + " | ".join(METRIC_LABELS[m] for m in METRIC_NAMES) + " |",
            "|---|" + "---|" * len(METRIC_NAMES),
        ]
        for key in ("model", "mean_pose"):
            values = " | ".join(_fmt(images[key][m]) for m in METRIC_NAMES)
            lines.append(f"| {titles[key]} | {values} |")
        lines += [
            "",
            _reduction_line("Reduction vs the mean pose", images),
            "",
        ]
    lr = report["left_right"]
    lines += [
        "### Left and right",
        "",
        "| input | n | model | TF-IDF retrieval | oracle |",
        "|---|---|---|---|---|",
    ]
    for key, label in (("text", f"text ({held_out} phrasings)"), ("images", "images")):
        if key in lr:
            block = lr[key]
            lines.append(
                f"| {label} | {block['count']} | {_pct(block['model'])} | "
                f"{_pct(block.get('tfidf', math.nan))} | {_pct(block['oracle'])} |"
            )
    lines += ["", "Per action pair (model, text / images):", ""]
    lines += ["| pair | text | images |", "|---|---|---|"]
    image_pairs = lr.get("images", {}).get("per_pair", {})
    for pair, value in lr["text"]["per_pair"].items():
        lines.append(f"| {pair} | {_pct(value)} | {_pct(image_pairs.get(pair, math.nan))} |")
    lines += ["", *_bars_table(report["bars"])]
    above = [item for item in report["bars"] if item.get("ceiling", math.inf) < item["threshold"]]
    if above:
        lines += [
            "",
            "Above the caption oracle's ceiling, so out of reach of any model of these captions: "
            + "; ".join(f"{item['bar']} (ceiling {_pct(item['ceiling'])})" for item in above)
            + ".",
        ]
    return "\n".join(lines) + "\n"


def report_markdown(report: dict) -> str:
    """A report (`evaluate` or `evaluate_examples`) as Markdown: what it measured, then its
    tables."""
    tables = markdown_summary(report) if "text_to_pose" in report else examples_markdown(report)
    return f"{_measured_line(report)}\n\n{tables}"


def _measured_line(report: dict) -> str:
    """What a report measured, as the first line of its Markdown."""
    if "poses" in report:  # evaluate_examples'
        limit = f", its first {report['limit']} examples" if report["limit"] else ""
        fit = f"`{report['fit']}`" if report["fit"] else "the scored poses themselves"
        return (
            f"Checkpoint `{report['checkpoint']}` on `{report['data']}`{limit}, the baselines "
            f"fitted on {fit}; device {report['device']}, {report['date']}."
        )
    limit = f", its first {report['limit']} records" if report["limit"] else ""
    pairs = f" and the image pairs {report['pairs']}" if report["pairs"] else ""
    return (
        f"Checkpoint `{report['checkpoint']}` on the {report['split']} split of "
        f"`{report['corpus']}`{limit}{pairs}; device {report['device']}, {report['date']}."
    )
