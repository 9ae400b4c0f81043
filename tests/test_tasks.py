"""Built-in task families: determinism, held-out splits, mixed-quality demonstrations, and
judges that gamed responses (padding, keyword stuffing, leaked answers) cannot win."""

import json

import pytest

from pipeline.objectives import build_objectives
from pipeline.tasks import TASKS, splits, write_builtin
from pipeline.tasks import assistant, math_word, tutoring


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generators_are_deterministic_with_disjoint_splits(task):
    a, b = splits(task, 40, 12, seed=3), splits(task, 40, 12, seed=3)
    assert a == b
    assert splits(task, 40, 12, seed=4)["train"][0] != a["train"][0]
    train_q = {p["prompt"][-1]["content"] for p in a["train"][0]}
    eval_q = {p["prompt"][-1]["content"] for p in a["eval"][0]}
    assert eval_q and not train_q & eval_q
    assert len(a["eval"][0]) == 12 and all(p["task"] == task for p in a["eval"][0])


def test_assistant_held_out_prompts_are_worded_as_never_in_training():
    s = splits("assistant", 400, 200, seed=0)
    phrasing = lambda rows: {json.loads(p["meta"])["topic"] and p["prompt"][0]["content"] for p in rows}  # noqa: E731
    assert not phrasing(s["train"][0]) & phrasing(s["eval"][0])
    assert len(s["eval"][0]) == 96  # 24 topics x 4 held-out phrasings: room for >= 64 paired problems
    strip = lambda rows: {p["prompt"][0]["content"].replace(json.loads(p["meta"])["topic"], "{t}") for p in rows}  # noqa: E731
    assert not strip(s["train"][0]) & strip(s["eval"][0])  # no held-out phrasing is a training phrasing


def _demo_scores(task: str, n: int = 160) -> dict[str, float]:
    """Mean score of each objective over the family's SFT demonstrations (full dialogues for tutoring)."""
    fam = TASKS[task]
    problems, sft = fam.generate(n, 0, "train")
    objs = build_objectives(fam.objectives)
    items = []
    for p in problems:
        demos = [d for d in sft if d["id"].startswith(p["id"] + "-demo")]
        if fam.multi_turn:
            last = demos[-1]
            dialogue = last["prompt"] + [{"role": "assistant", "content": last["completion"]}]
            dialogue.append({"role": "user", "content": tutoring.student(dialogue, p["meta"])})
            response = dialogue[len(p["prompt"]):]
        else:
            response = demos[0]["completion"]
        items.append({"prompt": p["prompt"], "response": response, "reference": p["reference"], "meta": p["meta"]})
    return {name: sum(o.score_batch(items)) / len(items) for name, o in objs.items()}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_demonstrations_are_of_mixed_quality(task):
    """An SFT model trained on them starts imperfect on every objective."""
    for name, mean in _demo_scores(task).items():
        assert 0.2 < mean < 0.9, (task, name, mean)


def _math_case():
    problems, sft = math_word.generate(30, 1, "train")
    i = next(k for k, p in enumerate(problems) if json.loads(p["meta"])["demo_style"] == "engaging")
    return problems[i], sft[i]["completion"]


def test_math_engagement_resists_gaming():
    p, good = _math_case()
    meta = p["meta"]
    base = math_word.engagement(p["prompt"], good, p["reference"], meta)
    assert base > 0.6
    filler = "\n\n".join(["We think this is so because we check and notice it, so let's remember that."] * 12)
    assert math_word.engagement(p["prompt"], good + "\n\n" + filler, p["reference"], meta) < 0.5 * base  # padding
    stuffed = "Let's think, because so we first notice, then next check, so remember: " + " ".join(
        str(v) for v in json.loads(meta)["values"])
    assert math_word.engagement(p["prompt"], stuffed, p["reference"], meta) == 0.0  # keyword stuffing
    notation = "\n\n".join(f"${x} = {v}$" for x, v in json.loads(meta)["steps"])
    assert math_word.engagement(p["prompt"], notation, p["reference"], meta) == 0.0  # notation without words
    prose = "\n\n".join(["Math is a wonderful subject and we all love learning new things every single day."] * 3)
    assert math_word.engagement(p["prompt"], prose, p["reference"], meta) == 0.0  # length alone, ungrounded


