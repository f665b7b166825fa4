"""The SoS+/SC/APR runtime driven by a scripted engine that replays the release's golden demonstrations:
continuations rebuilt byte-exact, budgets and malformed output each with a defined, recorded outcome."""

import collections
import heapq

import pytest

from apr_jax.countdown import traces
from apr_jax.data import tokenizer as T
from apr_jax.inference import runtime
from apr_jax.inference.engine import Finished, common_prefix


class ScriptedEngine:
    """Engine double: every admitted thread finishes at the next step with ``respond(key, prompt text)``
    (then EOS), cut at a join marker or at its token limit, exactly as the real engine reports them."""

    def __init__(self, codec, respond, slots=4, context=16384):
        self.codec, self.respond, self.slots, self.context = codec, respond, slots, context
        self.steps, self.order = 0, 0
        self.rows: dict = {}  # key -> [slot, running, prompt ids]
        self._queue: list = []
        self._cont: list = []
        self.continued: list = []  # (key, prompt tokens, new prompt tokens) of continuations in place
        self.marker = codec.ids(traces.JOIN_OPEN)

    def submit(self, key, prompt, max_new, rng, priority=1):
        assert key not in self.rows
        self.order += 1
        heapq.heappush(self._queue, (priority, self.order, key, list(prompt), max_new))

    def continue_thread(self, key, prompt, max_new, rng, new_key=None):
        slot, running, old = self.rows.pop(key)
        assert not running
        keep = common_prefix(old, prompt)
        self._cont.append((new_key or key, slot, list(prompt), max_new, len(prompt) - keep))
        self.continued.append((new_key or key, len(prompt), len(prompt) - keep))

    def release(self, key):
        assert not self.rows.pop(key)[1]

    @property
    def free_slots(self):
        return self.slots - len(self.rows) - len(self._cont)

    @property
    def queued(self):
        return len(self._queue)

    @property
    def idle(self):
        return not self._queue and not self._cont and not any(r[1] for r in self.rows.values())

    def step(self):
        starts = [(key, slot, prompt, max_new, new) for key, slot, prompt, max_new, new in self._cont]
        self._cont = []
        used = {r[0] for r in self.rows.values()} | {s[1] for s in starts}
        free = [s for s in range(self.slots) if s not in used]
        while self._queue and free:
            _, _, key, prompt, max_new = heapq.heappop(self._queue)
            starts.append((key, free.pop(0), prompt, max_new, len(prompt)))
        out = []
        for key, slot, prompt, max_new, new in starts:
            ids = self.codec.ids(self.respond(key, self.codec.text(prompt))) + [self.codec.eos_id]
            stop = "eos"
            for i in range(len(ids)):
                if ids[i:i + len(self.marker)] == self.marker:
                    ids, stop = ids[:i + len(self.marker)], "stop_sequence"
                    break
            if len(ids) > max_new:
                ids, stop = ids[:max_new], "length"
            self.rows[key] = [slot, False, prompt + ids]
            out.append(Finished(key, slot, len(prompt), new, ids, [0.0] * len(ids), stop, self.steps,
                                self.steps + len(ids), 0.0, 1.0))
        self.steps += max([len(f.tokens) for f in out], default=0)
        return out


@pytest.fixture(scope="module")
def codec():
    return runtime.Codec(T.build_tokenizer("digits"), T.BOS_ID, T.EOS_ID)


def replay(calls, otherwise="\nNo solution found."):
    """Respond to any prompt with the rest of the recorded call it begins (``otherwise`` if none)."""
    def respond(key, prompt):
        call = next((c for c in calls if c.startswith(prompt)), None)
        return otherwise if call is None else call[len(prompt):]
    return respond


