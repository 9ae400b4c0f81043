import sys

import pytest

from pipeline.objectives import (ObjectiveSpec, build_objective, build_objectives, parse_verdict,
                                 split_blank_lines, split_sentences, split_turns)
from pipeline.objectives.math_verifier import is_correct
from pipeline.objectives.users import LLMUser


@pytest.mark.parametrize("text,steps", [
    ("Dr. Smith arrived. He sat down.", ["Dr. Smith arrived.", "He sat down."]),
    ("Use tools, e.g. a hammer. Then rest.", ["Use tools, e.g. a hammer.", "Then rest."]),
    ("That is, i.e. the end. Next one!", ["That is, i.e. the end.", "Next one!"]),
    ("Steps:\n1. Mix it.\n2. Bake it.", ["Steps:\n1. Mix it.", "2. Bake it."]),
    ("A) First option. B) Second option.", ["A) First option.", "B) Second option."]),
    ("Step 3: add water. Done?", ["Step 3: add water.", "Done?"]),
    ("Pi is 3.14 here. Ok.", ["Pi is 3.14 here.", "Ok."]),
    ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
    ("First paragraph\n\nSecond one", ["First paragraph", "Second one"]),
])
def test_sentence_splitter(text, steps):
    assert split_sentences(text) == steps


def test_blank_line_and_turn_splitters():
    assert split_blank_lines("a = 1\n\n  \n\nb = 2\nstill b\n\n") == ["a = 1", "b = 2\nstill b"]
    d = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "q1?"}, {"role": "user", "content": "x"},
         {"role": "assistant", "content": "q2?"}]
    assert split_turns(d) == ["q1?", "q2?"] and split_turns(d, role="user") == ["hi", "x"]


@pytest.mark.parametrize("response,reference,ok", [
    ("So \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("The answer is \\boxed{0.5}", "\\frac12", True),
    ("First 3 + 4 = 7.\n\nSo the answer is 12.", "12", True),   # final-line answer
    ("\\boxed{3} then later \\boxed{12}", "12", True),            # the last box counts
    ("12 apples at first.\n\nIn the end 15 remain.", "12", False),  # only the final line counts
    ("\\boxed{41}", "42", False),
    ("I do not know.", "42", False),
    ("", "42", False),
    ("\\boxed{2x+2}", "2(x+1)", True),
])
def test_math_verifier(response, reference, ok):
    assert is_correct(response, reference) is ok


@pytest.mark.parametrize("text,score", [
    ('{"analysis": "clear", "judgment": "ENGAGING"}', 1.0),
    ('Sure. {"analysis": "dry", "judgment": "NOT ENGAGING"}', 0.0),
    ("Judgment: NOT ENGAGING", 0.0),
    ("verdict = engaging", 1.0),
    ("The response is ENGAGING.", 1.0),
    ('{"analysis": "x", "judgment": "MAYBE"}', None),       # not a verdict
    ('{"judgment": "ENGAG', None),                          # malformed, no label
    ("It is ENGAGING and also NOT ENGAGING.", None),       # ambiguous
    ("", None),
])
def test_verdict_parsing(text, score):
    assert parse_verdict(text, {"ENGAGING": 1.0, "NOT ENGAGING": 0.0}) == score


def test_llm_judge_counts_unparseable_on_tiny_model(tiny_model_dir):
    """A real LLM judge on the tiny random model: its babble names no verdict, so every
    item is unscored (None) and counted, never read as a verdict."""
    from pipeline.engines.hf_engine import TransformersEngine

    engine = TransformersEngine(tiny_model_dir, "float32")
    obj = build_objective({"name": "helpful", "kind": "judged",
                           "judge": {"rubric": "Is the response helpful?", "verdicts": {"HELPFUL": 1, "UNHELPFUL": 0},
                                     "max_tokens": 16}}, engine=engine)
    items = [{"prompt": [{"role": "user", "content": f"q{i}"}], "response": "an answer"} for i in range(3)]
    scores = obj.score_batch(items)
    stats = obj.scorer.stats.as_dict()
    assert stats["calls"] == 3
    assert stats["unparseable"] == sum(s is None for s in scores)
    assert all(s in (None, 0.0, 1.0) for s in scores)
    user = LLMUser("You are a curious student.", engine, max_tokens=8)
    assert user.prompt([{"role": "system", "content": "tutor"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "q?"}])[1:] == [
        {"role": "assistant", "content": "hi"}, {"role": "user", "content": "q?"}]  # roles swapped
    assert isinstance(user.reply_batch([[{"role": "user", "content": "hi"}]], [{}])[0], str)


def test_user_objective_from_config_without_code_change(tmp_path, monkeypatch):
    (tmp_path / "my_judges.py").write_text(
        "def politeness(prompt, response, reference, meta):\n    return 1.0 if 'please' in response.lower() else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    objs = build_objectives([
        {"name": "politeness", "kind": "judged", "judge": {"callable": "my_judges:politeness"}},
        {"name": "accuracy", "kind": "verifiable", "verifier": "math"},
    ])
    assert objs["politeness"].score([], "Please sit.") == 1.0 and objs["politeness"].splitter == "sentences"
    assert objs["accuracy"].score([], "\\boxed{4}", "4") == 1.0 and objs["accuracy"].splitter == "blank_lines"
    sys.modules.pop("my_judges", None)


