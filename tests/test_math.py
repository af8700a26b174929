"""Tests for the MATH path of the verifier (math-verify in a killable worker pool) and the MATH
loader: each answer class right and wrong, the hard timeout, use off the main thread, and
`exit-loop verify --task math` end to end. Real math-verify, real worker processes; no mocks."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from exit_loop.config import ConfigError, load_config
from exit_loop.errors import DataError
from exit_loop.jsonl import read_jsonl
from exit_loop.prompts import last_boxed as last_boxed_answer
from exit_loop.tasks import DataConfig, load_problems
from exit_loop.tasks.math import verify_math
from exit_loop.tasks.math_pool import TIMEOUT, WALL_FACTOR, MathPool
from exit_loop.verify import VerifyConfig, run, verify_row, verify_rows

ROOT = Path(__file__).resolve().parents[1]
# a 3,000-element tuple: math-verify's ANTLR parser needs seconds for it
SLOW = "(" + ",".join(str(i) for i in range(3000)) + ")"


def resp(answer: str, reasoning: str = "Half of the pie is left.") -> str:
    return f"{reasoning} </think> <answer>{answer}</answer>"


@pytest.fixture(scope="module")
def pool():
    with MathPool(workers=2, timeout_s=5.0) as p:
        yield p


# --------------------------------------------------------------------------- answer classes

# (class, ground truth, an equal answer, an unequal answer)
CLASSES = [
    ("boxed", r"\frac{1}{2}", r"\boxed{\frac{1}{2}}", r"\boxed{\frac{1}{3}}"),
    ("dollar delimiters", r"\frac{1}{2}", r"$\frac12$", r"$\frac13$"),
    ("paren delimiters", r"\frac{1}{2}", r"\(\frac{1}{2}\)", r"\(2\)"),
    ("dfrac", r"\frac{1}{2}", r"\dfrac{1}{2}", r"\dfrac{2}{1}"),
    ("slash fraction", r"-\frac{1}{3}", "-1/3", "1/3"),
    ("unreduced fraction", r"\frac{1}{2}", "2/4", "2/5"),
    ("decimal", r"\frac{1}{2}", "0.5", "0.6"),
    ("interval", r"(-\infty, 3]", r"(-\infty,3]", r"(-\infty, 3)"),
    ("union of intervals", r"(-\infty,-2)\cup(3,\infty)", r"(-\infty, -2) \cup (3, \infty)",
     r"(-\infty, -2] \cup (3, \infty)"),
    ("set", "3, 5", "5, 3", "3"),
    ("ordered pair", "(1, 2)", "(1,2)", "(2,1)"),
    ("polynomial", "x^2+2x+1", "(x+1)^2", "x^2+2x"),
    ("factored", "x^2+7x+10", "(x+5)(x+2)", "(x+5)(x-2)"),
    ("radical", r"2\sqrt{5}", r"\sqrt{20}", r"\sqrt{10}"),
    ("radical fraction", r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}", r"\frac{\sqrt{2}}{2}"),
    ("equation", "5", "x=5", "x=6"),
    ("text choice", r"\text{(C)}", "C", "B"),
    ("percent", r"10\%", "10", "11"),
    ("degrees", r"90^\circ", "90", "45"),
    ("money", r"\$18.90", "18.9", "19"),
    ("matrix", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}",
     r"\begin{pmatrix}2\\1\end{pmatrix}"),
    ("pi", r"2\pi", r"\pi \cdot 2", r"\pi"),
    ("integer (shortcut)", "42", "42", "43"),
    ("negative zero (shortcut)", "0", "-0", "1"),
    ("long integer (math-verify)", "1234567890123456789", "1234567890123456789.0", "1234567890123456788"),
]


@pytest.mark.parametrize("name,gold,equal,unequal", CLASSES, ids=[c[0] for c in CLASSES])
def test_answer_classes(pool, name, gold, equal, unequal):
    v = verify_math(resp(equal), gold, pool=pool)
    assert (v.is_correct, v.failure, v.format_ok, v.predicted) == (True, "none", True, equal)
    v = verify_math(resp(unequal), gold, pool=pool)
    assert (v.is_correct, v.failure, v.format_ok, v.predicted) == (False, "wrong", True, unequal)


def test_failure_classes_before_math_verify(pool):
    assert verify_math("no tags at all", "1", pool=pool).failure == "no_answer"
    assert verify_math("x </think> <answer> </answer>", "1", pool=pool).failure == "no_answer"
    assert verify_math("<think> x </think> <answer>1</answer>", "1", pool=pool).failure == "format"
    assert verify_math(resp("1") + " more text", "1", pool=pool).failure == "format"
    v = verify_math(resp(r"\frac{1}{3}"), r"\frac{1}{2}", "length", pool=pool)
    assert (v.is_correct, v.failure) == (False, "truncated")
    v = verify_math(resp(r"\frac{2}{4}"), r"\frac{1}{2}", "length", pool=pool)
    assert (v.is_correct, v.failure) == (True, "none")  # a right answer is right, even if cut off after
    for truth in (None, "", "   "):
        assert verify_math(resp("1"), truth, pool=pool).failure == "wrong"


def test_identical_text_is_correct_without_parsing(pool):
    before = pool.timeouts
    v = verify_math(resp(SLOW), SLOW, pool=pool)  # would time out in math-verify
    assert (v.is_correct, v.failure) == (True, "none") and pool.timeouts == before


def test_verify_row_math_uses_the_shared_pool():
    row = {"response": resp("(x+1)^2"), "ground_truth": "x^2+2x+1", "problem_id": "test-0"}
    out = verify_row(row, task="math")
    assert out == {**row, "predicted": "(x+1)^2", "is_correct": True, "format_ok": True, "failure": "none"}
    assert verify_row(row)["is_correct"] is False  # the GSM8K path compares last numbers: 2 vs 1
    with pytest.raises(ValueError, match="task"):
        verify_row(row, task="algebra")


def test_verify_rows_math_keeps_order_and_keys():
    rows = []
    for i in range(60):
        gold = rf"\frac{{{i}}}{{{i + 1}}}"
        answer = [f"{i}/{i + 1}", f"{i + 1}/{i}", "", "7"][i % 4]
        rows.append({"i": i, "ground_truth": gold,
                     "response": resp(answer) if answer else "no answer here"})
    out = list(verify_rows(rows, task="math", math_workers=2))
    assert [r["i"] for r in out] == list(range(60))
    assert [r["failure"] for r in out[:4]] == ["none", "wrong", "no_answer", "wrong"]
    assert all(set(r) == {"i", "ground_truth", "response", "predicted", "is_correct", "format_ok",
                          "failure"} for r in out)
    assert sum(r["is_correct"] for r in out) == 15


# --------------------------------------------------------------------------- the hard timeout

def test_timeout_gives_failure_timeout_and_the_pool_recovers():
    with MathPool(workers=1, timeout_s=0.3) as p:
        t0 = time.monotonic()
        v = verify_math(resp(SLOW + "1"), SLOW, pool=p)
        took = time.monotonic() - t0
        assert (v.is_correct, v.failure, v.format_ok) == (False, "timeout", True)
        assert took < 3.0 and p.timeouts == 1 and p.restarts == 1
        assert verify_math(resp("0.5"), r"\frac{1}{2}", pool=p).failure == "none"  # a new worker
        # a truncated row that times out is still called truncated (failure order)
        assert verify_math(resp(SLOW + "1"), SLOW, "length", pool=p).failure == "truncated"


def test_a_timeout_in_a_batch_costs_only_its_own_row():
    rows = [{"k": k, "response": resp("0.5"), "ground_truth": r"\frac{1}{2}"} for k in range(40)]
    rows[17] = {"k": 17, "response": resp(SLOW + "1"), "ground_truth": SLOW}
    t0 = time.monotonic()
    out = list(verify_rows(rows, task="math", math_workers=2, math_timeout_s=0.3))
    assert time.monotonic() - t0 < 10
    assert [r["k"] for r in out] == list(range(40))
    assert [r["failure"] for r in out] == ["none"] * 17 + ["timeout"] + ["none"] * 22


def test_dead_worker_is_replaced():
    with MathPool(workers=1, timeout_s=5.0) as p:
        assert p.check("1+1", "2") is True
        w = p._slots[0]
        assert w is not None
        w.proc.kill()
        w.proc.join(5)
        assert p.check(r"\frac{1}{2}", "0.5") is True  # sent to a new worker


def test_worker_killed_mid_check_counts_as_timeout():
    with MathPool(workers=1, timeout_s=30.0) as p:
        p.check("1", "1.0")  # start the worker
        proc = p._slots[0].proc  # type: ignore[union-attr]
        threading.Timer(0.5, proc.kill).start()
        t0 = time.monotonic()
        assert p.check(SLOW, SLOW + "1") == TIMEOUT
        assert time.monotonic() - t0 < 10 and p.restarts == 1


def test_the_budget_is_cpu_time_so_a_stalled_worker_is_not_a_timeout():
    # a stopped (or starved) worker uses no CPU: past timeout_s of wall-clock time its row goes on,
    # and only the wall-clock backstop, WALL_FACTOR * timeout_s, ends it
    with MathPool(workers=1, timeout_s=1.0) as p:
        p.check("1", "1.0")
        proc = p._slots[0].proc  # type: ignore[union-attr]
        os.kill(proc.pid, signal.SIGSTOP)
        threading.Timer(1.5, os.kill, (proc.pid, signal.SIGCONT)).start()
        t0 = time.monotonic()
        assert p.check(r"\frac{1}{2}", "0.5") is True
        assert 1.4 < time.monotonic() - t0 < WALL_FACTOR * 1.0 and p.timeouts == 0
        proc = p._slots[0].proc  # type: ignore[union-attr]
        os.kill(proc.pid, signal.SIGSTOP)  # and never resumed
        t0 = time.monotonic()
        assert p.check(r"\frac{1}{3}", "0.5") == TIMEOUT
        assert WALL_FACTOR * 1.0 - 0.05 < time.monotonic() - t0 < WALL_FACTOR * 1.0 + 1.0


def test_a_worker_that_cannot_start_is_an_error(tmp_path, monkeypatch):
    # a broken math-verify must stop the run, not label every row `timeout`
    (tmp_path / "math_verify.py").write_text("raise ImportError('math_verify is broken here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = MathPool(workers=1, timeout_s=5.0)
    p._ctx = multiprocessing.get_context("spawn")  # a fresh interpreter that sees the broken module
    with p, pytest.raises(RuntimeError, match="math-verify worker process exited"):
        p.check("1", "2")


def test_close_stops_the_workers():
    p = MathPool(workers=2, timeout_s=5.0)
    list(p.imap([(i, ("1", f"{i}/{i}")) for i in range(1, 40)]))
    procs = [w.proc for w in p._slots if w is not None]
    assert procs and all(pr.is_alive() for pr in procs)
    p.close()
    assert not any(pr.is_alive() for pr in procs)
    with pytest.raises(RuntimeError, match="closed"):
        p.check("1", "1")


def test_abandoned_iteration_leaves_the_pool_usable(pool):
    it = pool.imap((i, (rf"\frac{{1}}{{{i}}}", f"1/{i}")) for i in range(1, 500))
    assert next(it) == (1, True)
    it.close()
    assert pool.check("x+1", "1+x") is True


def test_bad_pool_settings():
    for kw in ({"workers": 0}, {"timeout_s": 0}, {"timeout_s": -1.0}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            MathPool(**kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="math_workers"):
        VerifyConfig(math_workers=0)
    with pytest.raises(ValueError, match="math_timeout_s"):
        VerifyConfig(math_timeout_s=0)


# --------------------------------------------------------------------------- threads

def test_works_from_a_non_main_thread():
    results: dict[str, object] = {}

    def body() -> None:
        try:
            results["one"] = verify_math(resp(r"\dfrac{2}{4}"), r"\frac{1}{2}").failure
            rows = [{"response": resp(SLOW + "1"), "ground_truth": SLOW},
                    {"response": resp("(x+1)^2"), "ground_truth": "x^2+2x+1"}]
            results["rows"] = [r["failure"] for r in
                               verify_rows(rows, task="math", math_workers=1, math_timeout_s=0.3)]
        except BaseException as e:  # noqa: BLE001 - reported below
            results["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join(60)
    assert not t.is_alive() and "error" not in results, results.get("error")
    assert results == {"one": "none", "rows": ["timeout", "none"]}


def test_several_threads_share_one_pool(pool):
    out: list[bool] = []

    def body(i: int) -> None:
        out.append(verify_math(resp(f"{i}/{i + 1}"), rf"\frac{{{i}}}{{{i + 1}}}", pool=pool).is_correct)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == [True] * 8


# --------------------------------------------------------------------------- stage and command

def _math_samples(path: Path) -> Path:
    rows = [
        {"problem_id": "test-0", "response": resp(r"\dfrac{1}{2}"), "ground_truth": r"\frac{1}{2}"},
        {"problem_id": "test-1", "response": resp("(-\\infty, 3)"), "ground_truth": r"(-\infty, 3]"},
        {"problem_id": "test-2", "response": "I do not know", "ground_truth": "4"},
        {"problem_id": "test-3", "response": resp(r"\sqrt{20}"), "ground_truth": r"2\sqrt{5}",
         "finish_reason": "stop"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_exit_loop_verify_task_math_end_to_end(tmp_path):
    src = _math_samples(tmp_path / "samples.jsonl")
    dst = tmp_path / "verified.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "exit_loop", "verify", "--task", "math",
                           "--input", str(src), "--output", str(dst), "math_workers=2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = read_jsonl(dst)
    assert [r["problem_id"] for r in out] == ["test-0", "test-1", "test-2", "test-3"]
    assert [r["failure"] for r in out] == ["none", "wrong", "no_answer", "none"]
    assert [r["is_correct"] for r in out] == [True, False, False, True]
    assert out[0]["predicted"] == r"\dfrac{1}{2}" and out[2]["predicted"] is None
    # the GSM8K checker refuses the same file: 2\sqrt{5} is no one number (the old last-number
    # rule read it as 5, and called (-oo, 3) equal to (-oo, 3])
    proc = subprocess.run([sys.executable, "-m", "exit_loop", "verify", "--input", str(src),
                           "--output", str(dst)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "samples.jsonl:4" in proc.stderr and "ground_truth" in proc.stderr


def test_task_from_a_config_file(tmp_path):
    src = _math_samples(tmp_path / "samples.jsonl")
    cfg_file = tmp_path / "verify.yaml"
    cfg_file.write_text(f"input: {src}\noutput: {tmp_path / 'v.jsonl'}\ntask: math\n"
                        "math_workers: 1\nmath_timeout_s: 2.5\n")
    cfg = load_config(VerifyConfig, cfg_file)
    assert (cfg.task, cfg.math_workers, cfg.math_timeout_s) == ("math", 1, 2.5)
    assert [r["is_correct"] for r in read_jsonl(run(cfg))] == [True, False, False, True]
    with pytest.raises(ConfigError, match="task"):
        load_config(VerifyConfig, None, ["task=algebra"])


def test_generate_config_carries_the_task():
    from exit_loop.pipeline.generate import GenerateConfig

    cfg = load_config(GenerateConfig, None, ["data.task=math", "data.dataset=math.jsonl"])
    assert cfg.data.task == "math"
    with pytest.raises(ConfigError, match="task"):
        load_config(GenerateConfig, None, ["data.task=algebra"])


# --------------------------------------------------------------------------- MATH loader

@pytest.mark.parametrize("solution,answer", [
    (r"So the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"First $\boxed{1}$, then $\boxed{\left(3, \frac{\pi}{2}\right)}$.", r"\left(3, \frac{\pi}{2}\right)"),
    (r"$\boxed{ \{1, 2\} }$", r"\{1, 2\}"),
    (r"We get $\fbox{7}$.", "7"),
    (r"$\boxed 5$.", "5"),
    (r"$\boxed{2}$ and an unclosed \boxed{3", "2"),
    ("no box at all", None),
])
def test_last_boxed_answer(solution, answer):
    assert last_boxed_answer(solution) == answer


def _write(path: Path, rows: list[dict], blank_at: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_at is not None:
        lines.insert(blank_at, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_math_loader_local_jsonl(tmp_path):
    rows = [
        {"problem": "What is $1/2 + 0$?", "solution": r"It is $\boxed{\frac{1}{2}}$.", "level": "Level 1"},
        {"problem": "Solve $x \\le 3$.", "solution": r"$\boxed{(-\infty, 3]}$"},
        {"problem": "MATH-500 style", "solution": r"... $\boxed{10}$", "answer": "10\\%"},
    ]
    path = _write(tmp_path / "test.jsonl", rows)
    ps = load_problems(DataConfig(dataset=str(path), split="test", task="math"))
    assert [p.id for p in ps] == ["test-0", "test-1", "test-2"]
    assert [p.ground_truth for p in ps] == [r"\frac{1}{2}", r"(-\infty, 3]", "10\\%"]  # `answer` wins
    assert ps[0].question == "What is $1/2 + 0$?" and ps[0].solution == rows[0]["solution"]
    sub = load_problems(DataConfig(dataset=str(path), split="test", task="math", num_examples=2,
                                   shuffle=True, seed=1))
    assert len(sub) == 2 and all(p in ps for p in sub)


def test_math_loader_errors_name_file_and_line(tmp_path):
    rows = [{"problem": "p", "solution": r"$\boxed{1}$"}, {"problem": "p", "solution": "no box"}]
    path = _write(tmp_path / "m.jsonl", rows, blank_at=1)
    with pytest.raises(DataError, match=rf"{path}:3: key 'solution': no \\boxed"):
        load_problems(DataConfig(dataset=str(path), task="math"))
    gsm = _write(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(DataError, match=rf"{gsm}:1: a MATH row needs 'problem'.*set data.task=gsm8k"):
        load_problems(DataConfig(dataset=str(gsm), task="math"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no problems"):
        load_problems(DataConfig(dataset=str(empty), task="math"))


def test_math_loader_from_the_hub(monkeypatch):
    from exit_loop.tasks import problem as problems_mod

    calls = []

    def fake_hub(cfg):  # the hub itself cannot be reached here
        calls.append((cfg.dataset, cfg.subset, cfg.split))
        return [{"problem": "p", "solution": r"$\boxed{\dfrac{3}{4}}$", "answer": r"\frac{3}{4}"}]

    monkeypatch.setattr(problems_mod, "rows_from_hub", fake_hub)
    ps = load_problems(DataConfig(dataset="HuggingFaceH4/MATH-500", subset="default", split="test",
                                  task="math"))
    assert calls == [("HuggingFaceH4/MATH-500", "default", "test")]
    assert [(p.id, p.ground_truth) for p in ps] == [("test-0", r"\frac{3}{4}")]


def test_math_group_by_level(tmp_path):
    rows = [{"problem": "p", "solution": r"$\boxed{1}$", "level": "Level 1"},
            {"problem": "q", "solution": r"$\boxed{2}$", "level": "Level 5"}]
    path = _write(tmp_path / "m.jsonl", rows)
    ps = load_problems(DataConfig(dataset=str(path), split="test", task="math", group_by="level"))
    assert [p.group for p in ps] == ["Level 1", "Level 5"]


def test_group_by_several_keys_the_first_is_the_group_the_rest_ride_along(tmp_path):
    rows = [{"problem": "p", "solution": r"$\boxed{1}$", "level": "Level 1", "type": "Algebra"},
            {"problem": "q", "solution": r"$\boxed{2}$", "level": "Level 5", "type": "Geometry"}]
    path = _write(tmp_path / "m.jsonl", rows)
    ps = load_problems(DataConfig(dataset=str(path), split="test", task="math", group_by=["level", "type"]))
    assert [(p.group, p.groups) for p in ps] == [("Level 1", (("type", "Algebra"),)), ("Level 5", (("type", "Geometry"),))]
    with pytest.raises(DataError, match=r"m.jsonl.*no key 'subject' \(data.group_by\)"):
        load_problems(DataConfig(dataset=str(path), split="test", task="math", group_by=["level", "subject"]))
    for bad in ([], ["level", "level"], ["level", "difficulty"]):
        with pytest.raises(ValueError, match="group_by"):
            DataConfig(dataset=str(path), task="math", group_by=bad)
