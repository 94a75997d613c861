"""``audit show RUN FEATURE``: one feature's card in the terminal."""

from __future__ import annotations

import json
import re

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .store import AuditStore

_MARK = re.compile(r"<<(.*?>*)>>", re.DOTALL)  # a marked "<s>" keeps its own ">"
# Control characters other than newline and tab: an escape sequence in stored text (a model's answer,
# a dataset context) would otherwise drive the terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(value) -> str:
    """Stored, untrusted text made safe to print: control characters dropped (markup is never parsed:
    every caller wraps the result in ``Text``)."""
    return _CONTROL.sub("", str(value if value is not None else ""))


def marked_text(text: str) -> Text:
    """A context with its ``<<active>>`` tokens highlighted; the text itself is never parsed as markup."""
    text = plain(text)
    out = Text()
    position = 0
    for match in _MARK.finditer(text):
        out.append(text[position : match.start()])
        out.append(match.group(1), style="black on yellow")
        position = match.end()
    out.append(text[position:])
    return out


def feature_card(db: AuditStore, run_id: str, feature: int, console: Console) -> None:
    if db.run(run_id) is None:
        raise KeyError(f"no run {run_id!r} in {db.path}; `audit runs` lists them")
    found = db.query("SELECT * FROM features WHERE run_id = ? AND feature = ?", [run_id, feature])
    if not found:
        size = db.query("SELECT dict_size FROM crosscoder_metrics WHERE run_id = ?", [run_id])
        if size and size[0]["dict_size"] and not 0 <= feature < size[0]["dict_size"]:
            raise KeyError(f"feature {feature} is outside run {run_id}'s dictionary (ids 0–{size[0]['dict_size'] - 1})")
        raise KeyError(f"feature {feature} was not flagged in run {run_id} (only exclusive features are analysed)")
    f = found[0]
    side = {"a": "model A only", "b": "model B only"}.get(f["partition"], "shared")
    console.print(Text(f"Feature {feature} — {side} — triage rank {f['rank']}", style="bold"))
    explanation = db.query("SELECT * FROM explanations WHERE run_id = ? AND feature = ?", [run_id, feature])
    if explanation:
        e = explanation[0]
        if e["parsed"]:
            console.print(Text(f"Explanation: {plain(e['explanation'])}"))
            console.print(Text(f"Safety-critical: {'YES' if e['safety_critical'] else 'no'} — {plain(e['reason'])}"))
        else:
            console.print(Text("Explainer reply could not be parsed; raw reply:\n" + plain(e["raw"])))
        console.print(Text(f"({plain(e['explainer'])})", style="dim"))
    from reports.render import push_relative

    metrics = db.query("SELECT * FROM crosscoder_metrics WHERE run_id = ?", [run_id])
    relative = push_relative(f, metrics[0] if metrics else None)
    push = _num(f.get("push_norm")) + (f" ({relative:.2f} × median norm)" if relative is not None else "")
    stats = Table(show_header=True)
    for column in ("fires on", "s_max", "push at α = 1", "R² own / other", "exclusivity", "gen. prompts", "merged"):
        stats.add_column(column, justify="right")
    stats.add_row(_pct(f["frequency"], "{:.2f} %"), _num(f["s_max"]), push,
                  f"{_num(f['r2_own'], '{:.4f}')} / {_num(f['r2_other'], '{:.4f}')}", _num(f["exclusivity"]),
                  _pct(f["template_share"]), _pct(f["merged_share"]))
    console.print(stats)
    reasons = json.loads(f["artefact_reasons"] or "[]")
    if reasons:
        console.print(Text("Likely artefact: " + plain("; ".join(reasons)), style="yellow"))
    console.print(Text("Promoted tokens: " + plain(", ".join(json.loads(f["promoted_tokens"] or "[]")))))
    recurrence = db.query("SELECT * FROM recurrence WHERE run_id = ? AND feature = ? ORDER BY seed", [run_id, feature])
    if recurrence:
        from reports.render import recurrence_details

        console.print(Text("Other seeds: " + plain("; ".join(recurrence_details(recurrence)))))
    for c in db.query("SELECT * FROM contexts WHERE run_id = ? AND feature = ? ORDER BY rank LIMIT 10", [run_id, feature]):
        line = Text(f"[{_num(c['activation'])}] ", style="dim")
        line.append_text(marked_text(c["text"]))
        console.print(line)
    effects = db.query("SELECT * FROM effects WHERE run_id = ? AND feature = ?", [run_id, feature])
    if effects:
        view = Table(title="steering effects")
        for column in ("rubric", "effect", "ρ", "control", "coherence |α|≤1", "verified", "random pushes passing"):
            view.add_column(column)
        for x in effects:
            # the null sweep: random directions of the verified features' push size, graded the same way
            null = f"{x['null_passed']} of {x['null_draws']}" if x.get("null_draws") else "–"
            if x.get("null_draws") and x.get("null_as_large") is not None:
                null += f" ({x['null_as_large']} moved it as much)"
            view.add_row(Text(plain(x["rubric"])), _num(x["effect"], "{:+.2f}"), _num(x["spearman"]), _num(x["control_effect"], "{:+.2f}"),
                         _num(x["coherence_low_alpha"]), "yes" if x["verified"] else "no", null)
        console.print(view)


def _num(value, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def _pct(value, fmt: str = "{:.0f} %") -> str:
    return "–" if value is None else fmt.format(100 * value)