def test_assistant_judges_resist_gaming_and_pull_apart():
    meta = {"topic": "sleep better"}
    sents = [s for _, s in assistant.TOPICS["sleep better"]]
    full, two = " ".join(sents), " ".join(sents[:2])
    th, co = assistant.thoroughness, assistant.concision
    assert th(None, full, None, meta) == 1.0 and th(None, two, None, meta) == 0.5
    assert co(None, two, None, meta) > 0.9 and co(None, full, None, meta) < 0.7  # they pull against each other
    assert th(None, " ".join([sents[0]] * 8), None, meta) == 0.25  # repetition adds nothing
    assert th(None, "Schedule, screens, phone, caffeine, coffee, dark, cool, quiet room.", None, meta) == 0.0  # stuffing
    assert th(None, "Keep a schedule and no phone or coffee in a dark room.", None, meta) == 0.25  # one line, one aspect
    padded = two + " It is important to note that everyone is different. I hope this helps!"
    assert co(None, padded, None, meta) < 0.5 * co(None, two, None, meta)  # filler and padding
    assert co(None, "Drink more water and eat fruit every morning to feel great.", None, meta) == 0.0  # off topic
    assert th(None, "", None, meta) == 0.0 and co(None, "", None, meta) == 0.0


def _dialogue(problem, tutor_turns):
    d = list(problem["prompt"])
    for t in tutor_turns:
        d.append({"role": "assistant", "content": t})
        d.append({"role": "user", "content": tutoring.student(d, problem["meta"])})
        if tutoring.done(d, problem["meta"]):
            break
    return d[len(problem["prompt"]):]


def test_tutoring_student_and_judges():
    p = tutoring.generate(5, 2, "train")[0][0]
    meta = json.loads(p["meta"])
    answer = meta["values"][-1]
    scaffold = [f"What is {e.split(' ')[0]} {e.split(' ')[1]} {e.split(' ')[2]}?" for e, _ in meta["steps"]]
    good = _dialogue(p, scaffold)
    assert tutoring.accuracy(p["prompt"], good, p["reference"], meta) == 1.0
    assert tutoring.engagement(p["prompt"], good, p["reference"], meta) == 1.0
    leak = _dialogue(p, [f"The answer is {answer}."])  # answer leaking: accurate, not engaging
    assert tutoring.accuracy(p["prompt"], leak, p["reference"], meta) == 1.0
    assert tutoring.engagement(p["prompt"], leak, p["reference"], meta) == 0.0
    lecture = _dialogue(p, ["Think carefully about the problem and read it again slowly."] * 3)
    assert tutoring.accuracy(p["prompt"], lecture, p["reference"], meta) == 0.0
    assert tutoring.engagement(p["prompt"], lecture, p["reference"], meta) == 0.0
    vague = _dialogue(p, ["What do you think??? Really??? Why???"] * 3)  # question-mark stuffing, ungrounded
    assert tutoring.engagement(p["prompt"], vague, p["reference"], meta) == 0.0
    e, v = meta["steps"][0]
    wrong = _dialogue(p, [f"Careful: {e} = {v + 1}. " + scaffold[0]] + scaffold[1:])  # states a falsehood
    assert tutoring.accuracy(p["prompt"], wrong, p["reference"], meta) == 0.0
    assert tutoring.false_claims(f"So {e} = {v}, and the answer is {answer}.", answer) == 0


