"""The README's result tables, generated from the committed results in benchmarks/results/.

  python benchmarks/readme_tables.py            # rewrites the README's generated sections
  python benchmarks/readme_tables.py --check    # exits 1, naming the section, where they differ

Each generated section of README.md sits between `<!-- begin NAME: ... -->` and `<!-- end NAME -->`
lines; tests/test_readme_tables.py fails when one differs from what this script makes of the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, Callable

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from nsjax import claims  # noqa: E402

README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
STUDY = "study_demo.json"
SOFT_VS_HARD = "soft_vs_hard.json"


def _load(name: str) -> dict[str, Any]:
  with open(os.path.join(RESULTS, name)) as f:
    return json.load(f)


def _cell(entry: dict[str, Any], seed: str) -> str:
  value = entry["top1"].get(seed)
  return "-" if value is None else f"{value:.1f}"


def demo_table(study: dict[str, Any]) -> str:
  """Per seed: the demo's teacher, students 1 and 2, and its supervised baseline (the study's
  `full` rows: the demo's own runs), then the means over the seeds every column has."""
  columns = [("teacher", study["teacher"]), ("student 1", study["variants"]["iterations_1"]),
             ("student 2 (final)", study["variants"]["full"]),
             ("supervised baseline", study["baseline"])]
  lines = ["| seed | " + " | ".join(name for name, _ in columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  seeds = [str(s) for s in study["study"]["seeds"]]
  for seed in seeds:
    lines.append(f"| {seed} | " + " | ".join(_cell(e, seed) for _, e in columns) + " |")
  complete = [s for s in seeds if all(s in e["top1"] for _, e in columns)]
  if complete:
    means = [sum(e["top1"][s] for s in complete) / len(complete) for _, e in columns]
    lines.append(f"| **mean of {len(complete)}** | " +
                 " | ".join(f"**{m:.1f}**" for m in means) + " |")
  return "\n".join(lines)


def claims_table(study: dict[str, Any]) -> str:
  return claims.format_table(study, study["claims"]).rstrip("\n")


def verdicts(study: dict[str, Any]) -> str:
  """One line per corrected verdict: which claims hold, are reversed, or are undecided."""
  groups: dict[str, list[str]] = {}
  for c in study["claims"]:
    groups.setdefault(c["verdict_corrected"], []).append(c["text"])
  order = sorted(groups, key=lambda v: (not v.startswith("holds"), not v.startswith("reversed"),
                                        v))
  return "\n".join(f"- **{v}** ({len(groups[v])}): " + "; ".join(groups[v]) + "."
                   for v in order)


def setting(study: dict[str, Any]) -> str:
  meta = study["study"]
  cpu = meta["cpu"]
  cpus = ("; ".join(c["model"] for c in cpu) if isinstance(cpu, list) else
          f"{cpu['model']} ({cpu['family_model']}; {', '.join(cpu['vector'] + cpu['matrix'])})")
  steps = meta["student_steps"]["full"]
  return (f"Seeds {', '.join(map(str, meta['seeds']))}; students of {' and '.join(map(str, steps))}"
          f" steps (the demo's); {meta['product_dtype']} matrix products; XLA's CPU operations "
          f"on {meta['cpu_threads']} threads; CPU: {cpus}.")


def soft_vs_hard_table(result: dict[str, Any]) -> str:
  lines = ["| comparison (one iteration unless said) | seeds | difference [95% CI] | verdict |",
           "|---|---|---|---|"]
  for c in result["comparisons"]:
    interval = (f"{c['diff_mean']:+.1f} [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"
                if c["ci95"] else "-" if c["diff_mean"] is None else f"{c['diff_mean']:+.1f}")
    lines.append(f"| {c['text']} | {len(c['seeds'])} | {interval} | {c['verdict']} |")
  return "\n".join(lines)


def teacher_statistics(result: dict[str, Any]) -> str:
  """The teacher's pseudo labels on the unlabeled digits, averaged over the seeds analysed."""
  seeds = [e["in_domain"] for e in result["per_seed"].values() if "in_domain" in e]
  ood = [e["out_of_domain"] for e in result["per_seed"].values() if "out_of_domain" in e]
  if not seeds:
    return "(no seed analysed yet)"
  mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
  text = (f"Over {len(seeds)} seeds the teacher's pseudo labels for the 3,900 unlabeled digits are "
          f"{100 * mean(seeds, 'label_accuracy'):.1f}% right; its mean top-1 probability is "
          f"{mean(seeds, 'mean_confidence'):.2f} (median {mean(seeds, 'median_confidence'):.2f}), "
          f"and a soft label puts on average {mean(seeds, 'mean_prob_of_true_class'):.2f} on the "
          f"true digit, where a hard label with the demo's smoothing puts 0.91; the threshold "
          f"keeps {100 * mean(seeds, 'kept_by_threshold'):.1f}% of the images.")
  if ood:
    text += (f" On the out-of-domain patches the mean top-1 probability is "
             f"{mean(ood, 'mean_confidence'):.2f}.")
  pairs = [e["teacher_and_baseline"] for e in result["per_seed"].values()
           if "images_only_teacher_right" in e["teacher_and_baseline"]]
  if pairs:
    differ = [p["images_only_teacher_right"] + p["images_only_baseline_right"] for p in pairs]
    same = sum(p["same_parameters"] for p in pairs)
    text += (f" Teacher and baseline are independent runs: on each of {len(pairs)} seeds they are "
             f"trained from other seeds (s * 1000 and s * 1000 + 3 reach their initialisation, data "
             f"order and noise), {'none' if not same else same} of them share parameters, and "
             f"they disagree on {min(differ)} to {max(differ)} of the test images.")
  return text


SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "demo-table": (STUDY, demo_table),
    "study-setting": (STUDY, setting),
    "claims-table": (STUDY, claims_table),
    "claims-verdicts": (STUDY, verdicts),
    "soft-vs-hard-table": (SOFT_VS_HARD, soft_vs_hard_table),
    "soft-vs-hard-teacher": (SOFT_VS_HARD, teacher_statistics),
}

_SECTION = re.compile(r"(<!-- begin (?P<name>[\w-]+):[^\n]*-->\n)(?P<body>.*?)(\n<!-- end (?P=name) -->)",
                      re.S)


def generated(name: str) -> str:
  source, make = SECTIONS[name]
  return make(_load(source))


def sections_in(text: str) -> dict[str, str]:
  return {m.group("name"): m.group("body") for m in _SECTION.finditer(text)}


def rewrite(text: str) -> str:
  return _SECTION.sub(lambda m: m.group(1) + generated(m.group("name")) + m.group(4), text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
  args = parser.parse_args()
  with open(README) as f:
    text = f.read()
  stale = [n for n, body in sections_in(text).items() if body != generated(n)]
  if args.check:
    if stale:
      sys.exit(f"README.md sections differ from benchmarks/results: {', '.join(stale)}; run "
               "python benchmarks/readme_tables.py")
    return
  with open(README, "w") as f:
    f.write(rewrite(text))
  print(f"rewrote {', '.join(stale) or 'nothing (all current)'}")


if __name__ == "__main__":
  main()
