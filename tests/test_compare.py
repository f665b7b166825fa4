"""Paired comparison of two evaluations: exact McNemar p-values and Wilson intervals against hand-computed
numbers, problem matching by id, and clear errors for result files that cannot be compared."""

import json
import math

import pytest

from apr_jax import cli, compare


def _record(pid, correct, nums=(3, 5, 7), target=15):
    return {"problem": {"id": pid, "nums": list(nums), "target": target}, "correct": correct}


def _binomial_two_sided(k, n):
    """2 * P(X <= min(k, n - k)) for X ~ Binomial(n, 1/2), capped at 1 (the exact McNemar test)."""
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_mcnemar_exact_is_the_two_sided_sign_test_on_discordant_problems():
    assert compare.mcnemar_exact(23, 17) == pytest.approx(_binomial_two_sided(23, 40), rel=1e-9)
    assert compare.mcnemar_exact(23, 17) == pytest.approx(0.4296, abs=1e-4)
    assert compare.mcnemar_exact(31, 0) == pytest.approx(2 / 2 ** 31, rel=1e-9)
    assert compare.mcnemar_exact(5, 5) == 1.0
    assert compare.mcnemar_exact(0, 0) == 1.0  # no discordant problem: nothing tells them apart
    assert compare.mcnemar_exact(3, 9) == compare.mcnemar_exact(9, 3)
    with pytest.raises(ValueError, match=">= 0"):
        compare.mcnemar_exact(-1, 2)


def test_wilson_interval_matches_the_closed_form():
    z = 1.959963984540054
    for k, n in ((50, 200), (0, 100), (100, 100), (7, 13)):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        low, high = compare.wilson_interval(k, n)
        assert low == pytest.approx(max(0.0, centre - half), abs=1e-9)
        assert high == pytest.approx(min(1.0, centre + half), abs=1e-9)
    with pytest.raises(ValueError, match="0 <= correct <= n"):
        compare.wilson_interval(5, 4)


def test_paired_matches_problems_by_id_on_the_shared_ones():
    a = [_record(0, True), _record(1, True), _record(2, False), _record(3, True), _record(4, False)]
    b = [_record(3, False), _record(2, True), _record(1, True), _record(0, True)]  # no problem 4, another order
    p = compare.paired(a, b)
    assert (p.n, p.a_correct, p.b_correct, p.a_only, p.b_only) == (4, 3, 3, 1, 1)
    assert p.a_accuracy == p.b_accuracy == 0.75 and p.p_value == 1.0
    assert p.a_interval == compare.wilson_interval(3, 4)
    row = compare.table_row("A vs B", p)
    assert row.startswith("| A vs B | 4 | 75.0% [") and row.endswith("| 1 | 1 | 1 |")


def test_paired_refuses_what_cannot_be_compared():
    with pytest.raises(ValueError, match="share no problem ids"):
        compare.paired([_record(0, True)], [_record(1, True)])
    with pytest.raises(ValueError, match=r"problem id 0 is \[3, 5, 7\] -> 15 in A but \[1, 2, 3\] -> 6 in B"):
        compare.paired([_record(0, True)], [_record(0, True, nums=(1, 2, 3), target=6)])
    with pytest.raises(ValueError, match="B: problem id 0 appears twice"):
        compare.paired([_record(0, True)], [_record(0, True), _record(0, False)])
    with pytest.raises(ValueError, match="A: record 2 is not an evaluation result"):
        compare.paired([_record(0, True), {"answer": "x"}], [_record(0, True)])
    with pytest.raises(ValueError, match="correct=None"):
        compare.paired([{"problem": {"id": 0}, "correct": None}], [_record(0, True)])


def test_compare_command_prints_the_row_and_names_a_broken_file(tmp_path, capsys):
    a, b, bad = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "bad.jsonl"
    a.write_text("".join(json.dumps(_record(i, i < 30)) + "\n" for i in range(40)))
    b.write_text("".join(json.dumps(_record(i, i < 10)) + "\n" for i in range(40)))
    assert cli.main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| 40 | 75.0% [" in out and "| 20 | 0 | " in out  # problems 10..29: A only
    assert f"p = {_binomial_two_sided(20, 20):.3g}, told apart at 0.05" in out
    bad.write_text(json.dumps(_record(0, True)) + "\n{not json\n")
    assert cli.main(["compare", str(a), str(bad)]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err


def test_report_interval_bars_are_the_wilson_interval_around_each_accuracy():
    from apr_jax import report

    below, above = report.interval_bars([0.25, 0.0], 200)
    low, high = compare.wilson_interval(50, 200)
    assert below[0] == pytest.approx(100 * (0.25 - low)) and above[0] == pytest.approx(100 * (high - 0.25))
    assert below[1] == 0.0 and above[1] == pytest.approx(100 * compare.wilson_interval(0, 200)[1])
    below, above = report.interval_bars([0.5, 0.5], [10, 1000])  # one count per point: fewer problems, wider
    assert below[0] > 3 * below[1] and above[0] > 3 * above[1]
