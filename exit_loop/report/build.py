"""The report's numbers from the runs read (exit_loop.report.read): per arm and round the accuracy
with its 95% Wilson interval; for each pair of arms at each round the paired difference on the same
questions (paired bootstrap, exact McNemar); each arm's gain over its own round 0; and, where an
experiment ran several seeds, the same pooled over seeds (two-level bootstrap, t-interval over
seeds, how many seeds agree in sign).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from exit_loop.errors import DataError
from exit_loop.report.read import (FoundRun, check_eval_settings, read_outcomes, read_pass_rates, read_run,
                                   run_environment)
from exit_loop.stats import accuracy_interval, paired_difference, pooled_difference, t_interval, wilson


# a question's difficulty: the starting student's (round 0's) pass rate on it over eval.n samples
DIFFICULTY = ("pass rate 0", "pass rate (0, 0.5]", "pass rate (0.5, 1)", "pass rate 1")


def difficulty(rate: float) -> str:
    """The DIFFICULTY bucket of a pass rate."""
    return DIFFICULTY[0] if rate == 0 else DIFFICULTY[1] if rate <= 0.5 else DIFFICULTY[2] if rate < 1 else DIFFICULTY[3]


def _in_order(names: set[str], order: Sequence[str] | None) -> list[str]:
    return [g for g in order if g in names] if order else sorted(names)


def group_accuracy(outcomes: list[dict[str, bool] | None], groups: dict[str, str],
                   order: Sequence[str] | None = None) -> dict[str, Any]:
    """Per group of questions (`data.group_by`, or DIFFICULTY), each round's accuracy, its Wilson
    interval and n; groups in `order` (default: sorted)."""
    out: dict[str, Any] = {}
    for g in _in_order(set(groups.values()), order):
        acc, ci, ns = [], [], []
        for q in outcomes:
            xs = [v for pid, v in (q or {}).items() if groups.get(pid) == g]
            acc.append(round(sum(xs) / len(xs), 4) if xs else None)
            ci.append([round(x, 4) for x in wilson(sum(xs), len(xs))] if xs else None)
            ns.append(len(xs) if xs else None)
        out[g] = {"accuracy": acc, "accuracy_ci95": ci, "n": ns}
    return out


def _interval(outcomes: dict[str, bool] | None, accuracy: float | None, n: int | None) -> list[float] | None:
    """The 95% Wilson interval of a round's accuracy, over its questions."""
    if outcomes:
        k, n = sum(outcomes.values()), len(outcomes)
    elif accuracy is not None and n:
        k = round(accuracy * n)
    else:
        return None
    return [round(x, 4) for x in wilson(k, n)]


def paired_rows(report: dict[str, Any], outcomes: dict[str, list[dict[str, bool] | None]],
                allow_mismatch: bool = False) -> list[dict[str, Any]]:
    """For each pair of arms (in report order) and each round both evaluated: the paired
    difference in accuracy on the same questions, its 95% paired-bootstrap interval and the
    exact McNemar p-value. Arms evaluated on different questions are refused (DataError naming
    them) unless `allow_mismatch`, which pairs them on the questions they share."""
    names = list(report["arms"])
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = report["arms"][a].get("seed"), report["arms"][b].get("seed")
            if sa != sb:  # arms pair within a seed; across seeds, the pooled entries
                continue
            for r, (qa, qb) in enumerate(zip(outcomes[a], outcomes[b])):
                if not qa or not qb:
                    continue
                if set(qa) != set(qb):
                    only_a, only_b = sorted(set(qa) - set(qb)), sorted(set(qb) - set(qa))
                    if not allow_mismatch:
                        raise DataError(
                            f"arms {a!r} and {b!r} were evaluated on different questions at round {r} "
                            f"({len(only_a)} only in {a!r}, e.g. {only_a[:3]}; {len(only_b)} only in {b!r}, "
                            f"e.g. {only_b[:3]}): a paired comparison needs the same questions "
                            "(--allow_mismatch pairs them on the questions they share)")
                shared = sorted(set(qa) & set(qb))
                if not shared:
                    continue
                d = paired_difference([qa[q] for q in shared], [qb[q] for q in shared])
                row = {"a": a, "b": b, "round": report["arms"][a]["rounds"][r],
                       "diff": round(d["diff"], 4), "ci95": [round(x, 4) for x in d["ci95"]],
                       "p_mcnemar": d["p_mcnemar"], "n": d["n"]}
                if sa is not None:
                    row.update(a=report["arms"][a]["arm"], b=report["arms"][b]["arm"], seed=sa)
                out.append(row)
    return out + pooled_paired(report, outcomes)


