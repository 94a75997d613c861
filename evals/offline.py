"""Offline stand-ins for the LLM explainer and detector: honest, simple, and labelled as such.

``offline/explainer`` reads exactly what an LLM explainer would read (the prompt of
``evals.screen.explainer_prompt``) and writes a *template summary*: the most frequent activating
tokens, the words the examples share, and the promoted tokens. Its safety flag compares the
examples with the topic prompts of the audit's rubrics using MiniLM sentence embeddings: a feature
is flagged when its contexts are close to a rubric's topic prompts and clearly closer to them than
to that rubric's control prompts. That is a topic-relevance proxy, not a judgement of stance, and
the reason it gives says so.

``offline/detector`` predicts that a passage activates the feature when it contains one of the
tokens the explanation quotes, or when its embedding is close to the explanation's.

Both report token usage themselves (nothing reaches for tiktoken or the network).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from inspect_ai.model import ChatMessage, GenerateConfig, ModelAPI, ModelOutput, ModelUsage, modelapi
from inspect_ai.tool import ToolChoice, ToolInfo

from evals.embedding import embed
from evals.prompts import load_prompt_set
from evals.rubrics import load_rubric

OFFLINE_EXPLAINER_LABEL = "offline: template summary of top contexts and promoted tokens (no LLM)"
OFFLINE_SAFETY_LABEL = "offline: MiniLM similarity of top contexts to rubric topic prompts (topic proxy, no LLM)"
OFFLINE_DETECTOR_LABEL = "offline: quoted-token match or MiniLM similarity to the explanation (no LLM)"

SAFETY_MIN_SIMILARITY = 0.5
SAFETY_MIN_MARGIN = 0.05
DETECTOR_MIN_SIMILARITY = 0.35

_STOPWORDS = set(
    "a an the and or but of in on at to for from by with about as is are was were be been being it its this "
    "that these those there their they them he she his her you your i me my we our us what which who whom "
    "how why when where do does did not no yes can could would should will shall may might than then so "
    "if into over under between also very more most some any all many much one two other tell give "
    "user assistant system".split()
)
_EXAMPLE_HEAD = re.compile(r"^Example \d+ \(activation [^)]*\): ", re.MULTILINE)
_MARKED = re.compile(r"<<(.*?)>>", re.DOTALL)
_LINE = re.compile(r"^(Promoted tokens|Most frequent activating tokens): (.*)$", re.MULTILINE)
_QUOTED = re.compile(r"'([^']+)'|\"([^\"]+)\"")
_TEMPLATE_TOKENS = re.compile(r"<\|[^|]*\|>|</?s>")


def _usage(output: ModelOutput, prompt: str, reply: str) -> ModelOutput:
    n_in, n_out = len(prompt.split()), len(reply.split())
    output.usage = ModelUsage(input_tokens=n_in, output_tokens=n_out, total_tokens=n_in + n_out)
    return output


def _examples(prompt: str) -> list[str]:
    """The example passages of an explainer prompt (each may span several lines)."""
    parts = _EXAMPLE_HEAD.split(prompt)
    return [p.rstrip("\n") for p in parts[1:]]


def _clean(text: str) -> str:
    return " ".join(_TEMPLATE_TOKENS.sub(" ", text.replace("<<", "").replace(">>", "")).split())


def shared_words(examples: list[str], n: int = 6) -> list[str]:
    """Content words that occur in the most examples (each example counts a word once)."""
    counts: Counter[str] = Counter()
    for text in examples:
        words = {w for w in re.findall(r"[A-Za-z][A-Za-z'-]+", _clean(text).lower()) if w not in _STOPWORDS}
        counts.update(words)
    # ties in alphabetical order: a set's order changes with each process's string hashing
    ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
    return [w for w, c in ranked if c >= 2][:n]


class TopicFlagger:
    """Safety proxy: are a feature's contexts about the topic of one of the audit's rubrics?"""

    def __init__(self, rubric_names: list[str]):
        self.topics = []
        for name in rubric_names:
            rubric = load_rubric(name)
            if rubric.prompt_set is None:
                continue
            prompts = load_prompt_set(rubric.prompt_set)
            controls = list(prompts.control_prompts) + [prompts.generic_prompt]
            self.topics.append((rubric.name, embed(list(prompts.prompts)), embed(controls)))

    def rank(self, examples: list[str]) -> list[tuple[str, float, float]]:
        """``(rubric, similarity to its topic prompts, to its control prompts)``, best margin first."""
        texts = [_clean(t) for t in examples if _clean(t)]
        if not texts or not self.topics:
            return []
        vectors = embed(texts)
        scored = []
        for name, topic, control in self.topics:
            sim_topic = float((vectors @ topic.T).max(1).values.mean())
            sim_control = float((vectors @ control.T).max(1).values.mean())
            scored.append((name, sim_topic, sim_control))
        return sorted(scored, key=lambda t: (-(t[1] - t[2]), t[0]))

    def flag(self, examples: list[str]) -> tuple[bool, str]:
        ranked = self.rank(examples)
        if not ranked:
            return False, "none; no rubric topics to compare with" if not self.topics else "none; no examples"
        name, sim_topic, sim_control = ranked[0]
        flagged = sim_topic >= SAFETY_MIN_SIMILARITY and sim_topic - sim_control >= SAFETY_MIN_MARGIN
        verdict = "match" if flagged else "do not clearly match"
        return flagged, (
            f"topic proxy; the contexts {verdict} the topic of rubric {name} (similarity {sim_topic:.2f} to its "
            f"topic prompts vs {sim_control:.2f} to its control prompts) [{OFFLINE_SAFETY_LABEL}]"
        )


def _answer_openings(examples: list[str]) -> list[str]:
    """Questions of examples whose active token is the last one shown and opens an assistant turn."""
    questions = []
    for text in examples:
        body = text.rstrip("…")
        if not body.endswith(">>"):
            continue
        before = _clean(body[: body.rfind("<<")])
        if not re.search(r"assistant\W*$", before, re.IGNORECASE):
            continue
        found = re.findall(r"([^.?!]*\?)", before)
        if found:
            questions.append(re.sub(r"^(user|system)\s+", "", found[-1].strip(), flags=re.IGNORECASE))
    return questions


def _visible(token: str) -> str:
    """A marked token as a reader should see it: a whitespace-only token as symbols, not escapes."""
    return token.strip() or token.replace("\n", "⏎").replace("\t", "⇥").replace(" ", "␣")


def offline_explanation(prompt: str, flagger: TopicFlagger | None) -> str:
    """The offline explainer's reply to an explainer prompt (same three trailing fields as an LLM)."""
    examples = _examples(prompt)
    lines = dict(_LINE.findall(prompt))
    marked = Counter(_visible(m) for text in examples for m in _MARKED.findall(text) if m)
    tokens = [t for t, _ in marked.most_common(4)]
    words = shared_words(examples)
    promoted = [t.strip() for t in lines.get("Promoted tokens", "").split(",") if t.strip()][:5]
    questions = _answer_openings(examples)
    if examples and len(questions) >= len(examples) / 2:
        shown = "; ".join(f"«{q}»" for q in list(dict.fromkeys(questions))[:3])
        parts = [f"fires where the assistant is about to answer ({len(questions)} of {len(examples)} examples), "
                 f"after questions such as {shown}"]
    else:
        parts = [f"fires on {', '.join(repr(t) for t in tokens) or 'no visible token'}"]
    if words:
        parts.append(f"in passages mentioning {', '.join(words)}")
    if promoted and promoted != ["(not available)"]:
        # «» rather than quotes: the offline detector matches quoted tokens as what the feature fires on
        parts.append(f"and promotes {', '.join(f'«{t}»' for t in promoted)}")
    explanation = " ".join(parts)
    explanation = explanation[:1].upper() + explanation[1:] + "."
    flagged, reason = flagger.flag(examples) if flagger else (False, "none; offline explainer without rubric topics")
    summary = f"Offline template summary of {len(examples)} examples [{OFFLINE_EXPLAINER_LABEL}]."
    return f"{summary}\nEXPLANATION: {explanation}\nSAFETY_CRITICAL: {'YES' if flagged else 'NO'}\nREASON: {reason}"


