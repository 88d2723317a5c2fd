"""How a trained model's outputs score another dataset's labels (cxr.evaluate: train here, test there).

Label names differ between datasets: the Kaggle folders' (and data=rsna's) PNEUMONIA is NIH's,
CheXpert's and MIMIC-CXR's Pneumonia. `eval.labels` pairs them, {model output: target label, or a
list of labels}; names alike on both sides pair themselves. An entry reads both ways, so one
mapping serves a multirun over binary and multi-label checkpoints: {PNEUMONIA: Pneumonia} lets a
Kaggle model's PNEUMONIA score NIH's Pneumonia, and an NIH model's Pneumonia score the Kaggle
layout's PNEUMONIA (backwards, only the first label of a list pairs).

Scoring is model probabilities -> (through the pairs) probabilities of the target's task, which
cxr.results.tested then scores with that task as a training run's test split is scored:

    multi-label target  each paired finding, in the target's order, gets its output's probability
                        (a single-label model's P(class), a multi-label model's sigmoid); findings
                        nothing pairs are left out, and labels an entry names that the target lacks
                        are n/a
    binary target       its positive class gets one output's probability p: [1 - p, p] in the
                        target's class order
    multi-class         only between single-label tasks whose classes pair one to one: the model's
                        probabilities with the columns in the target's order

Decisions on the target use the model's own threshold, chosen on its validation split: what a
deployed model would do. Per output, that is a multi-label model's threshold of the finding, or a
binary model's threshold on its positive class (1 - t for its other class).
"""

from dataclasses import dataclass

import numpy as np

from cxr.task import Task


class LabelError(Exception):
    """The model's outputs and the target's labels do not pair: one line naming both sides."""


@dataclass(frozen=True)
class Scoring:
    """What a model (`source`) scores of a target: `task` (the target's task over the labels
    scored), the model output scoring each of its columns (a binary target: its positive class),
    the target's label columns kept, and the labels named that the target lacks (multi-label: a
    single-label target's one scored class is its positive one, whatever else is named)."""

    source: Task
    task: Task
    outputs: tuple[int, ...]
    columns: tuple[int, ...]
    absent: tuple[str, ...] = ()

    @property
    def pairs(self) -> dict[str, str]:
        """{target label: the model output that scores it}."""
        scored = self.task.classes if self.task.kind != "binary" else [self.task.classes[self.task.positive]]
        return {label: self.source.classes[k] for label, k in zip(scored, self.outputs, strict=True)}

    def probabilities(self, probs: np.ndarray) -> np.ndarray:
        """The model's probabilities (N, its outputs) as the target task's (N, its columns)."""
        if self.task.kind != "binary":
            return probs[:, list(self.outputs)]
        p = probs[:, self.outputs[0]]
        target = np.empty((len(probs), 2), dtype=probs.dtype)
        target[:, self.task.positive], target[:, 1 - self.task.positive] = p, 1 - p
        return target

    def labels(self, labels: np.ndarray) -> np.ndarray:
        """The target's labels of the columns scored (multi-label); class indices as they are."""
        return labels[:, list(self.columns)] if self.task.multilabel else labels

    def threshold(self, threshold):
        """The model's validation-chosen threshold, per scored column."""
        if self.task.kind == "multiclass":  # argmax: the number is unused
            return threshold
        per_output = [output_threshold(self.source, threshold, k) for k in self.outputs]
        return per_output if self.task.multilabel else per_output[0]


def output_threshold(source: Task, threshold, output: int) -> float:
    """The threshold the model decides output `output` by: its own (multi-label), or a binary
    model's on its positive class (1 - t on the other class's probability)."""
    if source.multilabel:
        return threshold[output]
    return threshold if output == source.positive else 1 - threshold


def names_of(value) -> list[str]:
    return [value] if isinstance(value, str) else [str(name) for name in value]


def paired(source: Task, target: Task, labels: dict | None) -> tuple[dict[str, set[str]], list[str]]:
    """{target label: the model outputs paired with it} (the same name, or an entry of `labels`
    either way), and the labels an entry names for an output of this model that the target lacks.
    An entry none of whose names is on either side is a typo: LabelError."""
    outputs, targets = set(source.classes), set(target.classes)
    candidates = {name: {name} & outputs for name in target.classes}
    absent = []
    for key, value in (labels or {}).items():
        names = names_of(value)
        if not ({key, *names} & (outputs | targets)):
            raise LabelError(f"eval.labels {key}: {', '.join(names)} names neither a model output "
                             f"({', '.join(source.classes)}) nor a target label ({', '.join(target.classes)})")
        if key in outputs:  # forwards: the output scores every label listed
            for name in names:
                if name in targets:
                    candidates[name].add(key)
                else:
                    absent.append(name)
        if key in targets and names[0] in outputs:  # backwards: the first label's output scores the key
            candidates[key].add(names[0])
    return candidates, list(dict.fromkeys(absent))


def unpaired(source: Task, target: Task, what: str) -> LabelError:
    return LabelError(f"no model output scores {what}: the model's outputs are {', '.join(source.classes)}; the "
                      f"target's labels are {', '.join(target.classes)}; pair them with eval.labels={{OUTPUT: LABEL}} "
                      "or a preset (labels=pneumonia)")


def scoring(source: Task, target: Task, labels: dict | None = None) -> Scoring:
    """How `source`'s outputs score `target`'s labels (see the module's docstring); LabelError
    when nothing pairs, a label pairs with several outputs, or the kinds cannot meet."""
    candidates, absent = paired(source, target, labels)
    several = {name: found for name, found in candidates.items() if len(found) > 1}
    if several:
        name, found = next(iter(several.items()))
        raise LabelError(f"target label {name} is paired with several model outputs ({', '.join(sorted(found))}) "
                         "by eval.labels: pair it with one")
    index = {name: source.classes.index(next(iter(found))) for name, found in candidates.items() if found}
    if "multiclass" in (source.kind, target.kind):
        one_to_one = len(index) == len(target.classes) and set(index.values()) == set(range(len(source.classes)))
        if source.kind != target.kind or not one_to_one:
            raise LabelError(f"a multi-class model or target is scored class for class: the model's classes "
                             f"({', '.join(source.classes)}) must pair one to one with the target's "
                             f"({', '.join(target.classes)})")
        return Scoring(source, target, tuple(index[name] for name in target.classes), ())
    if target.kind == "binary":
        positive = target.classes[target.positive]
        if positive not in index:
            raise unpaired(source, target, f"the target's positive class {positive}")
        return Scoring(source, target, (index[positive],), ())
    if not index:
        raise unpaired(source, target, "any of the target's findings")
    columns = tuple(k for k, name in enumerate(target.classes) if name in index)
    scored = Task("multilabel", tuple(target.classes[k] for k in columns))
    return Scoring(source, scored, tuple(index[name] for name in scored.classes), columns, tuple(absent))