def pooled_paired(report: dict[str, Any], outcomes: dict[str, list[dict[str, bool] | None]]) -> list[dict[str, Any]]:
    """Across seeds, for each pair of arms and round: the mean of the per-seed paired differences
    with a 95% interval from a two-level bootstrap (seeds, then questions within a seed); p is null
    (there is no one exact test across seeds)."""
    by_arm: dict[str, dict[int, str]] = {}
    for name, arm in report["arms"].items():
        if arm.get("seed") is not None:
            by_arm.setdefault(arm["arm"], {})[arm["seed"]] = name
    out = []
    arms = list(by_arm)
    for i, a in enumerate(arms):
        for b in arms[i + 1:]:
            seeds = sorted(set(by_arm[a]) & set(by_arm[b]))
            if len(seeds) < 2:
                continue
            rounds = report["arms"][by_arm[a][seeds[0]]]["rounds"]
            for r, rnd in enumerate(rounds):
                pairs = []
                for s in seeds:
                    qa, qb = outcomes[by_arm[a][s]][r], outcomes[by_arm[b][s]][r]
                    if qa and qb:
                        shared = sorted(set(qa) & set(qb))
                        pairs.append(([qa[q] for q in shared], [qb[q] for q in shared]))
                if len(pairs) < 2 or not all(p[0] for p in pairs):
                    continue
                out.append({"a": a, "b": b, "round": rnd, **over_seeds(pairs, seeds)})
    return out


def over_seeds(pairs: list[tuple[list[bool], list[bool]]], seeds: list[int]) -> dict[str, Any]:
    """A difference pooled over seeds (one (a, b) pair of outcome lists per seed): each seed's
    difference and sign, their mean with the t-interval over seeds (`t_ci95`), and the two-level
    bootstrap over seeds and questions (`ci95`) beside it."""
    d = pooled_difference(pairs)
    per_seed = [round(sum(x) / len(x) - sum(y) / len(y), 4) for x, y in pairs]
    t = t_interval(per_seed)
    return {"seed": None, "seeds": len(pairs), "seed_list": seeds[:len(pairs)], "per_seed": per_seed,
            "positive": sum(v > 0 for v in per_seed), "diff": round(d["diff"], 4),
            "t_ci95": [round(x, 4) for x in t] if t else None,
            "ci95": [round(x, 4) for x in d["ci95"]], "p_mcnemar": None, "n": d["n"]}


def gain_rows(report: dict[str, Any], outcomes: dict[str, list[dict[str, bool] | None]]) -> list[dict[str, Any]]:
    """Each arm's accuracy at every later round minus its own round 0, on the same questions: per
    run (paired bootstrap, exact McNemar) and, where the arm ran under several seeds, pooled over
    them (`over_seeds`)."""
    out: list[dict[str, Any]] = []
    by_arm: dict[str, dict[Any, str]] = {}
    for name, arm in report["arms"].items():
        by_arm.setdefault(arm["arm"], {})[arm["seed"]] = name
        q = outcomes[name]
        for r in range(1, len(q)):
            if q[0] and q[r]:
                shared = sorted(set(q[0]) & set(q[r]))
                d = paired_difference([q[r][x] for x in shared], [q[0][x] for x in shared])
                out.append({"arm": arm["arm"], "seed": arm["seed"], "round": arm["rounds"][r], "from_round": arm["rounds"][0],
                            "diff": round(d["diff"], 4), "ci95": [round(x, 4) for x in d["ci95"]],
                            "p_mcnemar": d["p_mcnemar"], "n": d["n"]})
    for arm, names in by_arm.items():
        seeds = sorted(s for s in names if s is not None)
        if len(seeds) < 2:
            continue
        rounds = report["arms"][names[seeds[0]]]["rounds"]
        for r in range(1, len(rounds)):
            pairs = []
            for s in seeds:
                q = outcomes[names[s]]
                if r < len(q) and q[0] and q[r]:
                    shared = sorted(set(q[0]) & set(q[r]))
                    pairs.append(([q[r][x] for x in shared], [q[0][x] for x in shared]))
            if len(pairs) >= 2:
                out.append({"arm": arm, "round": rounds[r], "from_round": rounds[0], **over_seeds(pairs, seeds)})
    return out


# per question: its group under one grouping (a run's name -> problem_id -> group), and the groups' order
Grouping = tuple[dict[str, dict[str, str]], Sequence[str] | None]


def pooled_arms(report: dict[str, Any], outcomes: dict[str, list[dict[str, bool] | None]],
                groupings: dict[str, Grouping] | None = None) -> dict[str, Any]:
    """Across seeds, per arm and round (and per group of questions under each grouping, e.g.
    `by_group`: the data's `group_by`, `by_difficulty`): the mean accuracy over seeds and its 95%
    interval from a two-level bootstrap over seeds and questions (`accuracy_interval`)."""
    groupings = groupings or {"by_group": ({}, None)}
    by_arm: dict[str, list[str]] = {}
    for name, arm in report["arms"].items():
        if arm.get("seed") is not None:
            by_arm.setdefault(arm["arm"], []).append(name)
    def over_seeds_per_round(names: list[str], rounds: list[int], keep) -> dict[str, list]:
        """Each round's mean over seeds of the questions `keep` selects, and its interval."""
        acc, ci = [], []
        for r in range(len(rounds)):
            per_seed = [[v for pid, v in outcomes[n][r].items() if keep(n, pid)]
                        for n in names if r < len(outcomes[n]) and outcomes[n][r]]
            per_seed = [x for x in per_seed if x]
            acc.append(round(sum(sum(x) / len(x) for x in per_seed) / len(per_seed), 4) if per_seed else None)
            ci.append([round(v, 4) for v in accuracy_interval(per_seed)] if per_seed else None)
        return {"accuracy": acc, "accuracy_ci95": ci}

    out = {}
    for arm, names in by_arm.items():
        rounds = report["arms"][names[0]]["rounds"]
        out[arm] = {"rounds": rounds, "seeds": [report["arms"][n]["seed"] for n in names],
                    **over_seeds_per_round(names, rounds, lambda n, pid: True)}
        for key, (groups, order) in groupings.items():
            out[arm][key] = {g: over_seeds_per_round(names, rounds, lambda n, pid, g=g, groups=groups:
                                                     groups.get(n, {}).get(pid) == g)
                             for g in _in_order({g for n in names for g in groups.get(n, {}).values()}, order)}
    return out