def test_write_builtin_all_families(tmp_path):
    from pipeline.data import read_records

    paths = write_builtin(tmp_path, 6, 3, seed=0)
    probs, _ = read_records(paths["problems_eval"], "problem")
    sft, _ = read_records(paths["sft_train"], "sft")
    assert sorted(set(probs.column("task").to_pylist())) == sorted(TASKS)
    assert sft.num_rows >= 18  # tutoring contributes one SFT row per tutor turn


def test_score_tasks_job_on_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    """The scoring job end to end, with a user's objective added in config (no code change in pipeline/)."""
    from jobs.score_tasks import main

    (tmp_path / "user_judges.py").write_text("def short(prompt, response, reference, meta):\n"
                                             "    return 1.0 if len(response) < 200 else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tmp_path / "score.yaml"
    cfg.write_text("objectives:\n  assistant:\n    - {name: short, kind: judged, judge: {callable: 'user_judges:short'}}\n")
    res = main(["--config", str(cfg), "--model.name_or_path", tiny_model_dir, "--model.dtype", "float32",
                "--n_eval", "2", "--out_dir", str(tmp_path / "out")])
    tmp_path = tmp_path / "out"
    assert res["assistant"]["short"]["n"] == 2
    assert set(res) == set(TASKS)
    for task, fam in TASKS.items():
        assert {o["name"] for o in fam.objectives} <= set(res[task])
        assert all(0.0 <= res[task][o["name"]]["mean"] <= 1.0 for o in fam.objectives)
    assert (tmp_path / "scores.md").read_text().count("\n") == 3 + sum(len(f.objectives) for f in TASKS.values())
    assert len((tmp_path / "episodes.jsonl").read_text().splitlines()) == 2 * len(TASKS)


def test_builtin_families_name_objectives_apart_unless_shared():
    from pipeline.tasks import check_shared, objective_ids

    ids = objective_ids()
    assert ids[("math_word", "accuracy")] != ids[("tutoring", "accuracy")]  # different definitions, two ids
    assert len(set(ids.values())) == len(ids) == 6
    shared = objective_ids(["accuracy"])
    assert shared[("math_word", "accuracy")] == shared[("tutoring", "accuracy")] == "accuracy"
    assert len(set(shared.values())) == 5
    with pytest.raises(ValueError, match=r"shared_objectives: \['acuracy'\] is no task's objective"):
        check_shared(["acuracy"])
    assert check_shared(["politeness"], {"assistant": [{"name": "politeness"}]}) == ["politeness"]


@pytest.mark.parametrize("shared,heads", [
    ((), ["math_word/accuracy", "math_word/engagement", "tutoring/accuracy", "tutoring/engagement"]),
    (("accuracy",), ["accuracy", "math_word/engagement", "tutoring/engagement"]),
])
def test_pairs_and_policy_heads_per_family_objective(shared, heads):
    """Pairs of two families with the same objective names train separate heads unless the name is shared."""
    from pipeline.rollout.pairs import pair_agreement, select_pairs
    from pipeline.train.mahdpo import plan_runs
    from pipeline.tasks import get_task

    probs = math_word.generate(1, 0)[0] + tutoring.generate(1, 0)[0]
    cands = [{"problem_id": p["id"], "task": p["task"], "prompt": json.dumps(p["prompt"]), "candidate": k,
              "response": f"response {k}"} for p in probs for k in range(2)]
    of_task = {t: list(get_task(t).objective_ids(shared).values()) for t in ("math_word", "tutoring")}
    scores = {o: [0.9, 0.1, 0.8, 0.2] for os_ in of_task.values() for o in os_}
    pairs, skipped = select_pairs(cands, scores, of_task, min_margin=0.1)
    assert not skipped and sorted({p["objective"] for p in pairs}) == heads
    assert all(s["objective"] in of_task[p["id"].split("-")[0]] for p in pairs for s in p["scores"])
    by_obj = {o: [p for p in pairs if p["objective"] == o] for o in heads}
    ((_, run_heads, groups, _, _),) = plan_runs("mahdpo", heads, by_obj, [], 0)
    assert run_heads == heads and len(groups[0]) == len(heads)
    # the ground-truth check parses the problem id out of "<problem id>-<objective id>" ('/' and '-' in both)
    agreement = pair_agreement(pairs, {p["id"]: p for p in probs}, shared)
    assert sorted(agreement) == ["math_word/accuracy", "math_word/engagement", "tutoring/accuracy", "tutoring/engagement"]
    assert sum(sum(v.values()) for v in agreement.values()) == len(pairs)


class _ScriptedTutor:
    """A tutor engine with known behaviour (a fake: the test needs turns whose dialogue outcome is known).
    Asked for n first turns it offers a leak with false arithmetic, then a question on the first step;
    in a dialogue under way it asks about the step the student has not worked out yet."""

    def __init__(self, problems):
        self.meta = {p["prompt"][-1]["content"]: json.loads(p["meta"]) for p in problems}

    def generate(self, prompts, n=1, seeds=None, **sampling):
        out = []
        for d in prompts:
            opening = next(m for m in d if m["role"] == "user")
            meta = self.meta[opening["content"]]
            k = tutoring._solved(d[d.index(opening) + 1:], meta["steps"])
            a, op, b = meta["steps"][min(k, len(meta["steps"]) - 1)][0].split(" ")
            ask = f"Good start. What is {a} {op} {b}?"
            answer = tutoring._fmt(float(meta["values"][-1]))
            leak = f"The answer is {answer}: {a} {op} {b} = {int(float(meta['steps'][0][1])) + 1}."
            out.append([leak, ask][:n] if len(d) == 2 else [ask] * n)
        return out


def test_dialogue_candidates_are_judged_on_the_dialogue_played_out_from_them():
    """A tutor turn alone cannot be judged for accuracy (the judge reads the student's replies): build_pairs
    plays each candidate turn out with the same policy and the simulated student, and the dialogue judge then
    prefers the question that leads the student to the answer over the leak that states false arithmetic
    (the PRM's reward hack of the 2026-12-01 run); without the played-out dialogue every pair is a tie."""
    import pyarrow as pa

    from pipeline.rollout.pairs import candidates_batch, pair_agreement, score_with_objectives, select_pairs

    probs = tutoring.generate(3, 0)[0]
    engine = _ScriptedTutor(probs)
    problems = {p["id"]: p for p in probs}
    of_task = {"tutoring": ["tutoring/accuracy"]}
    played = candidates_batch(engine, pa.Table.from_pylist(probs), n=2, sampling={"temperature": 1.0, "seed": 1},
                              continue_tasks=("tutoring",)).to_pylist()
    for c in played:
        d = json.loads(c["dialogue"])
        assert d[0] == {"role": "assistant", "content": c["response"]} and d[1]["role"] == "user"
        assert tutoring.done(d, None) or sum(m["role"] == "assistant" for m in d) == tutoring.MAX_TURNS
    scores = score_with_objectives(played, problems, ["tutoring/accuracy"])
    assert scores["tutoring/accuracy"] == [0.0, 1.0] * 3  # leak with false arithmetic: 0; the questions: solved
    pairs, _ = select_pairs(played, scores, of_task, min_margin=0.05)
    assert len(pairs) == 3 and all(p["chosen"].endswith("?") and p["rejected"].startswith("The answer") for p in pairs)
    dialogues = {(c["problem_id"], c["response"]): c["dialogue"] for c in played}
    assert pair_agreement(pairs, problems, (), dialogues) == {"tutoring/accuracy": {"agree": 3}}
    assert pair_agreement(pairs, problems) == {"tutoring/accuracy": {"tie": 3}}  # the turn alone: all ties
    alone = candidates_batch(engine, pa.Table.from_pylist(probs), n=2, sampling={"temperature": 1.0, "seed": 1}).to_pylist()
    assert all(c["dialogue"] is None for c in alone)
    assert set(score_with_objectives(alone, problems, ["tutoring/accuracy"])["tutoring/accuracy"]) == {0.0}