@pytest.mark.parametrize("spec,words", [
    ({"name": "x", "kind": "judged"}, "needs judge"),
    ({"name": "x", "kind": "dialogue", "judge": {"callable": "a:b"}}, "needs user"),
    ({"name": "x", "kind": "judged", "judge": {"callable": "a:b", "rubric": "r", "verdicts": {"A": 1}}}, "exactly one"),
    ({"name": "x", "kind": "judged", "judge": {"rubric": "r"}}, "needs 'verdicts'"),
    ({"name": "x", "kind": "verifiable"}, "needs verifier"),
])
def test_objective_spec_errors(spec, words):
    with pytest.raises(ValueError, match=words):
        ObjectiveSpec.model_validate(spec)


def test_bad_callable_is_named():
    with pytest.raises(ImportError, match="no_such_pkg"):
        build_objective({"name": "x", "kind": "judged", "judge": {"callable": "no_such_pkg.mod:fn"}})
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        build_objective({"name": "x", "kind": "judged", "judge": {"callable": "pipeline.tasks.assistant:nope"}})


def test_judge_out_of_range_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "bad_judge.py").write_text("def j(p, r, ref, m):\n    return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    obj = build_objective({"name": "x", "kind": "judged", "judge": {"callable": "bad_judge:j"}})
    with pytest.raises(ValueError, match=r"returned 3; judges return a score in \[0, 1\]"):
        obj.score([], "x")
    sys.modules.pop("bad_judge", None)


def test_objective_ids_and_how_a_reference_to_one_resolves():
    from pipeline.objectives import objective_id, resolve_keys, resolve_objective

    assert objective_id("math_word", "accuracy") == "math_word/accuracy"
    assert objective_id("math_word", "accuracy", ["accuracy"]) == "accuracy"  # declared shared: the bare name
    ids = ["math_word/accuracy", "tutoring/accuracy", "assistant/concision"]
    assert resolve_objective("tutoring/accuracy", ids) == "tutoring/accuracy"
    assert resolve_objective("concision", ids) == "assistant/concision"  # a bare name that ends one id
    with pytest.raises(ValueError, match=r"'accuracy' is ambiguous: it names 2 objectives "
                                         r"\['math_word/accuracy', 'tutoring/accuracy'\]"):
        resolve_objective("accuracy", ids)
    with pytest.raises(ValueError, match="'curacy' is not an objective"):
        resolve_objective("curacy", ids)  # a suffix of a name is not the name
    with pytest.raises(ValueError, match="already names"):
        resolve_keys({"concision": 1, "assistant/concision": 2}, ids)
    with pytest.raises(ValueError, match="should match pattern"):  # '/' separates family and name in an id
        ObjectiveSpec.model_validate({"name": "a/b", "kind": "verifiable", "verifier": "math"})


def test_math_verifier_off_the_main_thread_has_a_time_limit():
    """In Ray Data actors (off the main thread) math-verify's signal timeouts do not work, so a pathological
    answer could hang a stage: the check runs in a pool process with an outer limit that kills it."""
    import threading
    import time

    from pipeline.objectives import math_verifier as mv

    t0 = time.time()
    with pytest.raises(TimeoutError, match="longer than 0.5 s"):
        mv.run_with_timeout(time.sleep, (30,), 0.5)
    assert time.time() - t0 < 10
    assert mv.run_with_timeout(abs, (-3,), 30) == 3  # a fresh worker after the killed one
    out = {}
    th = threading.Thread(target=lambda: out.update(ok=is_correct("So 3 + 4 = 7.\n\\boxed{7}", "7"),
                                                   bad=is_correct("\\boxed{8}", "7")))
    th.start()
    th.join(60)
    assert out == {"ok": True, "bad": False}
