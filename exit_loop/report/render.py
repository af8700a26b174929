"""The report written out: report.md (the tables, the claims over seeds, the environment) and two
plots, accuracy.png and response_length.png, from the dict exit_loop.report.build makes. Also the
one-line summaries `exit-loop compare` prints."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from exit_loop.environment import describe
from exit_loop.jsonl import atomic_write_bytes
from exit_loop.report.read import DIVERSITY
from exit_loop.rundir import TIME_COLUMNS


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _int(x: float | int | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}"


def _k_label(report: dict[str, Any]) -> str:
    ks = {k for arm in report["arms"].values() for k in arm["k"] if k is not None}
    return str(ks.pop()) if len(ks) == 1 else "k"


def summary_line(name: str, arm: dict[str, Any]) -> str:
    """`name: accuracy A% (round i) → B% (round j), +D points; time: ...; overhead ...`."""
    acc = [(r, a) for r, a in zip(arm["rounds"], arm["accuracy"]) if a is not None]
    if not acc:
        text = "no accuracy recorded"
    elif len(acc) == 1:
        text = f"accuracy {_pct(acc[0][1])}% at round {acc[0][0]} only"
    else:
        (r0, a0), (r1, a1) = acc[0], acc[-1]
        text = (f"accuracy {_pct(a0)}% (round {r0}) → {_pct(a1)}% (round {r1}), "
                f"{100 * (a1 - a0):+.1f} points")
    t = arm.get("timings") or {}
    total = t.get("total_s")
    if total:
        parts = [f"{s} {100 * t[f'{s}_s'] / total:.0f}%" for s in TIME_COLUMNS if t.get(f"{s}_s") is not None]
        if t.get("overhead_s") is not None:
            parts.append(f"loop overhead {_secs(t['overhead_s'])} s ({100 * t['overhead_s'] / total:.1f}%)")
        text += f"; time {_secs(total)} s: " + ", ".join(parts)
    return f"**{name}**: {text}"


def _ci_n(arm: dict[str, Any], i: int) -> str:
    n = arm.get("n_questions")
    return str(n[i]) if n and n[i] is not None else "—"


def paired_lines(report: dict[str, Any], last_only: bool = False) -> list[str]:
    """`a − b, round r: +X points [lo, hi], p = …, n = …` for each paired entry (the last round
    of each pair only, with `last_only`)."""
    rows = report.get("paired") or []
    if last_only:
        last: dict[tuple[str, str, Any], dict[str, Any]] = {}
        for row in rows:
            last[(row["a"], row["b"], row.get("seed", 0) if "seed" in row else "-")] = row
        rows = list(last.values())
    out = []
    for row in rows:
        lo, hi = row["ci95"]
        where = f"round {row['round']}"
        if "seed" in row:
            where += f", seed {row['seed']}" if row["seed"] is not None else f", pooled over {row['seeds']} seeds"
        if row["p_mcnemar"] is None:
            test = "two-level bootstrap over seeds and questions, no exact test"
        else:
            test = f"p = {row['p_mcnemar']:.3g} (McNemar, exact)"
        out.append(f"{row['a']} − {row['b']}, {where}: {100 * row['diff']:+.1f} points "
                   f"[{100 * lo:+.1f}, {100 * hi:+.1f}], {test}, n = {row['n']}")
    return out


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _ci_pts(ci: list[float] | None) -> str:
    return "—" if ci is None else f"[{_pts(ci[0])}, {_pts(ci[1])}]"


TRUST = ("Which interval to trust: the t-interval over seeds treats each seed (its own initialisation, warm "
         "start, sampling and training) as one draw of the method, so it carries the variance a claim about the "
         "method has to beat; with {n} seeds it is the one this report's verdicts use. The two-level bootstrap "
         "beside it resamples seeds and questions and covers less than 95% with few seeds (about 83-90% with 3 "
         "seeds, 93% with 5, in simulation with the quickstart's spread).")


def over_seeds_lines(report: dict[str, Any]) -> list[str]:
    """report.md's claims over seeds: the last round of every arm pair and of every arm against its
    own round 0, each seed's difference, how many are positive, the mean with its t-interval over
    seeds, the pooled bootstrap beside it, and a verdict."""
    rows = [r for r in report.get("paired") or [] if "seeds" in r]
    gains = [g for g in report.get("gains") or [] if "seeds" in g]
    if not rows and not gains:
        return []
    last_pair: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        last_pair[(r["a"], r["b"])] = r
    last_gain: dict[str, dict[str, Any]] = {}
    for g in gains:
        last_gain[g["arm"]] = g
    entries = [(f"{g['arm']} round {g['round']} − round {g['from_round']}", g) for g in last_gain.values()]
    entries += [(f"{a} − {b}, round {r['round']}", r) for (a, b), r in last_pair.items()]
    n = max(e["seeds"] for _, e in entries)
    lines = ["", "## Over seeds: the claims", "",
             "Each seed's difference in held-out accuracy (points), how many seeds are positive, the mean over "
             "seeds with its 95% t-interval over seeds, and the two-level bootstrap over seeds and questions. "
             "A verdict needs the t-interval above (or below) zero.", "",
             "| comparison | seeds | per seed | positive | mean | 95% t over seeds | 95% pooled bootstrap | verdict |",
             "|---|---:|---|---:|---:|---|---|---|"]
    for label, e in entries:
        t = e.get("t_ci95")
        verdict = ("higher" if t and t[0] > 0 else "lower" if t and t[1] < 0 else "not shown")
        lines.append(f"| {label} | {e['seeds']} | {', '.join(_pts(v) for v in e['per_seed'])} | "
                     f"{e['positive']}/{e['seeds']} | {_pts(e['diff'])} | {_ci_pts(t)} | {_ci_pts(e['ci95'])} | {verdict} |")
    lines += ["", TRUST.format(n=n)]
    if n < 5:
        lines.append(f"With {n} seeds the t-interval is wide (its t quantile is {'12.7' if n == 2 else '4.30' if n == 3 else '3.18'}); "
                     "a claim the project makes needs at least 5.")
    return lines


GROUPINGS = {
    "by_group": ("By group of questions", "per group of questions (the eval data's `group_by` key)", "group"),
    "by_difficulty": ("By difficulty", "per difficulty of question: the starting student's pass rate on it "
                      "over round 0's `eval.n` samples (where expert iteration gains: the questions it never "
                      "solved, or seldom)", "difficulty"),
}


def further_groupings(report: dict[str, Any]) -> list[str]:
    """The `by_<key>` groupings of group_by's further keys, in the order the arms first have them."""
    keys: dict[str, None] = {}
    for arm in report["arms"].values():
        keys.update({k: None for k in arm if k.startswith("by_") and k not in GROUPINGS})
    return list(keys)