@pytest.mark.parametrize("slots", [1, 3, 16])
def test_apr_replays_golden_demonstrations(golden_apr, codec, slots):
    recs = golden_apr[:12]
    calls = [t for r in recs for _, t in traces.iter_calls(r["trace_dict"])]
    engine = ScriptedEngine(codec, replay(calls), slots=slots)
    results = runtime.Runtime(engine, codec, runtime.RunConfig("apr")).solve(recs)
    for rec, res in zip(recs, results):
        td = rec["trace_dict"]
        parents = [t["prompt"] + t["output"] for t in res["threads"] if t["role"] == "parent"]
        assert parents == td["main_calls"]  # every continuation rebuilt byte-exact
        assert res["children"] == traces.count_children(td)
        assert res["correct"] == (traces.solution_path(rec["search_path"]) is not None)
        assert res["sequential_tokens"] <= res["total_tokens"]
        on_path = [t for t in res["threads"] if t["on_answer_path"]]
        assert bool(on_path) == (res["answer"] is not None)
    assert engine.idle and not engine.rows  # every slot released
    # A continuation that kept its slot prefills only the join block, not the whole parent again.
    assert all(new < prompt_len for _, prompt_len, new in engine.continued)
    assert bool(engine.continued) == (slots > 1)  # one slot: the parent must give it up to its children


def test_token_accounting_does_not_depend_on_whether_the_parent_kept_its_cache(golden_apr, codec):
    recs = golden_apr[:6]
    calls = [t for r in recs for _, t in traces.iter_calls(r["trace_dict"])]
    runs = {}
    for slots in (1, 16):  # one slot: every parent gives its slot to its children and is prefilled again
        engine = ScriptedEngine(codec, replay(calls), slots=slots)
        runs[slots] = runtime.Runtime(engine, codec, runtime.RunConfig("apr")).solve(recs)
        assert bool(engine.continued) == (slots == 16)
    for one, many in zip(runs[1], runs[16]):
        assert (one["total_tokens"], one["sequential_tokens"]) == (many["total_tokens"], many["sequential_tokens"])
        conts = [t for t in one["threads"] if t["role"] == "parent" and t["call"] > 0]
        assert all(t["new_prompt_tokens"] == t["prompt_tokens"] > t["shared_prompt_tokens"] > 0 for t in conts)
        # charged = the continuation's new tokens beyond the previous call, plus the whole first call
        expected = sum(t["prompt_tokens"] - t["shared_prompt_tokens"] + t["tokens"] for t in one["threads"])
        assert one["total_tokens"] == expected


def test_apr_with_one_slot_gives_the_same_trees(golden_apr, codec):
    recs = golden_apr[:6]
    calls = [t for r in recs for _, t in traces.iter_calls(r["trace_dict"])]
    outs = []
    for slots in (1, 8):
        res = runtime.Runtime(ScriptedEngine(codec, replay(calls), slots=slots), codec,
                              runtime.RunConfig("apr")).solve(recs)
        outs.append([[(t["path"], t["prompt"], t["output"]) for t in r["threads"]] for r in res])
    assert outs[0] == outs[1]


def test_malformed_output_is_recorded_and_the_batch_goes_on(golden_apr, codec):
    good = golden_apr[1]
    good_calls = [t for _, t in traces.iter_calls(good["trace_dict"])]
    first = golden_apr[0]["trace_dict"]["main_calls"][0]
    prompt0 = traces.apr_prompt(golden_apr[0]["nums"], golden_apr[0]["target"])
    cases = {
        "malformed spawn block": first.replace("Moving to Node #0,2\n", "Moving to Node #9,9\n"),
        "never closed": first.replace(traces.SPAWN_CLOSE + "\n", "Exploring Operation: 1+1=2\n"),
        "join marker": prompt0 + "\n<Sub Searches>\nlater text",
        "no solution path": prompt0 + "\n}}}} garbage ((((",
    }
    for expected, bad_call in cases.items():
        engine = ScriptedEngine(codec, replay([bad_call] + good_calls))
        res = runtime.Runtime(engine, codec, runtime.RunConfig("apr")).solve([golden_apr[0], good])
        assert expected in res[0]["reason"] and not res[0]["correct"]
        assert res[1]["correct"] == (traces.solution_path(good["search_path"]) is not None)
        assert engine.idle and not engine.rows
    res = runtime.Runtime(ScriptedEngine(codec, replay([prompt0 + "\n<Sub Searches>\nx"])), codec,
                          runtime.RunConfig("apr")).solve([golden_apr[0]])
    assert res[0]["threads"][0]["stop"] == "join_marker"
    assert res[0]["threads"][0]["output"].endswith(traces.JOIN_OPEN)  # cut at the marker


