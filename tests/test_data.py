import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import RecordError, read_records, schema_for, write_records
from pipeline.data.stream import quarantine_count, quarantine_rows, read_dataset

MSG = [{"role": "user", "content": "q"}]
GOOD = {
    "problem": {"id": "p1", "task": "math", "prompt": MSG, "reference": "4", "meta": {"k": 1}},
    "trajectory": {"id": "t1", "problem_id": "p1", "prompt": MSG, "steps": ["a", "b"], "final": "b", "outcome": 1.0, "policy": "sft"},
    "stepwise": {"id": "s1", "prompt": MSG, "completions": ["a", "b"], "objective": "accuracy", "labels": [0.5, None],
                 "label_kind": "soft", "rollouts_per_step": 8},
    "preference": {"id": "r1", "prompt": MSG, "chosen": "good", "rejected": "bad", "objective": "accuracy",
                   "chosen_score": 0.75, "rejected_score": 0.25, "ref_chosen_logp": -12.5, "ref_rejected_logp": None},
    "sft": {"id": "f1", "prompt": MSG, "completion": "answer"},
}


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("kind", sorted(GOOD))
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_round_trip(tmp_path, kind, suffix):
    path = write_records([{**GOOD[kind], "id": f"{GOOD[kind]['id']}-{i}"} for i in range(3)], tmp_path / f"x{suffix}", kind)
    table, report = read_records(path, kind)
    assert table.schema.equals(schema_for(kind)) and report.rows == 3 and report.quarantined == 0
    row = table.to_pylist()[0]
    for k, v in {**GOOD[kind], "id": f"{GOOD[kind]['id']}-0"}.items():  # ids are unique (duplicates are bad rows)
        assert row[k] == (json.dumps(v, sort_keys=True) if k == "meta" else v)


def test_labels_are_numeric_never_bool():
    for kind in ("stepwise", "preference", "trajectory"):
        for f in schema_for(kind):
            assert not pa.types.is_boolean(f.type) and not (pa.types.is_list(f.type) and pa.types.is_boolean(f.type.value_type))
    assert schema_for("stepwise").field("labels").type == pa.list_(pa.float32())


@pytest.mark.parametrize("kind,patch,field,words", [
    ("sft", {"completion": None}, "completion", "valid string"),
    ("sft", {"prompt": [{"role": "wizard", "content": "x"}]}, "prompt.0.role", "user"),
    ("preference", {"chosen": 5}, "chosen", "valid string"),
    ("preference", {"objective": ""}, "objective", "at least 1"),
    ("stepwise", {"labels": [1.0]}, "<row>", "labels has 1 entries but completions has 2"),
    ("stepwise", {"label_kind": "hard", "labels": [0.5, 1.0]}, "<row>", "hard labels must be 0 or 1"),
    ("trajectory", {"outcome": float("nan")}, "outcome", "finite"),
    ("problem", {"meta": "not json"}, "meta", "JSON object"),
])
def test_bad_row_names_file_row_field(tmp_path, kind, patch, field, words):
    rows = [GOOD[kind], {**GOOD[kind], **patch}]
    path = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(RecordError) as e:
        read_records(path, kind)
    assert (e.value.source, e.value.row, e.value.field) == (path, 1, field)
    assert words in str(e.value) and path in str(e.value)


def test_unparseable_line_is_a_bad_row(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [GOOD["sft"], "{not json", GOOD["sft"]])
    with pytest.raises(RecordError, match=r"row 1: field '<json>': not valid JSON"):
        read_records(path, "sft")


def test_skip_bad_rows_quarantines_and_counts(tmp_path):
    rows = [GOOD["sft"], {**GOOD["sft"], "completion": 3}, "{oops", {**GOOD["sft"], "id": "f2"}]
    path = jsonl(tmp_path / "d.jsonl", rows)
    table, report = read_records(path, "sft", skip_bad_rows=True, quarantine_dir=str(tmp_path / "q"))
    assert table.column("id").to_pylist() == ["f1", "f2"]
    assert report.quarantined == 2 and quarantine_count(str(tmp_path / "q")) == 2
    bad = quarantine_rows(str(tmp_path / "q"))
    assert [(b["row"], b["field"]) for b in bad] == [(1, "completion"), (2, "<json>")]
    assert bad[0]["record"]["completion"] == 3 and bad[1]["record"] == "{oops"
    # Reading again rewrites the shard's quarantine file: the count does not double.
    read_records(path, "sft", skip_bad_rows=True, quarantine_dir=str(tmp_path / "q"))
    assert quarantine_count(str(tmp_path / "q")) == 2