def cost_rows(arm: dict[str, Any]) -> dict[str, list]:
    """What each round's gain cost, counted from round 0 through the round before the eval that
    measures it: generated tokens, training tokens and stage seconds (wall clock), each per held-out
    point gained over round 0 and per training question first solved by a sample; None where a
    count or the gain is missing or not positive."""
    def total(values: list, upto: int) -> float | None:
        xs = values[:upto]
        return None if not xs or any(v is None for v in xs) else float(sum(xs))

    def per(x: float | None, y: float | None) -> float | None:
        return None if x is None or not y or y <= 0 else round(x / y, 1)

    out: dict[str, list] = {key: [] for key in ("points", "newly_solved", "tokens_generated", "training_tokens",
                                                "seconds", "tokens_per_point", "seconds_per_point",
                                                "tokens_per_solved", "seconds_per_solved")}
    acc = arm["accuracy"]
    seconds = [sum(v for v in vals if v is not None) if any(v is not None for v in vals) else None
               for vals in zip(*(arm["wall_time_s"][s] for s in arm["wall_time_s"]))]
    for r in range(1, len(arm["rounds"])):
        points = None if acc[0] is None or acc[r] is None else round(100 * (acc[r] - acc[0]), 2)
        solved = total(arm["newly_solved"], r)
        gen, train, secs = total(arm["tokens_generated"], r), total(arm["training_tokens"], r), total(seconds, r)
        for key, value in (("points", points), ("newly_solved", solved), ("tokens_generated", gen),
                           ("training_tokens", train), ("seconds", secs), ("tokens_per_point", per(gen, points)),
                           ("seconds_per_point", per(secs, points)), ("tokens_per_solved", per(gen, solved)),
                           ("seconds_per_solved", per(secs, solved))):
            out[key].append(value)
    return out


def build_report(runs: list[FoundRun], allow_mismatch: bool = False) -> dict[str, Any]:
    check_eval_settings(runs, allow_mismatch)
    arms, outcomes, groups, hardness = {}, {}, {}, {}
    further: dict[str, dict[str, dict[str, str]]] = {}  # group_by's further key -> run -> problem_id -> value
    envs: list[dict[str, Any]] = []
    for run in runs:
        arm = read_run(run)
        outcomes[run.arm], groups[run.arm], more = read_outcomes(run, arm["rounds"])
        arm["by_group"] = group_accuracy(outcomes[run.arm], groups[run.arm])
        for key, values in more.items():
            arm[f"by_{key}"] = group_accuracy(outcomes[run.arm], values)
            further.setdefault(key, {})[run.arm] = values
        rates = read_pass_rates(run)  # the starting student's, on each held-out question
        hardness[run.arm] = {pid: difficulty(r) for pid, r in (rates or {}).items()}
        arm["by_difficulty"] = group_accuracy(outcomes[run.arm], hardness[run.arm], DIFFICULTY)
        env = run_environment(run)
        for e in envs:
            if e["environment"] == env:
                e["runs"].append(run.arm)
                break
        else:
            if env is not None:
                envs.append({"environment": env, "runs": [run.arm]})
        ns = arm.pop("n")
        arm["accuracy_ci95"] = [_interval(q, acc, n) for q, acc, n in zip(outcomes[run.arm], arm["accuracy"], ns)]
        arm["n_questions"] = [len(q) if q else n for q, n in zip(outcomes[run.arm], ns)]
        arm["arm"], arm["seed"] = run.base_arm or run.arm, run.seed
        arm["cost"] = cost_rows(arm)
        arms[run.arm] = arm
    report: dict[str, Any] = {"arms": arms, "generated_by": "exit-loop compare", "environments": envs}
    report["paired"] = paired_rows(report, outcomes, allow_mismatch)
    report["gains"] = gain_rows(report, outcomes)
    if any(arm["seed"] is not None for arm in arms.values()):
        groupings: dict[str, Grouping] = {"by_group": (groups, None)}
        groupings.update({f"by_{key}": (values, None) for key, values in further.items()})
        if any(hardness.values()):
            groupings["by_difficulty"] = (hardness, DIFFICULTY)
        report["pooled"] = pooled_arms(report, outcomes, groupings)
    return report