def test_spawn_and_children_limits(golden_apr, codec):
    rec = next(r for r in golden_apr if len(r["trace_dict"]["sub_calls"][0]) >= 3)
    calls = [t for _, t in traces.iter_calls(rec["trace_dict"])]
    res = runtime.Runtime(ScriptedEngine(codec, replay(calls)), codec,
                          runtime.RunConfig("apr", budgets=runtime.Budgets(max_children=2))).solve([rec])[0]
    kids = [t for t in res["threads"] if t["role"] == "child" and t["path"].startswith("p0.")]
    assert [t["stop"] for t in kids[2:]] == ["not_run"] * (len(kids) - 2)
    continuation = next(t for t in res["threads"] if t["path"] == "p1")["prompt"]
    assert all(f"{traces.JOIN_FAIL}{i} " in continuation for i in range(2, len(kids)))
    res = runtime.Runtime(ScriptedEngine(codec, replay(calls)), codec,
                          runtime.RunConfig("apr", budgets=runtime.Budgets(max_spawns=0))).solve([rec])[0]
    assert "spawn limit 0" in res["reason"] and res["children"] == 0


def test_sosp_context_and_problem_budgets(golden_sosp, codec):
    recs = golden_sosp[:4]
    respond = replay([r["search_path"] for r in recs])
    full = runtime.Runtime(ScriptedEngine(codec, respond), codec, runtime.RunConfig("sosp")).solve(recs)
    assert [r["correct"] for r in full] == [traces.solution_path(r["search_path"]) is not None for r in recs]
    short = runtime.Runtime(ScriptedEngine(codec, respond, context=64), codec, runtime.RunConfig("sosp")).solve(recs)
    assert all(not r["correct"] and r["threads"][0]["stop"] == "thread_limit" for r in short)
    assert all(r["total_tokens"] <= 64 for r in short)
    budget = runtime.RunConfig("sosp", budgets=runtime.Budgets(max_total_tokens=100))
    capped = runtime.Runtime(ScriptedEngine(codec, respond), codec, budget).solve(recs)
    assert all(r["threads"][0]["stop"] == "problem_budget" and r["total_tokens"] <= 100 for r in capped)
    assert all("budget" in r["reason"] for r in capped)


def test_self_consistency_votes_over_answers(golden_sosp, codec):
    rec = next(r for r in golden_sosp if traces.solution_path(r["search_path"]) is not None)
    prompt = traces.sosp_prompt(rec["nums"], rec["target"])
    right = rec["search_path"][len(prompt):]
    # Two samples fail, one succeeds: pass@3 true, cons@3 decided among valid answers only.
    outputs = {"s0": "\nNo solution found.", "s1": right, "s2": "\nNo solution found."}
    res = runtime.Runtime(ScriptedEngine(codec, lambda key, _: outputs[key[1]]), codec,
                          runtime.RunConfig("sc", samples=3)).solve([rec])[0]
    assert res["pass"] and res["correct"]  # the only valid answer wins the vote
    assert [s["correct"] for s in res["samples"]] == [False, True, False]
    assert [t["on_answer_path"] for t in res["threads"]] == [False, True, False]
    assert res["sequential_tokens"] < res["total_tokens"]
    summary = runtime.summarize([res])
    assert summary["pass_at_n"] == 1.0 and summary["cons_at_n"] == 1.0
    assert collections.Counter(summary["thread_stops"]) == {"eos": 3}


def test_child_solved_needs_a_verified_child_path_from_the_problem():
    from apr_jax.inference.runtime import child_solved, summarize

    prompt = "Moving to Node #0,3\nCurrent State: 31:[17, 14], Operations: ['26-12=14']"
    output = ("\nExploring Operation: 17+14=31, Resulting Numbers: [31]\n31,31 equal: Goal Reached\n"
              "Moving to Node #0,3\nCurrent State: 31:[17, 14], Operations: ['26-12=14']\n"
              "Exploring Operation: 17+14=31, Resulting Numbers: [31]\n31,31 equal: Goal Reached\n")
    child = {"role": "child", "stop": "eos", "prompt": prompt, "output": output}
    result = {"mode": "apr", "problem": {"id": 0, "nums": [12, 26, 17], "target": 31}, "correct": False,
              "total_tokens": 1, "sequential_tokens": 1, "children": 1, "threads": [child]}
    assert child_solved(result)
    assert summarize([result])["child_solved"] == 1.0
    wrong_root = dict(result, problem={"id": 0, "nums": [12, 25, 17], "target": 31})  # 26 is not an input
    assert not child_solved(wrong_root)
    wrong_sum = dict(result, threads=[dict(child, output=output.replace("17+14=31", "17+14=30"))])
    assert not child_solved(wrong_sum)
    assert not child_solved(dict(result, threads=[dict(child, stop="thread_limit")]))
    assert "child_solved" not in summarize([dict(result, mode="sosp")])