def test_failed_write_keeps_existing_file(tmp_path):
    path = tmp_path / "x.parquet"
    write_records([GOOD["sft"]], path, "sft")
    with pytest.raises(RecordError):
        write_records([GOOD["sft"], {"id": "x"}], path, "sft")
    assert read_records(str(path), "sft")[0].num_rows == 1
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]  # no temp file left behind


def test_trl_formats_load_without_conversion(tmp_path):
    pref = [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},  # standard
        {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "No."}]},  # conversational
        {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Meh."}]},  # implicit prompt
    ]
    t, _ = read_records(jsonl(tmp_path / "pref.jsonl", pref), "preference", defaults={"objective": "helpfulness"})
    rows = t.to_pylist()
    assert all(r["prompt"] == [{"role": "user", "content": "Hi?"}] for r in rows)
    assert [r["chosen"] for r in rows] == ["Hello!"] * 3 and rows[2]["rejected"] == "Meh."
    assert {r["objective"] for r in rows} == {"helpfulness"} and rows[0]["id"] == "pref-0"

    step = [{"prompt": "2+2?", "completions": ["2+2=4", "so 4"], "labels": [True, False]}]
    t, _ = read_records(jsonl(tmp_path / "step.jsonl", step), "stepwise", defaults={"objective": "accuracy"})
    r = t.to_pylist()[0]
    assert r["labels"] == [1.0, 0.0] and r["label_kind"] == "hard" and t.schema.field("labels").type == pa.list_(pa.float32())

    sft = [{"prompt": "Hi?", "completion": "Hello!"},
           {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]},
           {"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Hello!"}]}]
    t, _ = read_records(jsonl(tmp_path / "sft.jsonl", sft), "sft")
    assert [r["completion"] for r in t.to_pylist()] == ["Hello!"] * 3


def test_trl_preference_parquet_from_hf_save_to_disk(tmp_path):
    import datasets

    rows = [{"prompt": "Q?", "chosen": "A", "rejected": "B", "score_chosen": 8.0}] * 4
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(tmp_path / "hf")
    t, report = read_records(str(tmp_path / "hf"), "preference", defaults={"objective": "help"}, split="test")
    assert t.num_rows == 1 and t.to_pylist()[0]["chosen"] == "A"
    assert list(report.ignored_columns.values()) == [["score_chosen"]]  # reported, not silently kept or dropped
    with pytest.raises(ValueError, match="no split 'validation'"):
        read_records(str(tmp_path / "hf"), "preference", defaults={"objective": "help"}, split="validation")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        read_records("someorg/some-dataset", "preference")


def test_ray_data_streams_shards(tmp_path, ray_session):
    shards = tmp_path / "shards"
    for i in range(3):
        write_records([{**GOOD["preference"], "id": f"r{i}-{j}"} for j in range(5)], shards / f"part-{i}.parquet", "preference")
    ds = read_dataset(str(shards), "preference")
    ids = sorted(r["id"] for r in ds.iter_rows())
    assert len(ids) == 15 and ids[0] == "r0-0"
    assert ds.schema().names == schema_for("preference").names
    # A bad row inside one shard fails the stream, naming that shard and row.
    bad = pq.read_table(shards / "part-1.parquet").to_pylist()
    bad[3]["objective"] = ""
    pq.write_table(pa.Table.from_pylist(bad), shards / "part-1.parquet")
    with pytest.raises(Exception, match=r"part-1.parquet: row 3: field 'objective'"):
        read_dataset(str(shards), "preference").materialize()
    q = tmp_path / "q"
    assert read_dataset(str(shards), "preference", skip_bad_rows=True, quarantine_dir=str(q)).count() == 14
    assert quarantine_count(str(q)) == 1


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.parquet: no such file"):
        read_records(str(tmp_path / "missing.parquet"), "sft")