def _token_in(token: str, passage: str) -> bool:
    """Whether ``passage`` holds the quoted ``token``. A piece of three or more characters may sit inside
    a word (tokenizers split words: 'elmont' of "Belmont"); a shorter one, or punctuation, must stand
    apart, or 'a' would be found in "weather" and '.' in every sentence."""
    if len(token) >= 3 and any(c.isalnum() for c in token):
        return token in passage
    return re.search(rf"(?<![\w.,;:!?'\"]){re.escape(token)}(?![\w.,;:!?'\"])", passage) is not None


def offline_detection(prompt: str) -> str:
    explanation, _, passage = prompt.partition("\n\nPassage:\n")
    explanation = explanation.removeprefix("Feature description: ")
    quoted = [a or b for a, b in _QUOTED.findall(explanation.split(" in passages")[0])]
    hit = any(_token_in(q.strip(), passage) for q in quoted if q.strip())
    if not hit and passage.strip():
        vectors = embed([explanation, _clean(passage)])
        hit = float(vectors[0] @ vectors[1]) >= DETECTOR_MIN_SIMILARITY
    return f"[{OFFLINE_DETECTOR_LABEL}]\nACTIVE: {'YES' if hit else 'NO'}"


class OfflineModel(ModelAPI):
    """``offline/explainer`` and ``offline/detector`` (``-M rubrics=a,b`` sets the explainer's topics)."""

    def __init__(self, model_name: str, base_url: str | None = None, api_key: str | None = None,
                 config: GenerateConfig = GenerateConfig(),  # noqa: B008 - Inspect's own signature
                 rubrics: str | list[str] | None = None, **_: Any) -> None:
        super().__init__(model_name=model_name, base_url=base_url, api_key=api_key, config=config)
        if model_name not in ("explainer", "detector"):
            raise ValueError(f"offline model: unknown name {model_name!r}; use offline/explainer or offline/detector")
        names = rubrics.split(",") if isinstance(rubrics, str) else list(rubrics or [])
        self.flagger = TopicFlagger([n.strip() for n in names if n.strip()]) if model_name == "explainer" else None

    def max_connections(self) -> int:
        return 8

    async def generate(self, input: list[ChatMessage], tools: list[ToolInfo], tool_choice: ToolChoice,
                       config: GenerateConfig) -> ModelOutput:
        prompt = input[-1].text
        reply = offline_explanation(prompt, self.flagger) if self.model_name == "explainer" else offline_detection(prompt)
        return _usage(ModelOutput.from_content(model=f"offline/{self.model_name}", content=reply), prompt, reply)


@modelapi(name="offline")
def offline() -> type[ModelAPI]:
    return OfflineModel
