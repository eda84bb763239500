"""The run summary Prefect shows as the ``build-prefs-summary`` markdown artifact."""

from __future__ import annotations

from typing import Any

from steps.publish.release import funnel_steps


def summary_markdown(output: str, manifest: dict[str, Any]) -> str:
    """The card's headline numbers for the Prefect UI: funnel, drops per stage, length bias, label quality."""
    stages = manifest["stats"]["stages"]
    kept = manifest["splits"].get("train", 0)
    lines = [
        f"# Preference dataset `{manifest['recipe']['name']}`",
        "",
        f"Output: `{output}` — **{manifest['splits'].get('train', 0)} pairs** kept, "
        f"{manifest['splits'].get('dropped', 0)} dropped (config `dropped`), recipe hash "
        f"`{manifest['recipe']['hash']}`.",
        "",
        "Funnel: " + " → ".join(f"{n} {label}" for label, n in funnel_steps(manifest["stats"], kept)),
        "",
        "| stage | in | out | drops | seconds |",
        "|---|---|---|---|---|",
    ]
    for name, s in stages.items():
        drops = ", ".join(f"{k}: {v}" for k, v in s["drops"].items()) or "none"
        lines.append(f"| {name} | {s['rows_in']} | {s['rows_out']} | {drops} | {s['seconds']:.1f} |")
    length = manifest["stats"].get("length", {}).get("before", {})
    if length.get("corr_length_diff_margin") is not None:
        lines += [
            "",
            f"Chosen is longer in {100 * length['chosen_longer_share']:.0f}% of candidate pairs; "
            f"Spearman(length difference, margin) = {length['corr_length_diff_margin']:.3f}.",
        ]
    cost = manifest["stats"].get("cost")
    if cost and cost["per_kept_pair"]:
        per = cost["per_kept_pair"]
        lines += [
            "",
            f"Cost per kept pair: {per['seconds']:.2f} s, {per['tokens_generated']:.0f} tokens generated, "
            f"{per['tokens_scored']:.0f} tokens read by the labelers and judge.",
        ]
    for item in (manifest["stats"].get("eval") or {}).get("sets", []):
        row = next(r for r in item["rows"] if r["labeler"] == "aggregate")
        lines += [
            "",
            f"Label quality on {item['name']} ({item['n']} human pairs, {item['domain']}): aggregate agrees "
            f"{row['accuracy']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}].",
        ]
    return "\n".join(lines) + "\n"