def test_ultrafeedback_and_math_converters(tmp_path):
    """Per-aspect best-vs-worst pairs from UltraFeedback rows; MATH problems with the boxed answer;
    a row lacking what it needs is an error naming the row and field."""
    import json

    from jobs.prepare_data import main
    from pipeline.data.converters import boxed_answer, ultrafeedback_pairs
    from pipeline.data.records import RecordError

    def comp(resp, h, t):
        return {"response": resp, "annotations": {"helpfulness": {"Rating": str(h)}, "truthfulness": {"Rating": t}}}

    rows = [{"instruction": "Name a prime.", "completions": [comp("7", 5, "5"), comp("9", 2, "N/A"), comp("2", 4, "5")]},
            {"instruction": "Say hi.", "completions": [comp("hi", 3, "4"), comp("hello", 3, "4")]}]
    pairs, skipped = ultrafeedback_pairs(rows, ["helpfulness", "truthfulness"])
    assert [(p["objective"], p["chosen"], p["rejected"]) for p in pairs] == [("helpfulness", "7", "9"),]
    assert skipped == {"too_few_rated": 0, "margin": 3}  # truthfulness 5 vs 5, and both aspects of "Say hi."
    # MODPO's margins: both responses' ratings on every aspect rated for both ("9" has no truthfulness rating),
    # mapped from 1-5 onto the PRM rewards' [0, 1] scale
    assert pairs[0]["scores"] == [{"objective": "helpfulness", "chosen": 1.0, "rejected": 0.25}]
    assert (pairs[0]["chosen_score"], pairs[0]["rejected_score"]) == (1.0, 0.25)
    with pytest.raises(RecordError, match=r"Rating.*'7' is outside"):
        ultrafeedback_pairs([{"instruction": "x", "completions": [comp("a", 7, "5"), comp("b", 1, "5")]}], ["helpfulness"])
    with pytest.raises(RecordError, match="row 0: field 'completions.annotations.honesty'"):
        ultrafeedback_pairs(rows, ["honesty"])
    assert boxed_answer("so $x = \\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    src = tmp_path / "math.jsonl"
    src.write_text(json.dumps({"problem": "What is 1+1?", "solution": "1+1 = \\boxed{2}.", "level": "Level 1"}) + "\n")
    out = main(["--source", "math", "--dataset", str(src), "--out_dir", str(tmp_path / "out")])
    from pipeline.data import read_records

    probs = read_records([out["problems"]], "problem")[0].to_pylist()
    assert probs[0]["reference"] == "2" and probs[0]["task"] == "math_word"
    src.write_text(json.dumps({"problem": "What is 1+1?", "solution": "two"}) + "\n")
    with pytest.raises(RecordError, match="row 0: field 'solution'"):
        main(["--source", "math", "--dataset", str(src), "--out_dir", str(tmp_path / "out2")])


def test_held_out_split_keeps_every_turn_of_a_dialogue_on_one_side():
    """SFT rows of one dialogue (one per assistant turn, each prompted by the dialogue so far) are split by
    the dialogue's opening; a random row split put turns of one dialogue on both sides."""
    from pipeline.data.split import dialogue_key, held_out

    sides = set()
    for d in range(40):
        opening = [{"role": "system", "content": "Tutor."}, {"role": "user", "content": f"Help with problem {d}."}]
        turns = [opening + [{"role": "assistant", "content": f"hint {t}"}, {"role": "user", "content": "ok"}] * t
                 for t in range(4)]
        assert len({dialogue_key(t) for t in turns}) == 1
        side = {held_out(t, 0.3) for t in turns}
        assert len(side) == 1
        sides |= side
    assert sides == {True, False}  # both sides get dialogues
    assert held_out("a plain string prompt", 0.3) == held_out("a plain string prompt", 0.3)