def group_lines(report: dict[str, Any], key: str = "by_group") -> list[str]:
    """Accuracy per group of held-out questions (`data.group_by`, or difficulty): pooled over seeds
    where there are several, else per run."""
    source = report.get("pooled") or report["arms"]
    have = {name: a.get(key) for name, a in source.items() if a.get(key)}
    if not have:
        return []
    field = key.removeprefix("by_")  # group_by's further keys: `by_<key>`
    title, what, column = GROUPINGS.get(key, (f"By {field}", f"per value of the eval data's `{field}` key "
                                              "(one of `data.group_by`'s keys)", field))
    rounds = max((a["rounds"] for a in source.values()), key=len)
    lines = ["", f"## {title}", "",
             f"Held-out accuracy % {what}"
             + (", mean over seeds with the two-level bootstrap's 95% interval." if report.get("pooled")
                else ", with its 95% Wilson interval."), "",
             f"| arm | {column} | " + " | ".join(f"round {r}" for r in rounds) + " |",
             "|---|---|" + "---|" * len(rounds)]
    for name, groups in have.items():
        for g, v in groups.items():
            cells = []
            for acc, ci in zip(v["accuracy"], v["accuracy_ci95"]):
                cells.append("—" if acc is None else f"{_pct(acc)} [{_pct(ci[0])}, {_pct(ci[1])}]")
            lines.append(f"| {name} | {g} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: dict[str, Any], plots: list[str], note: str | None = None) -> str:
    k = _k_label(report)
    head = ["arm", "round", "accuracy %", "95% CI", "n", f"pass@{k} %", f"maj@{k} %", "format errors %",
            "response tokens", "yield %", "tokens generated", "training tokens",
            *(f"{s} s" for s in TIME_COLUMNS)]
    lines = ["# exit-loop compare", "",
             "Accuracy is held-out greedy pass@1; round k's eval measures the policy that samples in "
             "round k (round 0: the starting student; the last round: the final checkpoint). "
             "Yield is correct traces / traces generated. — means the run holds no value.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for name, arm in report["arms"].items():
        for i, r in enumerate(arm["rounds"]):
            ci = arm["accuracy_ci95"][i]
            n = "—" if ci is None else _ci_n(arm, i)
            row = [name, str(r), _pct(arm["accuracy"][i]), "—" if ci is None else f"[{_pct(ci[0])}, {_pct(ci[1])}]", n,
                   _pct(arm["pass@k"][i]), _pct(arm["maj@k"][i]),
                   _pct(arm["format_error_rate"][i]), _secs(arm["mean_response_tokens"][i]),
                   _pct(arm["yield"][i]), _int(arm["tokens_generated"][i]), _int(arm["training_tokens"][i]),
                   *(_secs(arm["wall_time_s"][s][i]) for s in TIME_COLUMNS)]
            lines.append("| " + " | ".join(row) + " |")
    if report.get("pooled"):
        lines += ["", "## Pooled over seeds", "",
                  "Mean held-out accuracy over the seeds, with a 95% interval from a two-level bootstrap "
                  "(seeds, then questions within a seed).", "",
                  "| arm | seeds | round | accuracy % | 95% CI |", "|---|---|---|---:|---|"]
        for name, pooled in report["pooled"].items():
            for r, acc, ci in zip(pooled["rounds"], pooled["accuracy"], pooled["accuracy_ci95"]):
                interval = "—" if ci is None else f"[{_pct(ci[0])}, {_pct(ci[1])}]"
                lines.append(f"| {name} | {', '.join(map(str, pooled['seeds']))} | {r} | {_pct(acc)} | {interval} |")
    lines += over_seeds_lines(report)
    lines += group_lines(report)
    for key in further_groupings(report):
        lines += group_lines(report, key)
    lines += group_lines(report, "by_difficulty")
    hinted = any(v is not None for arm in report["arms"].values() for v in arm.get("rationalized") or [])
    lines += ["", "## Training compute", "",
              "What each round's SFT optimised: arms compared on equal terms train the same steps "
              "(`train.budget`); rows and tokens are one epoch of the round's training data."
              + (" Hinted rows: STaR rationalization's traces, drawn with the answer as a hint and trained "
                 "with the plain prompt; their tokens count in the tokens generated." if hinted else ""), "",
              "| arm | round | optimizer steps | training rows | training tokens | epochs |"
              + (" hinted rows in the correct split |" if hinted else ""),
              "|---|---|---:|---:|---:|---:|" + ("---:|" if hinted else "")]
    for name, arm in report["arms"].items():
        for i, r in enumerate(arm["rounds"][:-1]):  # the last round only evaluates
            epochs = arm["training_epochs"][i]
            lines.append(f"| {name} | {r} | {_int(arm['training_steps'][i])} | {_int(arm['training_rows'][i])} | "
                         f"{_int(arm['training_tokens'][i])} | {'—' if epochs is None else f'{epochs:.2f}'} |"
                         + (f" {_int((arm.get('rationalized') or [None] * len(arm['rounds']))[i])} |" if hinted else ""))
    if any(v is not None for arm in report["arms"].values() for v in (arm.get("cost") or {}).get("points", [])):
        lines += ["", "## Cost of the gain", "",
                  "Counted from round 0 up to the round whose eval is shown: tokens generated, training tokens and "
                  "stage seconds (wall), per held-out point gained over round 0 and per training question first "
                  "solved by a sample. — where the gain is not positive or a count is missing.", "",
                  "| arm | round | points over round 0 | tokens generated | training tokens | seconds | "
                  "tokens generated / point | seconds / point | training questions first solved | "
                  "tokens generated / question solved | seconds / question solved |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, arm in report["arms"].items():
            c = arm["cost"]
            for i, r in enumerate(arm["rounds"][1:]):
                pts = c["points"][i]
                lines.append(f"| {name} | {r} | {'—' if pts is None else f'{pts:+.1f}'} | {_int(c['tokens_generated'][i])} | "
                             f"{_int(c['training_tokens'][i])} | {_secs(c['seconds'][i])} | {_int(c['tokens_per_point'][i])} | "
                             f"{_secs(c['seconds_per_point'][i])} | {_int(c['newly_solved'][i])} | "
                             f"{_int(c['tokens_per_solved'][i])} | {_secs(c['seconds_per_solved'][i])} |")
    if any(v is not None for arm in report["arms"].values() for key in DIVERSITY for v in arm.get(key) or []):
        lines += ["", "## Diversity", "",
                  "Per question, the distinct final answers and the distinct responses among the round's samples; and "
                  "the share of the round's training rows that an earlier round already trained on.", "",
                  "| arm | round | distinct answers / question | distinct responses / question | "
                  "training rows seen before % |", "|---|---|---:|---:|---:|"]
        for name, arm in report["arms"].items():
            for i, r in enumerate(arm["rounds"][:-1]):
                a, tr, rep = (arm[key][i] for key in DIVERSITY)
                lines.append(f"| {name} | {r} | {'—' if a is None else f'{a:.2f}'} | "
                             f"{'—' if tr is None else f'{tr:.2f}'} | {_pct(rep)} |")
    lines += ["", "## Summary", ""]
    lines += [f"- {summary_line(name, arm)}" for name, arm in report["arms"].items()]
    if report.get("paired"):
        lines += ["", "## Paired differences", "",
                  "Accuracy of a minus accuracy of b on the same questions: 95% paired-bootstrap interval "
                  "over questions, exact McNemar p-value.", ""]
        lines += [f"- {line}" for line in paired_lines(report)]
    gains = [g for g in report.get("gains") or [] if "seeds" not in g]
    if gains:
        lines += ["", "## Gains over round 0", "",
                  "Each run's accuracy at a round minus its own round 0, on the same questions: 95% paired-bootstrap "
                  "interval, exact McNemar p-value.", ""]
        for g in gains:
            lo, hi = g["ci95"]
            seed = f", seed {g['seed']}" if g["seed"] is not None else ""
            lines.append(f"- {g['arm']}{seed}, round {g['round']} − round {g['from_round']}: {100 * g['diff']:+.1f} points "
                         f"[{100 * lo:+.1f}, {100 * hi:+.1f}], p = {g['p_mcnemar']:.3g}, n = {g['n']}")
    if report.get("environments"):
        lines += ["", "## Environment", ""]
        for e in report["environments"]:
            which = "" if len(report["environments"]) == 1 else f" ({', '.join(e['runs'])})"
            lines.append(f"- {describe(e['environment'])}{which}")
    lines += ["", "## Runs", ""]
    lines += [f"- **{name}**: `{arm['run_dir']}` (experiment `{arm['experiment']}`)"
              for name, arm in report["arms"].items()]
    titles = {"accuracy.png": "Accuracy per round", "response_length.png": "Mean response tokens per round"}
    if plots or note:
        lines += ["", "## Plots", ""]
        lines += [f"![{titles[p]}]({p})\n" for p in plots]
        if note:
            lines.append(note)
    return "\n".join(lines).rstrip() + "\n"


def _plot(report: dict[str, Any], key: str, scale: float, ylabel: str, title: str, path: Path) -> Path:
    # Figure + the Agg canvas directly: no pyplot, so no global backend is chosen or changed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, arm in report["arms"].items():
        ys = [math.nan if v is None else v * scale for v in arm[key]]
        line, = ax.plot(arm["rounds"], ys, marker="o", label=name)
        ci = arm.get(f"{key}_ci95")
        if ci:  # the 95% interval as a band
            lo = [math.nan if c is None else c[0] * scale for c in ci]
            hi = [math.nan if c is None else c[1] * scale for c in ci]
            ax.fill_between(arm["rounds"], lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    return atomic_write_bytes(path, buf.getvalue())


def write_plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    _plot(report, "accuracy", 100, "accuracy (%)", "Held-out accuracy (greedy pass@1), 95% intervals",
          out_dir / "accuracy.png")
    _plot(report, "mean_response_tokens", 1, "mean response tokens", "Response length",
          out_dir / "response_length.png")
    return ["accuracy.png", "response_length.png"]


