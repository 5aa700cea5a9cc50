"""Stage kind -> its runner, `run(stage, context) -> result dict`. A new kind is a module in
nsjax/stages/ and a line here (and its place in nsjax.schedule)."""
from __future__ import annotations

from typing import Callable

from nsjax import schedule
from nsjax.stages import evaluate, finetune, label, summary, train
from nsjax.stages.context import Context

Runner = Callable[[schedule.Stage, Context], dict]

RUNNERS: dict[str, Runner] = {
    "teacher": train.run,
    "student": train.run,
    "baseline": train.run,
    "label": label.run,
    "finetune": finetune.run,
    "eval": evaluate.run,
    "summary": summary.run,
}
assert set(RUNNERS) == set(schedule.KINDS), "every stage kind of the schedule has one runner"
