"""The input policy: what a deployment refuses to generate (ServeArgs `deny_classes`, `deny_words`,
`deny_patterns`), decided on the request body alone, before routing or any compute.

Prompts are matched as a text model reads them: NFKC-normalised (fullwidth or ligature letters become
plain ones) and case-folded, runs of spaces made one; the schema has already refused the control and
zero-width characters that could split a word unseen. A word matches whole (not inside a longer
word), a pattern (a Python regular expression) anywhere. Both `prompt` and `negative_prompt` are
checked: at guidance below 1 a negative prompt pulls towards what it names. So is every region of a
`regions` request, each by its own field: a class as `class_label` is, a prompt as `prompt` is; and an
edit's (POST /v1/edit) target and source, `prompt` and `source_prompt`, `class_label` and `source_class`
(the source condition is generated under too: inversion, prompt-to-prompt's source branch).

Pure: no Ray, no FastAPI. A refusal names the field and the rule, never the text.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from dtrain.serving.schemas import region_names

if TYPE_CHECKING:
    from dtrain.serving.schemas import EditRequest, GenerateRequest

CLASS_FIELDS = ("class_label", "source_class")
PROMPT_FIELDS = ("prompt", "negative_prompt", "source_prompt")


@dataclass(frozen=True)
class Refusal:
    """A request the policy refuses: 400 with `code`; `rule` (which setting) is for the log only."""
    code: str
    field: str
    rule: str
    message: str


def normalized(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def compile_rules(words: Sequence[str], patterns: Sequence[str]) -> list[tuple[str, re.Pattern]]:
    """(rule name, regex) of each deny word and pattern; ValueError naming a bad one. A rule that matches
    the empty prompt would refuse every request: refused here, not discovered in production."""
    rules = []
    for i, word in enumerate(words):
        w = normalized(word)
        if not w:
            raise ValueError(f"deny_words[{i}] is empty once normalised: it would match every prompt")
        rules.append((f"deny_words[{i}]", re.compile(rf"(?<!\w){re.escape(w)}(?!\w)")))
    for i, pattern in enumerate(patterns):
        try:
            rx = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"deny_patterns[{i}] {pattern!r} is not a regular expression: {e}") from None
        if rx.search(""):
            raise ValueError(f"deny_patterns[{i}] {pattern!r} matches the empty prompt: it would match every prompt")
        rules.append((f"deny_patterns[{i}]", rx))
    return rules


class InputPolicy:
    def __init__(self, deny_classes: Mapping[str, Sequence[int]], deny_words: Sequence[str] = (),
                 deny_patterns: Sequence[str] = ()):
        self.deny_classes = deny_classes
        self.rules = compile_rules(deny_words, deny_patterns)

    def check(self, model: str, req: GenerateRequest | EditRequest) -> Optional[Refusal]:
        """The first refusal of a request to `model` (each class field, then each prompt field, of those the
        request has; then each region's class or prompt, background first), or None."""
        denied = {*self.deny_classes.get("*", ()), *self.deny_classes.get(model, ())}
        conditions = [*((f, getattr(req, f, None), None) for f in CLASS_FIELDS),
                      *((f, None, getattr(req, f, None)) for f in PROMPT_FIELDS)]
        if getattr(req, "regions", None) is not None:
            conditions += [(f"regions.{name}.{'prompt' if r.prompt is not None else 'class_label'}", r.class_label,
                            r.prompt) for name, r in zip(region_names(req.regions), req.regions.regions)]
        for field, label, text in conditions:
            if label is not None and label in denied:
                return Refusal("denied_class", field, f"class {label}", f"class {label} of {model} is not served")
            rule = text and self.denied(text)
            if rule:
                return Refusal("denied_prompt", field, rule, f"{field} is refused by this deployment's input policy")
        return None

    def denied(self, text: str) -> Optional[str]:
        """The first rule that `text` matches, or None."""
        text = normalized(text)
        return next((name for name, rx in self.rules if rx.search(text)), None)