def test_assembly_splits_problems_by_child_path_and_parent_answer():
    from apr_jax.inference.runtime import assembly

    prompt = "Moving to Node #0,3\nCurrent State: 31:[17, 14], Operations: ['26-12=14']"
    path = "Exploring Operation: 17+14=31, Resulting Numbers: [31]\n31,31 equal: Goal Reached\n"
    child = {"role": "child", "stop": "eos", "prompt": prompt,
             "output": "\n" + path + prompt + "\n" + path}
    found = {"problem": {"id": 0, "nums": [12, 26, 17], "target": 31}, "threads": [child]}
    results = [dict(found, correct=True, answer="..."), dict(found, correct=False, answer="a wrong path"),
               dict(found, correct=False, answer=None), dict(found, correct=False, answer=None),
               dict(found, threads=[], correct=True, answer="..."), dict(found, threads=[], correct=False, answer=None)]
    assert assembly(results) == {"problems": 6, "child_path": 4, "assembled": 1, "wrong_answer": 1,
                                 "no_answer": 2, "solved_without_child": 1}


def test_departure_names_the_first_operation_off_every_verified_child_path():
    from apr_jax.inference.runtime import departure, departures, verified_child_paths

    prompt = "Moving to Node #0,3\nCurrent State: 31:[17, 14], Operations: ['26-12=14']"
    path = "Exploring Operation: 17+14=31, Resulting Numbers: [31]\n31,31 equal: Goal Reached\n"
    child = {"role": "child", "stop": "eos", "prompt": prompt, "output": "\n" + path + prompt + "\n" + path}
    root = "Moving to Node #0\nCurrent State: 31:[12, 26, 17], Operations: []\n"

    def parent(first: str, second: str, state: str = "31:[17, 14]") -> dict:
        out = (f"31,31 equal: Goal Reached\n{root}Exploring Operation: {first}, Resulting Numbers: [17, 14]\n"
               f"Generated Node #0,3: {state} Operation: {first}\nMoving to Node #0,3\n"
               f"Current State: {state}, Operations: ['{first}']\n"
               f"Exploring Operation: {second}, Resulting Numbers: [31]\n31,31 equal: Goal Reached\n"
               "Exploring Operation: 1+2=3, Resulting Numbers: [3]\n")  # after the path: not part of it
        return {"role": "parent", "stop": "eos", "prompt": "...", "output": out}

    def result(last: dict, correct: bool = False, children=(child,)) -> dict:
        spawn = {"role": "parent", "stop": "spawn", "prompt": "...", "output": "31,31 equal: Goal Reached\n"}
        return {"problem": {"id": 0, "nums": [12, 26, 17], "target": 31}, "correct": correct,
                "threads": [spawn, *children, last]}

    assert verified_child_paths(result(parent("26-12=14", "17+14=31"))) == [("26-12=14", "17+14=31")]
    assert departure(result(parent("12+26=38", "17+14=31"))) == "operation 1"
    assert departure(result(parent("26-12=14", "17*14=238"))) == "operation 2"
    assert departure(result(parent("26-12=14", "17+14=31", state="31:[17, 41]"))) == "operations right"
    no_path = {"role": "parent", "stop": "eos", "prompt": "...", "output": "No solution found.\n"}
    assert departure(result(no_path)) == "no path"
    assert departure(result(parent("26-12=14", "17+14=31"), correct=True)) is None  # solved
    assert departure(result(parent("12+26=38", "17+14=31"), children=())) is None  # no verified child
    wrong_child = dict(child, output=child["output"].replace("17+14=31", "17+14=30"))
    assert departure(result(parent("12+26=38", "17+14=31"), children=(wrong_child,))) is None
    many = [result(parent("12+26=38", "x")), result(parent("26-12=14", "17*14=238")), result(no_path),
            result(parent("12+26=38", "17+14=31"))]
    assert departures(many) == {"no path": 1, "operation 1": 2, "operation 2": 1}
